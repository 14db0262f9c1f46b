"""Writing and atomically publishing one immutable version of an index directory."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bayesretrieval import __version__
from bayesretrieval.atomic import publish_directory, write_text_atomic
from bayesretrieval.encoders import file_sha256
from bayesretrieval.posterior import PosteriorPair
from bayesretrieval.store import format as fmt
from bayesretrieval.store.extremes import extremes_by_form
from bayesretrieval.store.format import ItemScalars, Manifest, VarianceSpec
from bayesretrieval.store.leases import collect_garbage
from bayesretrieval.store.vectors import expected_norm, faiss_vectors

if TYPE_CHECKING:
    from bayesretrieval.posterior.lastblock_posterior import LastBlockPosterior

ROW_GROUP_ROWS = 65536
FLAT_MAX_ITEMS = 100_000
IVF_FLAT_MAX_ITEMS = 2_000_000


@dataclass
class ItemMetadata:
    """The file columns of the items table, one row per item.

    Attributes:
        item_ids: ``(N,)`` int64, unique.
        paths: ``N`` POSIX paths relative to the indexed root (or ids as text).
        file_size: ``(N,)`` int64, -1 where unknown (stored as null).
        mtime_ns: ``(N,)`` int64, -1 where unknown (stored as null).
        width: ``(N,)`` int32, -1 where unknown (stored as null).
        height: ``(N,)`` int32, -1 where unknown (stored as null).
    """

    item_ids: np.ndarray
    paths: list
    file_size: np.ndarray
    mtime_ns: np.ndarray
    width: np.ndarray
    height: np.ndarray

    def __len__(self) -> int:
        return int(self.item_ids.shape[0])


@dataclass
class ItemArrays(ItemMetadata):
    """Every column of the items table (any row order; the writer sorts by id).

    Attributes:
        means: ``(N, D)`` float32 unnormalised mean embeddings ``mu = a @ P``.
        scalars: ``(N, 6)`` float64 in :data:`~bayesretrieval.store.format.SCALAR_COLUMNS` order.
        variance_diag: ``(N, D)`` float32 or ``None``.
        variance_lowrank: ``(N, r, D)`` float32 or ``None``.
        activations: ``(N, h)`` float32 pre-projection activations of the image tower (the
            ``a`` of ``scale = a^T A^-1 a``), or ``None`` when the version does not store them.

    The file columns come first, as in :class:`ItemMetadata`.
    """

    means: np.ndarray
    scalars: np.ndarray
    variance_diag: np.ndarray | None = None
    variance_lowrank: np.ndarray | None = None
    activations: np.ndarray | None = None

    def take(self, order: np.ndarray) -> "ItemArrays":
        """Rows in ``order`` (positions), as a new :class:`ItemArrays`."""
        pick = lambda a: None if a is None else a[order]  # noqa: E731
        return ItemArrays(
            self.item_ids[order], [self.paths[i] for i in order], self.file_size[order],
            self.mtime_ns[order], self.width[order], self.height[order], self.means[order],
            self.scalars[order], pick(self.variance_diag), pick(self.variance_lowrank), pick(self.activations),
        )


@dataclass(frozen=True)
class VersionInfo:
    """What the manifest records besides what the arrays give.

    Attributes:
        source_kind: ``"images"`` or ``"embeddings"``.
        source_root: the indexed folder or file.
        model: :meth:`ModelIdentity.to_dict` of the encoder.
        variance: the variance columns carried.
        faiss_factory: factory string, or ``None`` for :func:`default_faiss_factory`.
        next_item_id: the next unused id (at least ``max(item_ids) + 1``).
        lastblock: the last-block posterior the variance columns come from, or ``None``.
    """

    source_kind: str
    source_root: str
    model: dict
    variance: VarianceSpec
    faiss_factory: str | None
    next_item_id: int
    lastblock: LastBlockPosterior | None = None


def default_faiss_factory(num_items: int) -> str:
    """FAISS factory string by collection size: exact ``Flat`` for small ones, then IVF.

    ``nlist`` is the power of two nearest ``4 sqrt(N)``; above two million items the
    lists hold 8-bit scalar-quantised vectors (results are reranked from stored means).
    """
    if num_items <= FLAT_MAX_ITEMS:
        return "Flat"
    nlist = 2 ** round(math.log2(4 * math.sqrt(num_items)))
    return f"IVF{nlist},Flat" if num_items <= IVF_FLAT_MAX_ITEMS else f"IVF{nlist},SQ8"


def empty_faiss_index(factory: str, dim: int) -> faiss.Index:
    """An untrained, empty inner-product ``IDMap2,<factory>`` index (validates the string).

    Raises:
        ValueError: if FAISS cannot parse ``factory`` for dimension ``dim``.
    """
    try:
        return faiss.index_factory(dim, f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ValueError(f"FAISS factory string {factory!r} is not valid for dim {dim}: "
                         f"{str(err).strip().splitlines()[-1]}") from None


def build_faiss_index(vectors: np.ndarray, item_ids: np.ndarray, factory: str) -> faiss.Index:
    """An inner-product ``IDMap2,<factory>`` index over ``vectors`` ``(N, d)`` with ids."""
    index = empty_faiss_index(factory, vectors.shape[1])
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if not index.is_trained:
        try:
            index.train(vectors)
        except RuntimeError as err:
            raise ValueError(f"FAISS factory {factory!r} cannot be trained on {len(vectors)} vectors: "
                             f"{str(err).strip().splitlines()[-1]}") from None
    if len(vectors):
        index.add_with_ids(vectors, np.ascontiguousarray(item_ids, dtype=np.int64))
    return index


def write_version(
    index_dir: str | Path, items: ItemArrays, skipped: pa.Table, posterior: PosteriorPair, info: VersionInfo
) -> Manifest:
    """Write a new version folder and publish it as current, atomically.

    The version is written to a hidden staging folder, fsync'd, renamed into
    ``versions/``, and only then ``manifest.json`` is replaced (write temp + fsync +
    ``os.replace``). Afterwards every version that is neither current nor pinned by a
    live reader's lease is deleted (:mod:`bayesretrieval.store.leases`).

    Returns:
        The published manifest.
    """
    index_dir = Path(index_dir)
    versions = index_dir / fmt.VERSIONS_DIR
    versions.mkdir(parents=True, exist_ok=True)
    name = _next_version_name(index_dir)
    items = items.take(np.argsort(items.item_ids, kind="stable"))
    _check_items(items, posterior, info)
    manifest = publish_directory(
        versions / name, lambda staging: _write_staging(staging, name, items, skipped, posterior, info))
    write_text_atomic(index_dir / fmt.MANIFEST_FILE, manifest.to_json())
    collect_garbage(index_dir, current=name)
    return manifest


def _check_items(items: ItemArrays, posterior: PosteriorPair, info: VersionInfo) -> None:
    n, d = len(items), posterior.image.out_features
    if items.means.shape != (n, d):
        raise ValueError(f"means have shape {items.means.shape}, expected ({n}, {d})")
    if items.scalars.shape != (n, len(fmt.SCALAR_COLUMNS)):
        raise ValueError(f"scalars have shape {items.scalars.shape}, expected ({n}, 6)")
    if n and np.any(np.diff(items.item_ids) == 0):
        raise ValueError("item_ids are not unique")
    if n and info.next_item_id <= int(items.item_ids[-1]):
        raise ValueError(f"next_item_id {info.next_item_id} <= largest item id {items.item_ids[-1]}")
    for label, array, wanted in (
        ("variance_diag", items.variance_diag, info.variance.has_diag),
        ("variance_lowrank", items.variance_lowrank, info.variance.has_lowrank),
    ):
        if (array is not None) != wanted:
            raise ValueError(f"variance {info.variance}: {label} is {'present' if array is not None else 'missing'}")
    if items.variance_lowrank is not None and items.variance_lowrank.shape[1:] != (info.variance.rank, d):
        raise ValueError(
            f"variance_lowrank has shape {items.variance_lowrank.shape[1:]} per item, "
            f"expected ({info.variance.rank}, {d})"
        )
    h = posterior.image.in_features
    if items.activations is not None and items.activations.shape != (n, h):
        raise ValueError(f"activations have shape {items.activations.shape}, expected ({n}, {h})")


def _write_staging(staging, name, items, skipped, posterior, info) -> Manifest:
    trace_image = float(posterior.image.output_cov.trace())
    norms = expected_norm(ItemScalars.from_table(items.scalars), trace_image)
    factory = info.faiss_factory or default_faiss_factory(len(items))
    manifest = Manifest(
        format_version=fmt.FORMAT_VERSION if info.lastblock is None else fmt.LASTBLOCK_FORMAT_VERSION,
        library_version=__version__,
        version=name,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        source_kind=info.source_kind,
        source_root=info.source_root,
        model=info.model,
        posterior=posterior.identity(),
        embed_dim=int(items.means.shape[1]),
        faiss_factory=factory,
        faiss_metric=fmt.FAISS_METRIC,
        item_count=len(items),
        skipped_count=skipped.num_rows,
        next_item_id=int(info.next_item_id),
        variance=str(info.variance),
        traces={"trace_image": trace_image, "trace_text": float(posterior.text.output_cov.trace())},
        extremes=extremes_by_form(items.scalars, trace_image, items.variance_diag, items.variance_lowrank),
        activation_dim=0 if items.activations is None else int(items.activations.shape[1]),
        lastblock=info.lastblock.identity() if info.lastblock is not None else {},
    )
    _write_items_parquet(staging / fmt.ITEMS_FILE, items, manifest)
    np.save(staging / fmt.ITEM_IDS_FILE, items.item_ids.astype(np.int64))
    np.save(staging / fmt.MEANS_FILE, items.means.astype(np.float32))
    np.save(staging / fmt.SCALARS_FILE, items.scalars.astype(np.float64))
    encoded = [p.encode("utf-8") for p in items.paths]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(e) for e in encoded], dtype=np.int64)
    np.save(staging / fmt.PATH_OFFSETS_FILE, offsets)
    (staging / fmt.PATHS_FILE).write_bytes(b"".join(encoded))
    if items.variance_diag is not None:
        np.save(staging / fmt.VARIANCE_DIAG_FILE, items.variance_diag.astype(np.float32))
    if items.variance_lowrank is not None:
        np.save(staging / fmt.VARIANCE_LOWRANK_FILE, items.variance_lowrank.astype(np.float32))
    if items.activations is not None:
        np.save(staging / fmt.ACTIVATIONS_FILE, items.activations.astype(np.float32))
    faiss.write_index(build_faiss_index(faiss_vectors(items.means, norms), items.item_ids, factory),
                      str(staging / fmt.FAISS_FILE))
    posterior.save(staging / fmt.POSTERIOR_DIR)
    if info.lastblock is not None:
        info.lastblock.save(staging / fmt.LASTBLOCK_DIR)
    pq.write_table(skipped.cast(fmt.SKIPPED_SCHEMA), staging / fmt.SKIPPED_FILE, write_page_checksum=True)
    written = [p for p in sorted(staging.rglob("*")) if p.is_file()]
    files = {p.relative_to(staging).as_posix(): file_sha256(p) for p in written}
    sizes = {p.relative_to(staging).as_posix(): p.stat().st_size for p in written}
    manifest = Manifest(**{**manifest.to_dict(), "files": files, "file_sizes": sizes})
    (staging / fmt.MANIFEST_FILE).write_text(manifest.to_json())
    return manifest


def _nullable(values: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    return pa.array(values, type=arrow_type, mask=values < 0)


def _fixed_list(matrix: np.ndarray) -> pa.Array:
    width = int(np.prod(matrix.shape[1:]))
    flat = np.ascontiguousarray(matrix, dtype=np.float32).reshape(len(matrix), width)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), width)


def _write_items_parquet(path: Path, items: ItemArrays, manifest: Manifest) -> None:
    schema = fmt.items_schema(manifest.embed_dim, manifest.variance_spec, manifest.activation_dim)
    schema = schema.with_metadata({fmt.PARQUET_METADATA_KEY: manifest.to_json().encode()})
    with pq.ParquetWriter(path, schema, write_page_checksum=True) as writer:
        for start in range(0, max(len(items), 1), ROW_GROUP_ROWS):
            rows = slice(start, start + ROW_GROUP_ROWS)
            columns = [
                pa.array(items.item_ids[rows], pa.int64()),
                pa.array(items.paths[rows], pa.string()),
                _nullable(items.file_size[rows], pa.int64()),
                _nullable(items.mtime_ns[rows], pa.int64()),
                _nullable(items.width[rows], pa.int32()),
                _nullable(items.height[rows], pa.int32()),
                _fixed_list(items.means[rows]),
                *[pa.array(items.scalars[rows, i], pa.float64()) for i in range(len(fmt.SCALAR_COLUMNS))],
            ]
            if items.variance_diag is not None:
                columns.append(_fixed_list(items.variance_diag[rows]))
            if items.variance_lowrank is not None:
                columns.append(_fixed_list(items.variance_lowrank[rows]))
            if items.activations is not None:
                columns.append(_fixed_list(items.activations[rows]))
            writer.write_table(pa.Table.from_arrays(columns, schema=schema))


def _next_version_name(index_dir: Path) -> str:
    """One past the published version, or past the newest version folder when ``manifest.json`` is unreadable.

    A folder already named so was never published (a build killed before the swap) and is replaced.
    """
    try:
        current = json.loads((index_dir / fmt.MANIFEST_FILE).read_text())["version"]
    except (OSError, ValueError, KeyError, TypeError):
        names = [p.name for p in (index_dir / fmt.VERSIONS_DIR).iterdir()]
        current = max((n for n in names if n[:1] == "v" and n[1:].isdigit()), default=None)
    number = int(current[1:]) + 1 if current and current[1:].isdigit() else 1
    return f"v{number:06d}"
