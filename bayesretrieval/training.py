"""Train a small open_clip CLIP from scratch on the world, and cache the checkpoint.

The model is an ordinary open_clip model (``bayes-tiny`` or ``bayes-small``) trained
with open_clip's contrastive loss on fresh in-memory batches of the training world
(:func:`bayesretrieval.world.iter_batches`). Checkpoints are ordinary open_clip
checkpoints (``{"state_dict": ...}``) that
``open_clip.create_model_and_transforms(name, pretrained=path)`` loads once
:func:`bayesretrieval.encoders.register_model_configs` has run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import open_clip
import torch
from open_clip.loss import ClipLoss
from torch import nn

from bayesretrieval.atomic import write_atomic
from bayesretrieval.cache import cache_dir
from bayesretrieval.encoders import register_model_configs
from bayesretrieval.options import TRAIN_RUNS, ModelSize
from bayesretrieval.world.render import images_to_tensor
from bayesretrieval.world.scenes import SceneConfig
from bayesretrieval.world.splits import DEFAULT_SPLIT, WorldSplit
from bayesretrieval.world.world import WORLD_VERSION, iter_batches

CHECKPOINT_FORMAT_VERSION = 1
MAX_LOGIT_SCALE = math.log(100.0)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (together with the seed, its cache key).

    Attributes:
        model_name: open_clip architecture.
        steps: optimiser steps.
        batch_size: image-caption pairs per step.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay (not applied to gains, biases, logit scale).
        warmup_steps: linear warm-up steps before the cosine decay.
        split: what the training world holds out.
        scenes: the training world's scene distribution.
        image_size: image side in pixels (must match the model config).
    """

    model_name: str
    steps: int
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    split: WorldSplit = field(default=DEFAULT_SPLIT)
    scenes: SceneConfig = field(default_factory=SceneConfig)
    image_size: int = 64

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(
                f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}"
            )

    def to_dict(self) -> dict:
        """Return a JSON-ready dict (includes the world version)."""
        data = asdict(self)
        data["split"] = self.split.to_dict()
        data["world_version"] = WORLD_VERSION
        return data

    def fingerprint(self) -> str:
        """Short hash of :meth:`to_dict`, part of the cache key."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


TRAIN_CONFIGS: dict[ModelSize, TrainConfig] = {
    ModelSize.TEST: TrainConfig(**TRAIN_RUNS[ModelSize.TEST]._asdict(), lr=2e-3, warmup_steps=25),
    ModelSize.BENCHMARK: TrainConfig(**TRAIN_RUNS[ModelSize.BENCHMARK]._asdict(), lr=1e-3),
}
"""Each size's run: model, steps and batch size from :data:`bayesretrieval.options.TRAIN_RUNS`."""


@dataclass(frozen=True)
class StepInfo:
    """Progress of one optimiser step.

    Attributes:
        step: steps done so far (1-based).
        steps: steps in total.
        loss: contrastive loss of this step's batch.
        logit_scale: the current ``exp(logit_scale)``.
        images_per_s: throughput since the start of training.
    """

    step: int
    steps: int
    loss: float
    logit_scale: float
    images_per_s: float


def _lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * (step - config.warmup_steps) / span))


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        is_gain = param.ndim < 2 or "logit_scale" in name or "embedding" in name
        (no_decay if is_gain else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-6)


def train_clip(
    config: TrainConfig,
    seed: int = 0,
    progress: Callable[[StepInfo], None] | None = None,
) -> nn.Module:
    """Train a CLIP from random initialisation with the contrastive loss.

    The same config and seed give the same weights (on the same machine and thread
    count): the seed fixes the initialisation and the stream of training batches.

    Args:
        config: hyper-parameters.
        seed: seed of the initialisation and of the batch stream.
        progress: called after every step with a :class:`StepInfo`.

    Returns:
        The trained model, in eval mode.
    """
    register_model_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model(config.model_name, pretrained=None)
    tokenizer = open_clip.get_tokenizer(config.model_name)
    preprocess_cfg = model.visual.preprocess_cfg
    if tuple(preprocess_cfg["size"]) != (config.image_size, config.image_size):
        raise ValueError(
            f"model {config.model_name!r} takes {preprocess_cfg['size']} images, "
            f"config renders {config.image_size}x{config.image_size}"
        )
    optimizer = _optimizer(model, config)
    loss_fn = ClipLoss()
    batches: Iterator = iter_batches(
        config.batch_size, seed, config.split, config.scenes, config.image_size
    )
    model.train()
    start = time.perf_counter()
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * _lr_factor(step, config)
        images, captions = next(batches)
        pixels = images_to_tensor(images, preprocess_cfg["mean"], preprocess_cfg["std"])
        image_features = model.encode_image(pixels, normalize=True)
        text_features = model.encode_text(tokenizer(captions), normalize=True)
        loss = loss_fn(image_features, text_features, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
        if progress is not None:
            elapsed = time.perf_counter() - start
            progress(
                StepInfo(
                    step + 1,
                    config.steps,
                    float(loss.detach()),
                    float(model.logit_scale.detach().exp()),
                    (step + 1) * config.batch_size / elapsed,
                )
            )
    return model.eval()


def save_checkpoint(model: nn.Module, path: str | Path, metadata: dict | None = None) -> Path:
    """Write an open_clip checkpoint atomically (temp file in the same folder + rename).

    Args:
        model: the model to save.
        path: destination file (``.pt``).
        metadata: JSON-ready facts stored next to the state dict (config, seed, ...).

    Returns:
        The path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "state_dict": model.state_dict(),
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "metadata": json.dumps(metadata or {}, sort_keys=True),
    }
    write_atomic(path, lambda handle: torch.save(payload, handle))
    return path


def read_checkpoint_metadata(path: str | Path) -> dict:
    """Return the metadata :func:`save_checkpoint` stored in a checkpoint."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise ValueError(f"{path} is not a bayesretrieval checkpoint (no 'state_dict' entry)")
    return json.loads(payload.get("metadata", "{}"))


def model_name(size: ModelSize | str) -> str:
    """The open_clip architecture name of a trained model size."""
    return TRAIN_CONFIGS[ModelSize(size)].model_name


def checkpoint_path(size: ModelSize | str = ModelSize.TEST, seed: int = 0) -> Path:
    """Where the cache keeps the checkpoint of ``size`` and ``seed`` (may not exist yet)."""
    config = TRAIN_CONFIGS[ModelSize(size)]
    name = f"{config.model_name}-{ModelSize(size).value}-seed{seed}-{config.fingerprint()}.pt"
    return cache_dir("models") / name


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def get_trained_model(
    size: ModelSize | str = ModelSize.TEST,
    seed: int = 0,
    progress: Callable[[StepInfo], None] | None = None,
    retrain: bool = False,
) -> Path:
    """Return the cached checkpoint of a trained model, training it first if needed.

    Concurrent callers wait on a file lock, so a model is trained once per machine.

    Args:
        size: ``"test"`` (bayes-tiny) or ``"benchmark"`` (bayes-small).
        seed: training seed.
        progress: forwarded to :func:`train_clip` when training runs.
        retrain: train again even if a checkpoint is cached.

    Returns:
        Path of the checkpoint; load it with ``open_clip.create_model_and_transforms(
        model_name(size), pretrained=str(path))`` or
        ``ClipEncoder.from_pretrained(model_name(size), path)``.
    """
    size = ModelSize(size)
    path = checkpoint_path(size, seed)
    with _file_lock(path.with_suffix(".lock")):
        if path.is_file() and not retrain:
            return path
        config = TRAIN_CONFIGS[size]
        last: list[StepInfo] = []

        def record(info: StepInfo) -> None:
            last[:] = [info]
            if progress is not None:
                progress(info)

        start = time.perf_counter()
        model = train_clip(config, seed, record)
        metadata = {
            "size": size.value,
            "seed": seed,
            "train_config": config.to_dict(),
            "train_seconds": round(time.perf_counter() - start, 1),
            "final_loss": last[-1].loss,
            "logit_scale": last[-1].logit_scale,
            "images_per_s": round(last[-1].images_per_s, 1),
            "torch_threads": torch.get_num_threads(),
        }
        return save_checkpoint(model, path, metadata)
