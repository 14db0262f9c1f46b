"""Decoding in loader workers and encoding batches into result rows (shard tables)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset

from bayesretrieval.encoders import ClipEncoder
from bayesretrieval.indexing.decode import ImageSkipped, decode_image
from bayesretrieval.indexing.scalars import ScalarComputer
from bayesretrieval.indexing.sources import SourceFile
from bayesretrieval.skips import SkipReason
from bayesretrieval.store.format import SCALAR_COLUMNS


@dataclass
class DecodedSample:
    """One file after decoding and preprocessing (``pixels`` is ``None`` for a skip).

    Attributes:
        source: the file.
        pixels: preprocessed ``(3, H, W)`` tensor, or ``None``.
        width: decoded width (upright), -1 for a skip.
        height: decoded height (upright), -1 for a skip.
        reason: a :class:`SkipReason` value for a skip, else ``None``.
        detail: the error text for a skip.
    """

    source: SourceFile
    pixels: torch.Tensor | None
    width: int = -1
    height: int = -1
    reason: str | None = None
    detail: str = ""


class DecodeDataset(Dataset):
    """Decodes and preprocesses image files; never raises for a bad file.

    Args:
        root: the image folder.
        files: files to load, in order.
        preprocess: the encoder's PIL -> tensor transform.
        max_pixels: decompression-bomb limit.
        draft_size: short-side size JPEG decoding may downscale to.
    """

    def __init__(self, root: Path, files: list[SourceFile], preprocess, max_pixels: int, draft_size: int | None):
        self.root, self.files, self.preprocess = Path(root), files, preprocess
        self.max_pixels, self.draft_size = max_pixels, draft_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, position: int) -> DecodedSample:
        source = self.files[position]
        try:
            image = decode_image(self.root / source.path, self.max_pixels, self.draft_size)
        except ImageSkipped as skip:
            return DecodedSample(source, None, reason=skip.reason.value, detail=skip.detail)
        try:
            pixels = self.preprocess(image)
        except (OSError, ValueError, RuntimeError) as err:
            return DecodedSample(source, None, reason=SkipReason.CORRUPT.value, detail=f"preprocess: {err}")
        return DecodedSample(source, pixels, image.width, image.height)


def _collate(samples: list[DecodedSample]) -> list[DecodedSample]:
    return samples


def _quiet_worker(_: int) -> None:
    torch.set_num_threads(1)


def image_loader(dataset: DecodeDataset, batch_size: int, workers: int) -> DataLoader:
    """A loader that yields lists of :class:`DecodedSample` in dataset order."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        worker_init_fn=_quiet_worker if workers else None,
        prefetch_factor=4 if workers else None,
    )


def draft_size_for(encoder: ClipEncoder) -> int | None:
    """The model's input size (JPEG draft decoding may shrink to it), if it has one."""
    size = getattr(encoder.model.visual, "image_size", None)
    if size is None:
        return None
    return int(max(size)) if isinstance(size, (tuple, list)) else int(size)


def encode_samples(
    samples: list[DecodedSample], encoder: ClipEncoder, computer: ScalarComputer, schema: pa.Schema
) -> pa.Table:
    """Encode the decodable samples of a batch; return result rows for all of them.

    Returns:
        A table with ``schema`` (:func:`~bayesretrieval.indexing.work.result_schema`).
    """
    good = [s for s in samples if s.pixels is not None]
    bad = [s for s in samples if s.pixels is None]
    dim = computer.embed_dim
    columns = {name: [] for name in schema.names}
    if good:
        embeds, activations, uncertainty = computer.encode(encoder, torch.stack([s.pixels for s in good]))
        means = embeds.float().numpy()
        extras = {"variance_diag": uncertainty.variance_diag, "variance_lowrank": uncertainty.variance_lowrank,
                  "activation": activations.float().numpy()}
        for i, sample in enumerate(good):
            _append_row(columns, sample, means[i], uncertainty.scalars[i], extras, i)
    zero_scalars = np.zeros(len(SCALAR_COLUMNS))
    zero_extras = {
        name: np.zeros((len(bad), schema.field(name).type.list_size), np.float32)
        for name in ("variance_diag", "variance_lowrank", "activation")
        if name in schema.names
    }
    for i, sample in enumerate(bad):
        _append_row(columns, sample, np.zeros(dim, np.float32), zero_scalars, zero_extras, i)
    return pa.table(columns, schema=schema)


def _append_row(columns: dict, sample: DecodedSample, mean, scalars, extras: dict, i: int) -> None:
    source = sample.source
    values = {
        "path": source.path,
        "file_size": source.file_size,
        "mtime_ns": source.mtime_ns,
        "width": sample.width if sample.pixels is not None else None,
        "height": sample.height if sample.pixels is not None else None,
        "embedding": mean,
        "reason": sample.reason,
        "detail": sample.detail or None,
        **dict(zip(SCALAR_COLUMNS, (float(v) for v in scalars))),
    }
    for name, array in extras.items():
        if array is not None and name in columns:
            values[name] = array[i].reshape(-1)
    for name in columns:
        columns[name].append(values.get(name))
