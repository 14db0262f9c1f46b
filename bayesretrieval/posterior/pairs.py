"""Image-caption pairs for fitting a posterior: tables or img2dataset-style folders.

Layouts:

- CSV/TSV or Parquet table with an image-path column and a caption column. Relative
  paths are resolved against ``image_root`` (default: the table's folder).
- A folder of images with a caption ``.txt`` beside each (``00000/000000001.jpg`` with
  ``00000/000000001.txt``, the layout img2dataset writes), searched recursively.

Pairs are streamed: the table is read in row batches and images are decoded a batch at a
time, so memory does not grow with the number of pairs. Missing images, unreadable
images and images without a caption are skipped and recorded, never fatal.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd
import pyarrow.parquet as pq
import torch
from PIL import Image

from bayesretrieval.skips import SkipReason

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_COLUMNS = ("image_path", "filepath", "image", "path", "file_name", "filename")
CAPTION_COLUMNS = ("caption", "text", "title", "captions")
TABLE_ROWS_PER_READ = 8192


@dataclass(frozen=True)
class Pair:
    """One image path and its caption."""

    image_path: Path
    caption: str


@dataclass(frozen=True)
class SkippedPair:
    """An input left out, with the reason."""

    image_path: Path
    reason: SkipReason


@dataclass
class PairBatch:
    """Decoded pairs.

    Attributes:
        images: preprocessed images, shape ``(b, 3, H, W)``.
        captions: ``b`` captions, aligned with ``images``.
        image_paths: ``b`` image paths.
    """

    images: torch.Tensor
    captions: list[str]
    image_paths: list[Path]


def _table_columns(columns: list[str], wanted: str | None, defaults: tuple, kind: str, path: Path) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"{path}: no {kind} column {wanted!r}; columns are {columns}")
        return wanted
    for name in defaults:
        if name in columns:
            return name
    raise ValueError(
        f"{path}: no {kind} column found (looked for {list(defaults)}); columns are "
        f"{columns}; name it explicitly"
    )


def _csv_separator(path: Path, separator: str | None) -> str:
    if separator is not None:
        return separator
    return "\t" if path.suffix.lower() in (".tsv", ".tab") else ","


def _read_csv(path: Path, separator: str | None, columns: list[str] | None, chunksize: int | None):
    return pd.read_csv(
        path,
        sep=_csv_separator(path, separator),
        usecols=columns,
        dtype=str,
        keep_default_na=False,
        chunksize=chunksize,
        nrows=0 if chunksize is None else None,
    )


def _csv_columns(path: Path, separator: str | None) -> list[str]:
    return list(_read_csv(path, separator, None, None).columns)


def _csv_rows(path: Path, separator: str | None, columns: list[str]) -> Iterator[pd.DataFrame]:
    yield from _read_csv(path, separator, columns, TABLE_ROWS_PER_READ)


def _csv_count(path: Path, separator: str | None, columns: list[str]) -> int:
    return sum(len(frame) for frame in _csv_rows(path, separator, columns[:1]))


def _parquet_columns(path: Path, separator: str | None) -> list[str]:
    return list(pq.ParquetFile(path).schema_arrow.names)


def _parquet_rows(path: Path, separator: str | None, columns: list[str]) -> Iterator[pd.DataFrame]:
    for batch in pq.ParquetFile(path).iter_batches(batch_size=TABLE_ROWS_PER_READ, columns=columns):
        yield batch.to_pandas()


def _parquet_count(path: Path, separator: str | None, columns: list[str]) -> int:
    return int(pq.ParquetFile(path).metadata.num_rows)


def _folder_images(root: Path) -> Iterator[Path]:
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                yield Path(folder) / name


class PairLayout(str, Enum):
    """How pairs are laid out on disk."""

    CSV = "csv"
    """A CSV (``,``) or TSV (``\\t``, ``.tsv``) table with image-path and caption columns."""
    PARQUET = "parquet"
    """A Parquet table with image-path and caption columns."""
    FOLDER = "folder"
    """Images with a same-named ``.txt`` caption beside each (img2dataset's layout)."""

    @classmethod
    def detect(cls, path: Path) -> "PairLayout":
        """Pick the layout from what ``path`` is."""
        if path.is_dir():
            return cls.FOLDER
        if path.suffix.lower() == ".parquet":
            return cls.PARQUET
        if path.suffix.lower() in (".csv", ".tsv", ".tab", ".txt"):
            return cls.CSV
        raise ValueError(
            f"{path}: expected a folder of images with .txt captions, a .csv/.tsv table or "
            f"a .parquet table, got a {path.suffix or 'suffix-less'} file"
        )


_TABLE_READERS: dict[PairLayout, tuple[Callable, Callable, Callable]] = {
    PairLayout.CSV: (_csv_columns, _csv_rows, _csv_count),
    PairLayout.PARQUET: (_parquet_columns, _parquet_rows, _parquet_count),
}


@dataclass
class PairReader:
    r"""Stream image-caption pairs from a table or a folder, recording what is skipped.

    Args:
        path: a ``.csv``/``.tsv``/``.parquet`` table or a folder.
        image_column: image-path column of a table (default: the first of
            ``IMAGE_COLUMNS`` present).
        caption_column: caption column of a table (default: the first of
            ``CAPTION_COLUMNS`` present).
        separator: CSV field separator (default ``\t`` for ``.tsv``, else ``,``).
        image_root: folder that relative image paths of a table start from (default: the
            table's folder).

    Attributes:
        layout: the detected :class:`PairLayout`.
        skipped: pairs the latest pass left out, with reasons (reset by each pass).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: for an unknown file type or missing columns.
    """

    path: Path
    image_column: str | None = None
    caption_column: str | None = None
    separator: str | None = None
    image_root: Path | None = None
    layout: PairLayout = field(init=False)
    skipped: list[SkippedPair] = field(init=False, default_factory=list)

    def __post_init__(self):
        self.path = Path(self.path)
        if not self.path.exists():
            raise FileNotFoundError(f"pairs not found: {self.path}")
        self.layout = PairLayout.detect(self.path)
        self.image_root = self.path.parent if self.image_root is None else Path(self.image_root)
        if not self.image_root.is_dir():
            raise NotADirectoryError(f"image root is not a folder: {self.image_root}")
        if self.layout in _TABLE_READERS:
            columns = _TABLE_READERS[self.layout][0](self.path, self.separator)
            self.image_column = _table_columns(columns, self.image_column, IMAGE_COLUMNS, "image-path", self.path)
            self.caption_column = _table_columns(
                columns, self.caption_column, CAPTION_COLUMNS, "caption", self.path
            )

    @property
    def name(self) -> str:
        """The input's file or folder name."""
        return self.path.name

    def __len__(self) -> int:
        """Number of candidate pairs (table rows or image files), before skipping."""
        if self.layout is PairLayout.FOLDER:
            return sum(1 for _ in _folder_images(self.path))
        count = _TABLE_READERS[self.layout][2]
        return count(self.path, self.separator, [self.image_column, self.caption_column])

    def skip_counts(self) -> dict[str, int]:
        """Skipped pairs per :class:`~bayesretrieval.skips.SkipReason` value, in the enum's order (none: ``{}``)."""
        counts = Counter(entry.reason for entry in self.skipped)
        return {reason.value: counts[reason] for reason in SkipReason if counts[reason]}

    def _skip(self, image_path: Path, reason: SkipReason) -> None:
        self.skipped.append(SkippedPair(image_path, reason))

    def iter_pairs(self) -> Iterator[Pair]:
        """Yield pairs with a non-empty caption, in file order (images not opened)."""
        self.skipped = []
        if self.layout is PairLayout.FOLDER:
            yield from self._folder_pairs()
        else:
            yield from self._table_pairs()

    def _folder_pairs(self) -> Iterator[Pair]:
        for image_path in _folder_images(self.path):
            caption_path = image_path.with_suffix(".txt")
            text = caption_path.read_text(encoding="utf-8").strip() if caption_path.is_file() else ""
            if text:
                yield Pair(image_path, text)
            else:
                self._skip(image_path, SkipReason.NO_CAPTION)

    def _table_pairs(self) -> Iterator[Pair]:
        columns = [self.image_column, self.caption_column]
        root = self.image_root
        for frame in _TABLE_READERS[self.layout][1](self.path, self.separator, columns):
            for image, text in zip(frame[self.image_column], frame[self.caption_column]):
                image_path = root / str(image)
                text = "" if text is None else str(text).strip()
                if text:
                    yield Pair(image_path, text)
                else:
                    self._skip(image_path, SkipReason.NO_CAPTION)

    def iter_batches(
        self, preprocess: Callable[[Image.Image], torch.Tensor], batch_size: int = 64, num_workers: int = 2
    ) -> Iterator[PairBatch]:
        """Decode and preprocess images ``batch_size`` pairs at a time.

        The next batch decodes in ``num_workers`` threads while the caller works on the
        current one. Images that are missing or fail to decode are recorded in
        :attr:`skipped`, so a batch can hold fewer than ``batch_size`` pairs; empty
        batches are not yielded.

        Args:
            preprocess: the model's image transform (PIL image to ``(3, H, W)`` tensor).
            batch_size: pairs read per batch.
            num_workers: decoding threads.
        """
        if batch_size < 1 or num_workers < 1:
            raise ValueError(f"batch_size and num_workers must be at least 1, got {batch_size}, {num_workers}")
        with ThreadPoolExecutor(max_workers=num_workers) as pool:
            pending: list[tuple[Pair, Future]] = []
            for pairs in _batched(self.iter_pairs(), batch_size):
                submitted = [(pair, pool.submit(decode_image, pair.image_path, preprocess)) for pair in pairs]
                yield from self._collect(pending)
                pending = submitted
            yield from self._collect(pending)

    def _collect(self, pending: list[tuple[Pair, Future]]) -> Iterator[PairBatch]:
        """Wait for one batch's decodes; record failures and yield the rest (if any)."""
        kept = []
        for pair, future in pending:
            outcome = future.result()
            if isinstance(outcome, SkipReason):
                self._skip(pair.image_path, outcome)
            else:
                kept.append((pair, outcome))
        if kept:
            yield PairBatch(
                torch.stack([image for _, image in kept]),
                [pair.caption for pair, _ in kept],
                [pair.image_path for pair, _ in kept],
            )


def decode_image(path: Path, preprocess: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor | SkipReason:
    """Open, fully decode and preprocess one image; a :class:`SkipReason` if that fails."""
    try:
        with Image.open(path) as image:
            image.load()
            rgb = image.convert("RGB")
    except FileNotFoundError:
        return SkipReason.MISSING
    except (OSError, ValueError, Image.DecompressionBombError):
        return SkipReason.UNREADABLE
    return preprocess(rgb)


def _batched(items: Iterator[Pair], size: int) -> Iterator[list[Pair]]:
    batch: list[Pair] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
