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
from bayesretrieval.store.extremes import DIAG, KFAC, LOWRANK, CollectionBounds, extremes_by_form, item_covariance_traces
from bayesretrieval.store.format import Manifest
from bayesretrieval.store.vectors import expected_norm, means_from_vectors

OPEN_ATTEMPTS = 3
"""Re-reads of ``manifest.json`` when the version it named was collected meanwhile."""


class IndexedMeans:
    """Stored means of given rows, rebuilt bit for bit from the FAISS index's own vectors.

    FAISS holds ``x = fl32(mu / s)`` and the stored means are exactly ``fl32(s x)``
    (:mod:`bayesretrieval.store.vectors`). Right after a search, the candidates' vectors
    sit in the lists FAISS has just scanned, while their rows of ``means.npy`` are random
    reads of a large file; on some machines this is the cheaper way to a candidate's mean.

    Args:
        index: the version's ``IDMap2`` index over a ``Flat`` or ``IVF*,Flat`` index,
            added in row order.
        trace_image: ``tr Sigma_I``.
    """

    def __init__(self, index: faiss.Index, trace_image: float):
        self.index, self.trace_image = index, trace_image  # the IDMap2 owns ``storage``: keep it alive
        self.storage = faiss.downcast_index(index.index)
        if isinstance(self.storage, faiss.IndexIVF) and self.storage.direct_map.no():
            self.storage.make_direct_map()  # versions written before the map was stored

    @staticmethod
    def supports(index: faiss.Index) -> bool:
        """Whether ``index`` stores its vectors exactly (``IDMap2`` over ``Flat`` or ``IVF*,Flat``)."""
        if not isinstance(index, faiss.IndexIDMap2):
            return False
        return isinstance(faiss.downcast_index(index.index), (faiss.IndexFlat, faiss.IndexIVFFlat))

    def __call__(self, rows: np.ndarray, scalars: np.ndarray) -> np.ndarray:
        """Means ``(n, D)`` float32 of the rows ``rows`` ``(n,)``, whose stored scalars are ``scalars`` ``(n, 6)``."""
        vectors = self.storage.reconstruct_batch(np.ascontiguousarray(rows, dtype=np.int64))
        return means_from_vectors(vectors, expected_norm(scalars, self.trace_image), out=vectors)


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
class FetchedItems:
    """Rows of the index for requested ids, in the order asked for.

    Attributes:
        item_ids: ``(k,)`` int64.
        means: ``(k, D)`` float32 unnormalised means.
        scalars: ``(k, 6)`` float64 in :data:`SCALAR_COLUMNS` order.
        paths: ``k`` paths relative to the indexed root.
        variance_diag: ``(k, D)`` float32 or ``None``.
        variance_lowrank: ``(k, r, D)`` float32 or ``None``.
    """

    item_ids: np.ndarray
    means: np.ndarray
    scalars: np.ndarray
    paths: list
    variance_diag: np.ndarray | None = None
    variance_lowrank: np.ndarray | None = None

    def scalar(self, name: str) -> np.ndarray:
        """One scalar column by name (``"scale"``, ``"quad_text"``, ...), shape ``(k,)``."""
        if name not in fmt.SCALAR_COLUMNS:
            raise ValueError(f"unknown scalar {name!r}; expected one of {fmt.SCALAR_COLUMNS}")
        return self.scalars[:, fmt.SCALAR_COLUMNS.index(name)]

    def scalar_dict(self) -> dict:
        """All scalar columns as ``{name: (k,) array}``."""
        return {name: self.scalars[:, i] for i, name in enumerate(fmt.SCALAR_COLUMNS)}


class IndexReader:
    """A consistent, read-only view of one published version of an index directory.

    The version is fixed when the reader opens; a concurrent build publishes a new
    version next to it and keeps this one (as ``previous``) until the build after that.

    Args:
        version_dir: a folder under ``INDEX_DIR/versions/``.
        mmap: memory-map the ``.npy`` arrays (default) instead of loading them.

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
        self.variance_diag = np.load(self.version_dir / fmt.VARIANCE_DIAG_FILE, mmap_mode=mode) if spec.has_diag else None
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

    def expected_norm(self, scalars: np.ndarray | None = None) -> np.ndarray:
        """``sqrt(|mu|^2 + q tr Sigma_I)`` for ``scalars`` ``(k, 6)`` (all items by default)."""
        return expected_norm(self.scalars if scalars is None else scalars, self.trace_image)

    @cached_property
    def indexed_means(self) -> IndexedMeans | None:
        """The stored means from the FAISS index, or ``None`` where it cannot reproduce them.

        ``None`` for lossy FAISS storage (``SQ8``, ...) and for versions written before
        the means were made invertible (:data:`~bayesretrieval.store.format.FAISS_VECTORS_APPROXIMATE`).

        Raises:
            ValueError: if the FAISS index's ids are not ``item_ids.npy`` in row order (a corrupt version).
        """
        index = self.faiss_index
        if self.manifest.faiss_vectors != fmt.FAISS_VECTORS or not IndexedMeans.supports(index):
            return None
        if not np.array_equal(faiss.vector_to_array(index.id_map), self.item_ids):
            raise ValueError(f"{self.version_dir}: the FAISS index's ids are not {fmt.ITEM_IDS_FILE} in row order")
        return IndexedMeans(index, self.trace_image)

    def collection_bounds(self, form: str = KFAC) -> CollectionBounds:
        """The certificate's collection extremes for covariance form ``form`` (``kfac``, ``diag``, ``lowrank``).

        Read from the manifest; computed from the arrays for versions written before
        they were stored there.

        Raises:
            ValueError: for a per-item form whose variance columns this version lacks.
        """
        if form not in (KFAC, DIAG, LOWRANK):
            raise ValueError(f"unknown covariance form {form!r}; expected {KFAC!r}, {DIAG!r} or {LOWRANK!r}")
        extremes = self.manifest.stats.get("ratio_extremes") or self._extremes_from_arrays
        if form not in extremes:
            raise ValueError(f"covariance form {form!r} needs variance columns; index has {self.manifest.variance!r}")
        return CollectionBounds.from_dict(extremes[form])

    @cached_property
    def _extremes_from_arrays(self) -> dict[str, dict]:
        traces = item_covariance_traces(self.variance_diag, self.variance_lowrank)
        return extremes_by_form(self.scalars, self.trace_image, traces)

    @cached_property
    def id_lookup(self) -> IdLookup:
        """Maps item ids to row positions."""
        return IdLookup(self.item_ids)

    def positions(self, item_ids) -> np.ndarray:
        """Row positions of ``item_ids`` ``(k,)`` in the arrays, ``-1`` where absent."""
        return self.id_lookup.positions(item_ids)

    def fetch(self, item_ids) -> FetchedItems:
        """Means, scalars, paths (and variance columns) of ``item_ids`` ``(k,)`` in O(k log N).

        Raises:
            ValueError: naming the ids that are not in the index (``-1`` included).
        """
        ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        pos = self.positions(ids)
        if np.any(pos < 0):
            missing = ids[pos < 0][:10].tolist()
            raise ValueError(f"item ids not in index {self.manifest.version}: {missing}")
        order = np.argsort(pos, kind="stable")
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        sorted_pos = pos[order]
        gather = lambda a: None if a is None else np.asarray(a[sorted_pos])[inverse]  # noqa: E731
        return FetchedItems(
            ids.copy(), gather(self.means), gather(self.scalars), self.paths(pos),
            gather(self.variance_diag), gather(self.variance_lowrank),
        )

    def paths(self, positions: np.ndarray) -> list[str]:
        """Paths of the rows ``positions`` ``(k,)``: one slice of ``paths.utf8`` each, O(k)."""
        positions = np.asarray(positions, dtype=np.int64)
        starts = np.asarray(self._path_offsets[positions]).tolist()
        stops = np.asarray(self._path_offsets[positions + 1]).tolist()
        return [self._path_bytes[start:stop].decode("utf-8") for start, stop in zip(starts, stops)]

    def read_items(self, columns: list | None = None, filters=None) -> pa.Table:
        """Read ``items.parquet`` (all or some columns; pyarrow ``filters`` for metadata filters)."""
        return pq.read_table(self.version_dir / fmt.ITEMS_FILE, columns=columns, filters=filters)

    def read_skipped(self) -> pa.Table:
        """The table of skipped inputs: ``path``, ``reason``, ``detail``, ``file_size``, ``mtime_ns``."""
        return pq.read_table(self.version_dir / fmt.SKIPPED_FILE)

    def verify(self) -> None:
        """Check every file of the version against the manifest's sha256.

        Raises:
            ValueError: naming the first file whose checksum differs.
        """
        for name, expected in self.manifest.files.items():
            got = file_sha256(self.version_dir / name)
            if got != expected:
                raise ValueError(f"{self.version_dir / name}: sha256 {got}, manifest says {expected}")


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
