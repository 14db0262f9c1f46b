"""The Ray engine of build-index: decode in Ray Data CPU tasks, encode in a pool of model actors.

The driver plans, assembles and publishes as for the local engine
(:mod:`bayesretrieval.indexing.pipeline`); this module only turns an
:class:`~bayesretrieval.indexing.pipeline.EncodeJob` into work shards::

    file keys (driver) --> decode + preprocess (CPU tasks) --> encode + posterior scalars
    (actor pool, one model per actor) --> one Parquet shard per actor call (work folder)

Each actor call writes its rows to the work folder itself, under a name derived from
the rows' keys (:func:`~bayesretrieval.indexing.work.shard_name`): a call Ray retries
after a worker died rewrites the same shard, and a build whose driver died reuses every
shard written. On a cluster the work folder (inside the index directory) and the image
folder must be visible to every node at the same path.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from bayesretrieval.encoders import ClipEncoder, ModelIdentity
from bayesretrieval.indexing.encode import DecodeDataset, DecodedSample, draft_size_for, encode_samples
from bayesretrieval.indexing.scalars import ScalarComputer
from bayesretrieval.indexing.sources import SourceFile
from bayesretrieval.indexing.work import WorkFolder

if TYPE_CHECKING:
    from bayesretrieval.indexing.pipeline import BuildProgress, EncodeJob

INSTALL_HINT = "pip install 'bayesretrieval[ray]'"
"""How to get Ray Data (the ``ray`` extra)."""

KEY_COLUMNS = ("path", "file_size", "mtime_ns")
DECODE_RETRIES = -1
"""A decode task is retried however often its worker dies (Ray Data's default for tasks).
Stated explicitly, it also keeps decoding in separate CPU tasks: Ray Data fuses a task
stage into the following actor stage when their remote arguments are equal."""


class RayUnavailableError(ImportError):
    """Ray Data is not installed."""


def import_ray():
    """The ``ray`` module with Ray Data loaded.

    Raises:
        RayUnavailableError: naming the install command, when Ray Data is missing.
    """
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        raise RayUnavailableError(f"the ray engine needs Ray Data ({err}); install it with: {INSTALL_HINT}") from None
    return ray


def check_ray_build(encoder: ClipEncoder) -> None:
    """Raise before any work if a Ray build of ``encoder`` cannot run.

    Raises:
        RayUnavailableError: when Ray Data is not installed.
        ValueError: for random weights (``pretrained`` ``None``), which the workers cannot
            load again.
    """
    import_ray()
    if encoder.identity.pretrained is None:
        raise ValueError("the ray engine loads the model's weights in its workers; random weights "
                         "(--pretrained none) cannot be loaded there: save them as a checkpoint and pass its path")


def encode_with_ray(job: EncodeJob, on_progress: Callable[[BuildProgress], None] | None) -> None:
    """Decode and encode ``job.files`` on Ray into ``job.work``'s shards, reporting progress as shards land.

    Uses the Ray instance this process is connected to, else connects to
    ``job.config.ray_address`` (or starts a local instance) for the job's duration.
    """
    from bayesretrieval.indexing.pipeline import BuildProgress

    if not job.files:
        return
    ray = import_ray()
    with _connected(ray, job.config.ray_address), _quiet_data_context(ray):
        done, skipped = job.done, 0
        for batch in _dataset(ray, job).iter_batches(batch_size=None, batch_format="numpy"):
            done += int(np.sum(batch["files"]))
            skipped += int(np.sum(batch["skipped"]))
            if on_progress is not None:
                on_progress(BuildProgress(done, job.total, skipped))


def _dataset(ray, job: EncodeJob):
    """The lazy pipeline: key blocks -> decode tasks -> encoder actors writing shards."""
    config = job.config
    rows_per_shard = config.batch_size * config.shard_batches
    keys = pa.table({name: [getattr(f, name) for f in job.files] for name in KEY_COLUMNS})
    blocks = [keys.slice(start, rows_per_shard) for start in range(0, len(keys), rows_per_shard)]
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    actors = config.ray_actors or max(gpus, 1)
    threads = 1 if gpus else max(1, int(resources.get("CPU", 1)) // actors)
    preprocess = job.encoder.preprocess
    decoded = ray.data.from_arrow(blocks).map_batches(
        decode_batch, batch_size=None, batch_format="pyarrow", num_cpus=1, max_retries=DECODE_RETRIES,
        fn_kwargs={"root": str(job.image_dir), "preprocess": preprocess, "max_pixels": config.max_pixels,
                   "draft_size": draft_size_for(job.encoder),
                   "pixel_shape": tuple(preprocess(Image.new("RGB", (8, 8))).shape)})
    return decoded.map_batches(
        ShardEncoder, batch_size=rows_per_shard, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1,
        fn_constructor_kwargs={"model": job.encoder.identity.to_dict(), "device": "cuda" if gpus else "cpu",
                               "threads": threads, "computer": job.computer, "work": job.work,
                               "schema": job.schema, "batch_size": config.batch_size})


def decode_batch(keys: pa.Table, root: str, preprocess, max_pixels: int, draft_size: int | None,
                 pixel_shape: tuple) -> dict:
    """Decode and preprocess one block of files (a Ray task), as the local engine's loader does.

    Returns:
        The key columns, ``width``, ``height``, ``reason`` and ``detail`` (``""`` when
        decoded) and ``pixels`` ``(n, *pixel_shape)`` float32 (zeros for a skipped file).
    """
    torch.set_num_threads(1)
    files = [SourceFile(*row) for row in zip(*(keys.column(name).to_pylist() for name in KEY_COLUMNS))]
    samples = [DecodeDataset(root, files, preprocess, max_pixels, draft_size)[i] for i in range(len(files))]
    blank = np.zeros(pixel_shape, np.float32)
    pixels = np.stack([s.pixels.numpy() if s.pixels is not None else blank for s in samples])
    return {
        **{name: keys.column(name).to_numpy(zero_copy_only=False) for name in KEY_COLUMNS},
        "width": np.asarray([s.width for s in samples], np.int32),
        "height": np.asarray([s.height for s in samples], np.int32),
        "reason": np.asarray([s.reason or "" for s in samples], dtype=object),
        "detail": np.asarray([s.detail for s in samples], dtype=object),
        "pixels": pixels,
    }


class ShardEncoder:
    """A Ray actor holding the model: encodes decoded files and writes them as one shard per call.

    Args:
        model: the driver's :class:`~bayesretrieval.encoders.ModelIdentity` as a dict; the
            actor loads the same weights (a checkpoint path must be readable where it runs).
        device: where the actor runs the model.
        threads: torch's thread count in the actor. On a cluster without GPUs an actor
            reserves one CPU (the rest stay free for the decode tasks' scheduling) but runs
            its model on the cluster's CPUs shared among the actors, as the local engine
            runs its model on every core beside its loader processes: decoding costs a few
            percent of encoding (``benchmarks/ray_build_speed.py``).
        computer: the posterior scalars per item.
        work: the build's work folder.
        schema: the shards' schema.
        batch_size: images per encoder call.

    Raises:
        ValueError: if the weights the actor loads are not the driver's (another checkpoint sha256).
    """

    def __init__(self, model: dict, device: str, threads: int, computer: ScalarComputer, work: WorkFolder,
                 schema: pa.Schema, batch_size: int):
        torch.set_num_threads(threads)
        identity = ModelIdentity.from_dict(model)
        self.encoder = ClipEncoder.from_pretrained(identity.model_name, identity.pretrained, device=device)
        if not self.encoder.identity.matches(identity):
            raise ValueError(f"the Ray worker loaded {self.encoder.identity.to_dict()}, the driver has {model}")
        self.computer, self.work, self.schema, self.batch_size = computer, work, schema, batch_size

    def __call__(self, batch: dict) -> dict:
        """Encode ``batch`` (from :func:`decode_batch`), write its shard, return ``files`` and ``skipped`` counts."""
        samples = decoded_samples(batch)
        tables = [encode_samples(samples[start:start + self.batch_size], self.encoder, self.computer, self.schema)
                  for start in range(0, len(samples), self.batch_size)]
        self.work.append(pa.concat_tables(tables))
        return {"files": np.asarray([len(samples)]), "skipped": np.asarray([sum(s.pixels is None for s in samples)])}


def decoded_samples(batch: dict) -> list[DecodedSample]:
    """:class:`DecodedSample` objects from the columns :func:`decode_batch` returns."""
    samples = []
    all_pixels = torch.from_numpy(np.require(batch["pixels"], np.float32, ["C", "W"]))  # copies a read-only block
    for i, path in enumerate(batch["path"]):
        source = SourceFile(str(path), int(batch["file_size"][i]), int(batch["mtime_ns"][i]))
        reason = str(batch["reason"][i]) or None
        pixels = None if reason else all_pixels[i]
        samples.append(DecodedSample(source, pixels, int(batch["width"][i]), int(batch["height"][i]), reason,
                                     str(batch["detail"][i])))
    return samples


def check_rows_with_ray(path, columns, posterior, address: str | None = None) -> dict:
    """:func:`~bayesretrieval.indexing.embeddings_input.check_rows` over an embeddings file's blocks, in Ray tasks.

    Returns:
        The blocks' columns concatenated in file order.
    """
    from bayesretrieval.indexing.embeddings_input import check_rows

    ray = import_ray()
    with _connected(ray, address), _quiet_data_context(ray, preserve_order=True):
        checked = ray.data.read_parquet(str(path)).map_batches(
            check_rows, batch_size=None, batch_format="pyarrow", num_cpus=1, max_retries=DECODE_RETRIES,
            fn_kwargs={"columns": columns, "posterior": posterior})
        blocks = list(checked.iter_batches(batch_size=None, batch_format="numpy"))
    return {name: np.concatenate([block[name] for block in blocks]) for name in blocks[0]}


@contextlib.contextmanager
def _connected(ray, address: str | None) -> Iterator[None]:
    """Use the Ray instance this process is connected to, else connect (or start one) for the block."""
    if ray.is_initialized():
        yield
        return
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _quiet_data_context(ray, preserve_order: bool = False) -> Iterator[None]:
    """Ray Data without its own progress bars and start-up prints (the command shows one bar).

    ``preserve_order`` makes the output follow the input's order (slower; for results
    whose meaning depends on it).
    """
    context = ray.data.DataContext.get_current()
    options = context.execution_options
    saved = context.enable_progress_bars, context.print_on_execution_start, options.preserve_order
    context.enable_progress_bars, context.print_on_execution_start = False, False
    options.preserve_order = preserve_order
    try:
        yield
    finally:
        context.enable_progress_bars, context.print_on_execution_start, options.preserve_order = saved
