"""Indexing precomputed embeddings (any probabilistic embedding model) instead of images.

The input is a Parquet table with one row per item:

- an id column (``item_id`` or ``id``, int64) and/or a path column (``path`` or
  ``image_path``, string); without ids, ids are assigned per path (stable across
  rebuilds, as for images);
- the mean embedding (``embedding``, ``mean`` or ``mu``: a list of D floats);
- optionally a per-item covariance: ``variance_diag`` (or ``variance``, D floats) and/or
  ``variance_lowrank`` (r*D floats row-major, or r lists of D floats), meaning
  ``Cov = L^T L + diag(variance_diag)`` (what PCME++, ProbVLM or ProLIP give);
- optionally the Kronecker scale ``scale`` (q) or the pre-projection ``activation`` (q is
  then ``a^T A^-1 a``); otherwise q = 0 and the item's uncertainty is in the variance columns.
  With ``store_activations`` (``--store-activations``) the ``activation`` column is stored
  as the index's ``activations.npy``; a file without it is refused.

Rows with a wrong length or non-finite values are skipped as ``bad_embedding``; repeated
ids or paths as ``duplicate_id``.

Both engines run the same two steps: :func:`check_rows` validates a block of rows and
computes their posterior scalars (the whole file in this process, or each block in a Ray
Data task with ``engine="ray"``), then :func:`embedding_table` keeps each id or path's
first valid row on the driver, which assigns ids and publishes as for images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bayesretrieval.encoders import ModelIdentity
from bayesretrieval.indexing.assemble import skipped_table
from bayesretrieval.indexing.existing import index_lock, previous_items
from bayesretrieval.indexing.pipeline import BuildConfig, BuildReport
from bayesretrieval.indexing.scalars import ScalarComputer
from bayesretrieval.options import BuildEngine
from bayesretrieval.posterior import PosteriorPair, posterior_for_model
from bayesretrieval.skips import SkipReason
from bayesretrieval.store import CovarianceForm, ItemArrays, VarianceSpec, VersionInfo, write_version

COLUMN_NAMES = {
    "item_id": ("item_id", "id"),
    "path": ("path", "image_path"),
    "embedding": ("embedding", "mean", "mu"),
    "variance_diag": ("variance_diag", "variance"),
    "variance_lowrank": ("variance_lowrank",),
    "scale": ("scale",),
    "activation": ("activation",),
}
"""Accepted input column names per role, first match wins."""


@dataclass
class EmbeddingTable:
    """Validated rows of a precomputed-embeddings file.

    Attributes:
        explicit_ids: ``(n,)`` int64 ids from the file, or ``None`` (ids by path).
        paths: ``n`` paths (the id as text when the file has no paths).
        means: ``(n, D)`` float32.
        scalars: ``(n, 6)`` float64 posterior scalars (:data:`~bayesretrieval.store.SCALAR_COLUMNS`;
            the scale ``q`` is zero when the file has neither scale nor activation).
        variance: the variance columns found.
        variance_diag: ``(n, D)`` float32 or ``None``.
        variance_lowrank: ``(n, r, D)`` float32 or ``None``.
        skipped: skip rows (dicts).
        activations: ``(n, h)`` float32 from the ``activation`` column, or ``None``.
    """

    explicit_ids: np.ndarray | None
    paths: list
    means: np.ndarray
    scalars: np.ndarray
    variance: VarianceSpec
    variance_diag: np.ndarray | None
    variance_lowrank: np.ndarray | None
    skipped: list
    activations: np.ndarray | None = None


@dataclass(frozen=True)
class EmbeddingColumns:
    """Which column of an embeddings file plays each role of :data:`COLUMN_NAMES`, and the low-rank rank.

    Attributes:
        names: role -> column name, or ``None`` when the file lacks the role.
        rank: rows per item of ``variance_lowrank`` (0 without it).
        dim: the posterior's ``D``.
    """

    names: dict
    rank: int
    dim: int

    @property
    def variance(self) -> VarianceSpec:
        """The variance columns the file provides."""
        if self.rank:
            return VarianceSpec(CovarianceForm.LOWRANK, self.rank)
        return VarianceSpec(CovarianceForm.DIAG if self.names["variance_diag"] else CovarianceForm.KFAC)


def _find(names: list, role: str) -> str | None:
    return next((n for n in COLUMN_NAMES[role] if n in names), None)


def embedding_columns(path: str | Path, posterior: PosteriorPair) -> EmbeddingColumns:
    """Find the roles' columns in ``path``'s schema, and the low-rank rank from its first non-null value.

    Raises:
        ValueError: if the id/path or embedding column is missing, or the low-rank size
            is not a multiple of ``D``.
    """
    file = pq.ParquetFile(path)
    names = file.schema_arrow.names
    cols = {role: _find(names, role) for role in COLUMN_NAMES}
    if cols["embedding"] is None or (cols["item_id"] is None and cols["path"] is None):
        raise ValueError(
            f"{path}: expected an embedding column ({', '.join(COLUMN_NAMES['embedding'])}) and an id "
            f"or path column ({', '.join(COLUMN_NAMES['item_id'] + COLUMN_NAMES['path'])}); got {names}"
        )
    dim, rank = posterior.image.out_features, 0
    if cols["variance_lowrank"]:
        for group in range(file.num_row_groups):
            values = file.read_row_group(group, columns=[cols["variance_lowrank"]]).column(0).to_pylist()
            rank = _lowrank_rank(values, dim)
            if rank:
                break
    return EmbeddingColumns(cols, rank, dim)


def read_embeddings(path: str | Path, posterior: PosteriorPair) -> EmbeddingTable:
    """Read and validate a precomputed-embeddings Parquet for a posterior of dimension D, in this process.

    Raises:
        ValueError: if the id/path or embedding column is missing.
    """
    columns = embedding_columns(path, posterior)
    return embedding_table(check_rows(pq.read_table(path), columns, posterior), columns)


def check_rows(table: pa.Table, columns: EmbeddingColumns, posterior: PosteriorPair) -> dict:
    """Validate one block of rows and compute their posterior scalars (a Ray task, or the whole file).

    Returns:
        Numpy columns, one row per input row: ``key`` (the id, or the path, as text) and
        ``has_key`` (whether the row has one), ``path``,
        ``reason`` and ``detail`` (``""`` for a valid row), ``embedding`` ``(n, D)``,
        ``scalars`` ``(n, 6)`` and, when the file has them, ``variance_diag`` ``(n, D)``,
        ``variance_lowrank`` ``(n, r * D)`` and ``activation`` ``(n, h)``; numbers are
        zeros for invalid rows. Duplicates are left to :func:`embedding_table`.
    """
    cols, dim, rank = columns.names, columns.dim, columns.rank
    rows = {role: table.column(c).to_pylist() if c else None for role, c in cols.items()}
    ids = rows["item_id"]
    paths = rows["path"] if rows["path"] is not None else [str(i) for i in ids]
    problems = [_row_problem(rows, i, dim, rank, posterior.image.in_features) for i in range(len(table))]
    ok = np.asarray([problem is None for problem in problems], bool)
    sizes = {"embedding": dim, "variance_diag": dim, "variance_lowrank": rank * dim,
             "activation": posterior.image.in_features, "scale": 1}
    arrays = {role: _dense(rows[role], ok, size) for role, size in sizes.items() if rows[role] is not None}
    scales = arrays.get("scale", np.zeros((len(table), 1)))[:, 0]
    if "scale" not in arrays and "activation" in arrays:
        scales = posterior.image.activation_scale(arrays["activation"]).numpy()
    means = arrays["embedding"].astype(np.float32)
    scalars = ScalarComputer(posterior).from_scales(torch.from_numpy(means), torch.from_numpy(scales)).scalars
    keys = ids if ids is not None else paths
    out = {"key": np.asarray(["" if key is None else str(key) for key in keys], dtype=object),
           "has_key": np.asarray([key is not None for key in keys], bool),
           "path": np.asarray([str(p) for p in paths], dtype=object),
           "reason": np.asarray(["" if p is None else p[0].value for p in problems], dtype=object),
           "detail": np.asarray(["" if p is None else p[1] for p in problems], dtype=object),
           "scalars": np.where(ok[:, None], scalars, 0.0)}
    out.update({role: arrays[role].astype(np.float32) for role in ("embedding", "variance_diag", "variance_lowrank",
                                                                   "activation") if role in arrays})
    return out


def _dense(values: list, ok: np.ndarray, size: int) -> np.ndarray:
    """``(n, size)`` float64 of the valid rows' values, zeros elsewhere."""
    out = np.zeros((len(values), size))
    for i in np.flatnonzero(ok):
        out[i] = np.asarray(values[i], dtype=np.float64).reshape(-1)
    return out


def embedding_table(rows: dict, columns: EmbeddingColumns) -> EmbeddingTable:
    """The valid rows of :func:`check_rows` (all blocks, in file order), each id or path's first one kept.

    A later row with an id or path already kept, or with none, is skipped as ``duplicate_id``.
    """
    keep, skipped, seen = [], [], set()
    key_column = columns.names["item_id"] or columns.names["path"]
    for i, key in enumerate(rows["key"]):
        problem = (rows["reason"][i], rows["detail"][i]) if rows["reason"][i] else None
        if problem is None and (not rows["has_key"][i] or key in seen):
            shown = _key_value(key, columns) if rows["has_key"][i] else None
            problem = (SkipReason.DUPLICATE_ID.value, f"{key_column} {shown!r} repeated or missing")
        if problem is not None:
            skipped.append({"path": str(rows["path"][i]), "reason": problem[0], "detail": problem[1]})
            continue
        seen.add(key)
        keep.append(i)
    keep = np.asarray(keep, np.int64)
    pick = lambda role: rows[role][keep] if role in rows else None  # noqa: E731
    diag, lowrank = pick("variance_diag"), pick("variance_lowrank")
    if lowrank is not None:
        lowrank = lowrank.reshape(len(keep), columns.rank, columns.dim)
        diag = np.zeros((len(keep), columns.dim), np.float32) if diag is None else diag
    return EmbeddingTable(
        np.asarray([int(key) for key in rows["key"][keep]], np.int64) if columns.names["item_id"] else None,
        [str(p) for p in rows["path"][keep]], pick("embedding"), pick("scalars").astype(np.float64),
        columns.variance, diag, lowrank, skipped, pick("activation"),
    )


def _key_value(key: str, columns: EmbeddingColumns) -> int | str:
    """A row's id (an int) or path, back from the text :func:`check_rows` carries it as."""
    return int(key) if columns.names["item_id"] else key


def _lowrank_rank(values: list | None, dim: int) -> int:
    first = next((v for v in values or () if v is not None), None)
    if first is None:
        return 0
    size = int(np.asarray(first, dtype=np.float64).size)
    if size % dim:
        raise ValueError(f"variance_lowrank has {size} values per row, not a multiple of D={dim}")
    return size // dim


def _row_problem(rows: dict, i: int, dim: int, rank: int, width: int):
    sizes = {"embedding": dim, "variance_diag": dim, "variance_lowrank": rank * dim, "scale": 1, "activation": width}
    for role, size in sizes.items():
        if rows[role] is None:
            continue
        value = rows[role][i]
        array = np.asarray(value if value is not None else [], dtype=np.float64).reshape(-1)
        if array.size != size or not np.all(np.isfinite(array)):
            return SkipReason.BAD_EMBEDDING, f"{role}: {array.size} values (expected {size}) or non-finite"
        if role in ("variance_diag", "scale") and np.any(array < 0):
            return SkipReason.BAD_EMBEDDING, f"{role}: negative values"
    return None


def build_index_from_embeddings(
    embeddings_file: str | Path,
    index_dir: str | Path,
    posterior: PosteriorPair,
    model: ModelIdentity,
    config: BuildConfig | None = None,
) -> BuildReport:
    """Index precomputed embeddings; the result reads exactly like an image index.

    Args:
        embeddings_file: the Parquet table (see the module docstring).
        index_dir: the index directory.
        posterior: the posterior pair (its ``D`` must match; the text side serves queries).
        model: the open_clip model whose text tower answers queries.
        config: ``faiss_factory``, ``rebuild`` and ``store_activations`` apply; the variance columns come from
            the file, so ``config.variance`` must be ``kfac`` or equal to them.

    Returns:
        The :class:`BuildReport` (``encoded`` counts the rows read).
    """
    config = config or BuildConfig()
    started = time.perf_counter()
    posterior = posterior_for_model(posterior, model, config.force_posterior)
    data = (read_embeddings_with_ray(embeddings_file, posterior, config.ray_address)
            if config.engine is BuildEngine.RAY else read_embeddings(embeddings_file, posterior))
    if config.store_activations and data.activations is None:
        raise ValueError(f"--store-activations needs an 'activation' column in {embeddings_file} "
                         f"({posterior.image.in_features} floats per row, the image tower's pre-projection output)")
    if config.variance.form is not CovarianceForm.KFAC and config.variance != data.variance:
        raise ValueError(f"variance {config.variance} requested, {embeddings_file} has {data.variance}")
    with index_lock(index_dir):
        previous = previous_items(index_dir, model, posterior, data.variance, "embeddings", config.rebuild,
                                  config.store_activations)
        ids, next_id = _assign_ids(data, previous)
        unknown = np.full(len(ids), -1)
        items = ItemArrays(ids, data.paths, unknown, unknown, unknown.astype(np.int32), unknown.astype(np.int32),
                           data.means, data.scalars, data.variance_diag, data.variance_lowrank,
                           data.activations if config.store_activations else None)
        info = VersionInfo("embeddings", str(Path(embeddings_file).resolve()), model.to_dict(), data.variance,
                           config.faiss_factory, next_id)
        manifest = write_version(index_dir, items, skipped_table(data.skipped), posterior, info)
    removed = len(set(previous.paths) - set(data.paths))
    reasons = {}
    for row in data.skipped:
        reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
    return BuildReport(manifest, True, len(ids), 0, 0, removed, reasons, time.perf_counter() - started)


def read_embeddings_with_ray(path: str | Path, posterior: PosteriorPair, ray_address: str | None = None
                             ) -> EmbeddingTable:
    """:func:`read_embeddings` with the rows checked and their scalars computed in Ray Data tasks.

    The file is read by Ray (the path must be visible to every node); the driver keeps
    each id or path's first valid row, in file order.
    """
    from bayesretrieval.indexing.ray_engine import check_rows_with_ray

    columns = embedding_columns(path, posterior)
    return embedding_table(check_rows_with_ray(path, columns, posterior, ray_address), columns)


def _assign_ids(data: EmbeddingTable, previous) -> tuple[np.ndarray, int]:
    if data.explicit_ids is not None:
        top = int(data.explicit_ids.max()) + 1 if len(data.explicit_ids) else 0
        return data.explicit_ids, max(top, previous.next_item_id)
    known = dict(zip(previous.paths, previous.item_ids.tolist()))
    next_id = int(previous.next_item_id)
    ids = np.empty(len(data.paths), np.int64)
    for i in np.argsort(np.asarray(data.paths, dtype=object), kind="stable"):
        path = data.paths[i]
        if path in known:
            ids[i] = known[path]
        else:
            ids[i], next_id = next_id, next_id + 1
    return ids, next_id
