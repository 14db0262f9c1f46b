"""Reading an index directory: manifest, posterior, FAISS index and O(k) item fetches."""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bayesretrieval.encoders import ModelIdentity, file_sha256
from bayesretrieval.posterior import PosteriorPair
from bayesretrieval.store import format as fmt
from bayesretrieval.store.extremes import CollectionExtremes
from bayesretrieval.store.format import CovarianceForm, ItemScalars, Manifest
from bayesretrieval.store.vectors import expected_norm

OPEN_ATTEMPTS = 3
"""Re-reads of ``manifest.json`` when the version it named was collected meanwhile."""


class IdLookup:
    """Row positions of item ids in a sorted array of unique ids.

    A version whose ids form one contiguous range (every index built in one go, or
    grown without removals) maps an id to its row by subtraction; otherwise by
    binary search.

    Args:
        item_ids: ``(N,)`` int64, sorted and unique (memory-mapped is fine).
    """

    def __init__(self, item_ids: np.ndarray):
        self.item_ids = item_ids
        count = len(item_ids)
        contiguous = count > 0 and int(item_ids[-1]) - int(item_ids[0]) == count - 1
        self.first_id = int(item_ids[0]) if contiguous else None

    def positions(self, item_ids) -> np.ndarray:
        """Row positions of ``item_ids`` (any shape, flattened), ``-1`` where absent."""
        ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        count = len(self.item_ids)
        if count == 0:
            return np.full(len(ids), -1, dtype=np.int64)
        if self.first_id is not None:
            pos = ids - self.first_id
            return np.where((pos >= 0) & (pos < count), pos, -1)
        pos = np.minimum(np.searchsorted(self.item_ids, ids), count - 1)
        return np.where(np.asarray(self.item_ids[pos]) == ids, pos, -1)


@dataclass
class ItemRows:
    """Stored rows of some items, in the order asked for.

    Attributes:
        item_ids: ``(n,)`` int64.
        means: ``(n, D)`` float32 unnormalised means (exactly the encoder's output).
        scalars: the per-item scalars, each ``(n,)``.
        variance_diag: ``(n, D)`` float32 or ``None``.
        variance_lowrank: ``(n, r, D)`` float32 or ``None``.
    """

    item_ids: np.ndarray
    means: np.ndarray
    scalars: ItemScalars
    variance_diag: np.ndarray | None = None
    variance_lowrank: np.ndarray | None = None


class IndexReader:
    """A consistent, read-only view of one published version of an index directory.

    The version is fixed when the reader opens; a concurrent build publishes a new
    version next to it and keeps this one (as ``previous``) until the build after that.

    Args:
        version_dir: a folder under ``INDEX_DIR/versions/``.
        mmap: memory-map the ``.npy`` arrays (default: little memory, pages read on
            demand) instead of loading them into RAM (faster first searches for users
            who have the memory).

    Attributes:
        manifest: the version's :class:`Manifest`.
        version_dir: the folder read.
        item_ids: ``(N,)`` int64, sorted (row order of every array below).
        means: ``(N, D)`` float32 unnormalised means.
        scalars: ``(N, 6)`` float64, columns :data:`SCALAR_COLUMNS`.
        variance_diag: ``(N, D)`` float32 or ``None``.
        variance_lowrank: ``(N, r, D)`` float32 or ``None``.
    """

    def __init__(self, version_dir: str | Path, mmap: bool = True):
        self.version_dir = Path(version_dir)
        manifest_file = self.version_dir / fmt.MANIFEST_FILE
        if not manifest_file.is_file():
            raise FileNotFoundError(f"not an index version folder (no {fmt.MANIFEST_FILE}): {self.version_dir}")
        self.manifest = Manifest.from_dict(json.loads(manifest_file.read_text()))
        mode = "r" if mmap else None
        self.item_ids = np.load(self.version_dir / fmt.ITEM_IDS_FILE, mmap_mode=mode)
        self.means = np.load(self.version_dir / fmt.MEANS_FILE, mmap_mode=mode)
        self.scalars = np.load(self.version_dir / fmt.SCALARS_FILE, mmap_mode=mode)
        self._path_offsets = np.load(self.version_dir / fmt.PATH_OFFSETS_FILE, mmap_mode=mode)
        self._path_bytes = _map_bytes(self.version_dir / fmt.PATHS_FILE)
        spec = self.manifest.variance_spec
        self.variance_diag = (
            np.load(self.version_dir / fmt.VARIANCE_DIAG_FILE, mmap_mode=mode) if spec.has_diag else None
        )
        self.variance_lowrank = (
            np.load(self.version_dir / fmt.VARIANCE_LOWRANK_FILE, mmap_mode=mode) if spec.has_lowrank else None
        )
        if len(self.item_ids) != self.manifest.item_count:
            raise ValueError(
                f"{self.version_dir}: manifest says {self.manifest.item_count} items, "
                f"{fmt.ITEM_IDS_FILE} has {len(self.item_ids)}"
            )

    @classmethod
    def open(cls, index_dir: str | Path, mmap: bool = True) -> "IndexReader":
        """Open the version ``INDEX_DIR/manifest.json`` currently points to.

        Raises:
            FileNotFoundError: if ``index_dir`` holds no published index.
            ValueError: if the format version is not the one this library reads.
        """
        index_dir = Path(index_dir)
        for _ in range(OPEN_ATTEMPTS - 1):
            version_dir = _current_version_dir(index_dir)
            try:
                return cls(version_dir, mmap=mmap)
            except FileNotFoundError:
                if version_dir.is_dir():  # a real problem, not a collected version
                    raise
        return cls(_current_version_dir(index_dir), mmap=mmap)

    def __len__(self) -> int:
        return int(self.manifest.item_count)

    @property
    def embed_dim(self) -> int:
        """``D``."""
        return int(self.manifest.embed_dim)

    @property
    def model(self) -> ModelIdentity:
        """Identity of the encoder the index was built with."""
        return ModelIdentity.from_dict(self.manifest.model)

    @cached_property
    def posterior(self) -> PosteriorPair:
        """The posterior stored with the index (project format)."""
        return PosteriorPair.load(self.version_dir / fmt.POSTERIOR_DIR)

    @cached_property
    def faiss_index(self) -> faiss.Index:
        """The FAISS index (ids are item ids) over expected-norm-scaled means."""
        return faiss.read_index(str(self.version_dir / fmt.FAISS_FILE))

    @property
    def trace_image(self) -> float:
        """``tr Sigma_I`` of the stored posterior."""
        return float(self.manifest.traces["trace_image"])

    def expected_norm(self) -> np.ndarray:
        """``sqrt(|mu|^2 + q tr Sigma_I)`` of every item, ``(N,)``: the norm FAISS's vectors were divided by."""
        return expected_norm(ItemScalars.from_table(self.scalars), self.trace_image)

    def extremes(self, form: CovarianceForm | str = CovarianceForm.KFAC) -> CollectionExtremes:
        """The certificate's collection extremes for covariance form ``form``, from the manifest.

        Raises:
            ValueError: for an unknown form, or a per-item form whose variance columns this version lacks.
        """
        try:
            form = CovarianceForm(form)
        except ValueError:
            raise ValueError(f"unknown covariance form {form!r}; expected one of "
                             f"{[f.value for f in CovarianceForm]}") from None
        if form.value not in self.manifest.extremes:
            raise ValueError(f"covariance form {form.value!r} needs variance columns; index has "
                             f"{self.manifest.variance!r}")
        return CollectionExtremes.from_dict(self.manifest.extremes[form.value])

    @cached_property
    def id_lookup(self) -> IdLookup:
        """Maps item ids to row positions."""
        return IdLookup(self.item_ids)

    def positions(self, item_ids) -> np.ndarray:
        """Row positions of ``item_ids`` ``(k,)`` in the arrays, ``-1`` where absent."""
        return self.id_lookup.positions(item_ids)

    def fetch(self, item_ids, form: CovarianceForm | str | None = None) -> ItemRows:
        """The stored rows of ``item_ids`` (any shape, flattened), one lookup per id.

        Args:
            item_ids: the ids.
            form: read only the covariance columns this form uses (``None``: all stored).

        Raises:
            ValueError: naming the ids that are not in the index (``-1`` included).
        """
        ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        rows = self._rows(ids)
        form = self.manifest.variance_spec.form if form is None else CovarianceForm(form)
        take = lambda array, used: None if array is None or not used else np.asarray(array[rows])  # noqa: E731
        return ItemRows(ids, take(self.means, True), ItemScalars.from_table(take(self.scalars, True)),
                        take(self.variance_diag, form is not CovarianceForm.KFAC),
                        take(self.variance_lowrank, form is CovarianceForm.LOWRANK))

    def fetch_scalars(self, item_ids) -> ItemScalars:
        """The per-item scalars of ``item_ids`` (any shape, flattened), without reading their means.

        Raises:
            ValueError: naming the ids that are not in the index.
        """
        rows = self._rows(np.asarray(item_ids, dtype=np.int64).reshape(-1))
        return ItemScalars.from_table(np.asarray(self.scalars[rows]))

    def paths(self, item_ids) -> list[str]:
        """Paths of ``item_ids`` ``(n,)``: one slice of ``paths.utf8`` each, O(n).

        Raises:
            ValueError: naming the ids that are not in the index.
        """
        rows = self._rows(np.asarray(item_ids, dtype=np.int64).reshape(-1))
        starts = np.asarray(self._path_offsets[rows]).tolist()
        stops = np.asarray(self._path_offsets[rows + 1]).tolist()
        return [self._path_bytes[start:stop].decode("utf-8") for start, stop in zip(starts, stops)]

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        rows = self.positions(ids)
        if np.any(rows < 0):
            raise ValueError(f"item ids not in index {self.manifest.version}: {ids[rows < 0][:10].tolist()}")
        return rows

    def read_items(self, columns: list | None = None, filters=None) -> pa.Table:
        """Read ``items.parquet`` (all or some columns; pyarrow ``filters`` for metadata filters)."""
        return pq.read_table(self.version_dir / fmt.ITEMS_FILE, columns=columns, filters=filters)

    def read_skipped(self) -> pa.Table:
        """The table of skipped inputs: ``path``, ``reason``, ``detail``, ``file_size``, ``mtime_ns``."""
        return pq.read_table(self.version_dir / fmt.SKIPPED_FILE)

    def verify(self) -> int:
        """Check every file of the version against the manifest's sha256 (reads every byte).

        Returns:
            The number of files checked.

        Raises:
            ValueError: naming every file that is missing or whose checksum differs.
        """
        damaged = []
        for name, expected in self.manifest.files.items():
            path = self.version_dir / name
            if not path.is_file():
                damaged.append(f"{name} (missing)")
            elif file_sha256(path) != expected:
                damaged.append(f"{name} (sha256 differs from the manifest)")
        if damaged:
            raise ValueError(f"index version {self.version_dir} is damaged: {', '.join(damaged)}; rebuild it with "
                             "`bayesretrieval build-index SRC INDEX --rebuild`")
        return len(self.manifest.files)


def _current_version_dir(index_dir: Path) -> Path:
    """The version folder ``manifest.json`` names (checking the format version first)."""
    manifest_file = index_dir / fmt.MANIFEST_FILE
    if not manifest_file.is_file():
        raise FileNotFoundError(f"no index at {index_dir} (missing {fmt.MANIFEST_FILE})")
    data = json.loads(manifest_file.read_text())
    Manifest.from_dict(data)
    return index_dir / fmt.VERSIONS_DIR / data["version"]


def _map_bytes(path: Path) -> mmap.mmap | bytes:
    """The file read-only through ``mmap`` (``b""`` when empty: an empty file cannot be mapped)."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return b""
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
