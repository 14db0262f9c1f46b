"""Reading an index directory: manifest, posterior, FAISS index and O(k) item fetches."""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import weakref
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bayesretrieval.encoders import ModelIdentity, file_sha256
from bayesretrieval.posterior import PosteriorPair
from bayesretrieval.store import format as fmt
from bayesretrieval.store.extremes import CollectionExtremes
from bayesretrieval.store.format import CovarianceForm, ItemScalars, Manifest
from bayesretrieval.store.leases import VersionLease
from bayesretrieval.store.vectors import expected_norm

OPEN_ATTEMPTS = 3
"""Re-reads of ``manifest.json`` when the version it named was collected meanwhile."""

REPAIR_HINT = ("`bayesretrieval verify INDEX` checks every file; `bayesretrieval build-index SRC INDEX` "
               "repairs the index")


class IndexDamagedError(ValueError):
    """A file of an index is missing, truncated or unreadable (the message names it)."""


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
        activations: ``(n, h)`` float32 pre-projection activations, or ``None`` (not asked
            for, or not stored).
    """

    item_ids: np.ndarray
    means: np.ndarray
    scalars: ItemScalars
    variance_diag: np.ndarray | None = None
    variance_lowrank: np.ndarray | None = None
    activations: np.ndarray | None = None


class IndexReader:
    """A consistent, read-only view of one published version of an index directory.

    The version is fixed when the reader opens. Opened with :meth:`open`, the reader
    holds a lease on it, so concurrent builds publish new versions next to it and keep
    this one until the reader is closed. Opening checks every file's presence and size
    and the array headers; a damaged file raises :class:`IndexDamagedError` naming it.

    Args:
        version_dir: a folder under ``INDEX_DIR/versions/``.
        mmap: memory-map the ``.npy`` arrays (default: little memory, pages read on
            demand) instead of loading them into RAM (faster first searches for users
            who have the memory).

    Attributes:
        manifest: the version's :class:`Manifest`.
        version_dir: the folder read.
        mmap: whether the arrays are memory-mapped.
        item_ids: ``(N,)`` int64, sorted (row order of every array below).
        means: ``(N, D)`` float32 unnormalised means.
        scalars: ``(N, 6)`` float64, columns :data:`SCALAR_COLUMNS`.
        variance_diag: ``(N, D)`` float32 or ``None``.
        variance_lowrank: ``(N, r, D)`` float32 or ``None``.
        activations: ``(N, h)`` float32 pre-projection activations (``activations.npy``), or
            ``None`` when the version does not store them.
    """

    def __init__(self, version_dir: str | Path, mmap: bool = True):
        self.version_dir, self.mmap = Path(version_dir), mmap
        manifest_file = self.version_dir / fmt.MANIFEST_FILE
        if not manifest_file.is_file():
            raise FileNotFoundError(f"not an index version folder (no {fmt.MANIFEST_FILE}): {self.version_dir}")
        self.manifest = read_manifest(manifest_file)
        self._lease: VersionLease | None = None
        self._check_files()
        mode = "r" if mmap else None
        count, dim, spec = self.manifest.item_count, self.manifest.embed_dim, self.manifest.variance_spec
        self.item_ids = self._array(fmt.ITEM_IDS_FILE, mode, (count,))
        self.means = self._array(fmt.MEANS_FILE, mode, (count, dim))
        self.scalars = self._array(fmt.SCALARS_FILE, mode, (count, len(fmt.SCALAR_COLUMNS)))
        self._path_offsets = self._array(fmt.PATH_OFFSETS_FILE, mode, (count + 1,))
        self._path_bytes = _map_bytes(self.version_dir / fmt.PATHS_FILE)
        if len(self._path_bytes) != int(self._path_offsets[-1]):
            raise self._damaged(fmt.PATHS_FILE, f"{len(self._path_bytes)} bytes, offsets end at "
                                                f"{int(self._path_offsets[-1])}")
        self.variance_diag = self._array(fmt.VARIANCE_DIAG_FILE, mode, (count, dim)) if spec.has_diag else None
        self.variance_lowrank = (self._array(fmt.VARIANCE_LOWRANK_FILE, mode, (count, spec.rank, dim))
                                 if spec.has_lowrank else None)
        hidden = self.manifest.activation_dim
        self.activations = self._array(fmt.ACTIVATIONS_FILE, mode, (count, hidden)) if hidden else None
        self._check_parquet_rows(fmt.ITEMS_FILE, count)
        self._check_parquet_rows(fmt.SKIPPED_FILE, self.manifest.skipped_count)

    def _damaged(self, name: str, problem: str) -> "IndexDamagedError":
        return IndexDamagedError(f"index file {self.version_dir / name} is damaged ({problem}); {REPAIR_HINT}")

    def _check_files(self) -> None:
        """Every file the manifest lists is present, with the size it was written with."""
        problems = []
        for name in self.manifest.files:
            path = self.version_dir / name
            expected = self.manifest.file_sizes.get(name)
            if not path.is_file():
                problems.append(f"{path} (missing)")
            elif expected is not None and path.stat().st_size != expected:
                problems.append(f"{path} ({path.stat().st_size} bytes, written with {expected})")
        if problems:
            raise IndexDamagedError(f"index version {self.version_dir} is damaged: {', '.join(problems)}; "
                                    f"{REPAIR_HINT}")

    def _array(self, name: str, mode: str | None, shape: tuple) -> np.ndarray:
        """``np.load`` of one ``.npy`` file whose header must give ``shape``."""
        try:
            array = np.load(self.version_dir / name, mmap_mode=mode)
        except (OSError, ValueError, EOFError) as err:
            raise self._damaged(name, str(err).strip() or type(err).__name__) from None
        if array.shape != shape:
            raise self._damaged(name, f"shape {array.shape}, the manifest says {shape}")
        return array

    def _check_parquet_rows(self, name: str, rows: int) -> None:
        with self._reading(name):
            found = pq.ParquetFile(self.version_dir / name).metadata.num_rows
        if found != rows:
            raise self._damaged(name, f"{found} rows, the manifest says {rows}")

    @contextlib.contextmanager
    def _reading(self, name: str) -> Iterator[None]:
        """Turn a failed read of ``name`` into an :class:`IndexDamagedError` naming the file."""
        try:
            yield
        except (OSError, pa.ArrowException, RuntimeError, EOFError) as err:
            text = str(err).strip()
            raise self._damaged(name, text.splitlines()[-1] if text else type(err).__name__) from None

    @classmethod
    def open(cls, index_dir: str | Path, mmap: bool = True) -> "IndexReader":
        """Open the version ``INDEX_DIR/manifest.json`` currently points to, and pin it.

        The reader holds a lease on its version (:mod:`bayesretrieval.store.leases`), so
        builds that publish newer versions keep this one on disk until :meth:`close` (or
        until the reader is garbage-collected or its process ends).

        Raises:
            FileNotFoundError: if ``index_dir`` holds no published index.
            IndexDamagedError: naming a missing, truncated or unreadable file.
            ValueError: if the format version is not the one this library reads.
        """
        index_dir = Path(index_dir)
        for _ in range(OPEN_ATTEMPTS):
            version = current_version(index_dir)
            lease = VersionLease.acquire(index_dir, version)
            if lease is None:  # collected between reading manifest.json and pinning it
                continue
            try:
                reader = cls(index_dir / fmt.VERSIONS_DIR / version, mmap=mmap)
            except BaseException:
                lease.release()
                raise
            reader._lease = lease
            weakref.finalize(reader, lease.release)
            return reader
        raise IndexDamagedError(f"{index_dir / fmt.MANIFEST_FILE} names version {version}, but "
                                f"{index_dir / fmt.VERSIONS_DIR / version} does not exist; {REPAIR_HINT}")

    def close(self) -> None:
        """Release the lease on this version (idempotent); arrays already read stay readable."""
        if self._lease is not None:
            self._lease.release()

    def __enter__(self) -> "IndexReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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
        with self._reading(fmt.POSTERIOR_DIR):
            try:
                return PosteriorPair.load(self.version_dir / fmt.POSTERIOR_DIR)
            except (ValueError, KeyError) as err:  # content that does not match its fingerprint
                raise OSError(str(err)) from None

    @cached_property
    def faiss_index(self) -> faiss.Index:
        """The FAISS index (ids are item ids) over expected-norm-scaled means."""
        with self._reading(fmt.FAISS_FILE):
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

    def fetch(self, item_ids, form: CovarianceForm | str | None = None, activations: bool = False) -> ItemRows:
        """The stored rows of ``item_ids`` (any shape, flattened), one lookup per id.

        Args:
            item_ids: the ids.
            form: read only the covariance columns this form uses (``None``: all stored).
            activations: also read the stored activations (``None`` in the rows when the
                version has none).

        Raises:
            ValueError: naming the ids that are not in the index (``-1`` included).
        """
        ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        rows = self._rows(ids)
        form = self.manifest.variance_spec.form if form is None else CovarianceForm(form)
        take = lambda array, used: None if array is None or not used else np.asarray(array[rows])  # noqa: E731
        return ItemRows(ids, take(self.means, True), ItemScalars.from_table(take(self.scalars, True)),
                        take(self.variance_diag, form is not CovarianceForm.KFAC),
                        take(self.variance_lowrank, form is CovarianceForm.LOWRANK),
                        take(self.activations, activations))

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
        with self._reading(fmt.ITEMS_FILE):
            return pq.read_table(self.version_dir / fmt.ITEMS_FILE, columns=columns, filters=filters,
                                 page_checksum_verification=True)

    def read_skipped(self) -> pa.Table:
        """The table of skipped inputs: ``path``, ``reason``, ``detail``, ``file_size``, ``mtime_ns``."""
        with self._reading(fmt.SKIPPED_FILE):
            return pq.read_table(self.version_dir / fmt.SKIPPED_FILE, page_checksum_verification=True)

    def verify(self) -> int:
        """Check every file of the version against the manifest's sha256 (reads every byte).

        Returns:
            The number of files checked.

        Raises:
            IndexDamagedError: naming every file that is missing or whose checksum differs.
        """
        verify_version(self.version_dir)
        return len(self.manifest.files)


def verify_version(version_dir: Path) -> Manifest:
    """Check every file of a version folder against its manifest's sha256, without opening it.

    Returns:
        The version's manifest.

    Raises:
        IndexDamagedError: naming every file that is missing or whose checksum differs.
    """
    manifest = read_manifest(Path(version_dir) / fmt.MANIFEST_FILE)
    damaged = damaged_files(version_dir, manifest)
    if damaged:
        raise IndexDamagedError(f"index version {version_dir} is damaged: "
                                f"{', '.join(f'{n} ({why})' for n, why in damaged.items())}; {REPAIR_HINT}")
    return manifest


def damaged_files(version_dir: Path, manifest: Manifest) -> dict[str, str]:
    """The files of a version that are missing or whose sha256 differs from ``manifest``'s, with why."""
    damaged = {}
    for name, expected in manifest.files.items():
        path = Path(version_dir) / name
        if not path.is_file():
            damaged[name] = "missing"
        elif file_sha256(path) != expected:
            damaged[name] = "sha256 differs from the manifest"
    return damaged


def read_manifest(path: Path) -> Manifest:
    """Parse a ``manifest.json``.

    Raises:
        FileNotFoundError: if it does not exist.
        IndexDamagedError: naming the file when it is not a readable manifest.
        ValueError: for another format version.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as err:
        raise IndexDamagedError(f"index manifest {path} is damaged ({err}); {REPAIR_HINT}") from None
    if not isinstance(data, dict):
        raise IndexDamagedError(f"index manifest {path} is damaged (not a JSON object); {REPAIR_HINT}")
    try:
        return Manifest.from_dict(data)
    except TypeError as err:
        raise IndexDamagedError(f"index manifest {path} is damaged ({err}); {REPAIR_HINT}") from None


def current_version(index_dir: Path) -> str:
    """The version ``INDEX_DIR/manifest.json`` names (checking the file first).

    Raises:
        FileNotFoundError: if there is no ``manifest.json``.
        IndexDamagedError: if it cannot be read.
    """
    manifest_file = Path(index_dir) / fmt.MANIFEST_FILE
    if not manifest_file.is_file():
        raise FileNotFoundError(f"no index at {index_dir} (missing {fmt.MANIFEST_FILE})")
    return read_manifest(manifest_file).version


def _map_bytes(path: Path) -> mmap.mmap | bytes:
    """The file read-only through ``mmap`` (``b""`` when empty: an empty file cannot be mapped)."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return b""
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
