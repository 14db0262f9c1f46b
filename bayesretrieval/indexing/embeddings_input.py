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
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from bayesretrieval.encoders import ModelIdentity
from bayesretrieval.indexing.assemble import skipped_table
from bayesretrieval.indexing.existing import index_lock, previous_items
from bayesretrieval.indexing.pipeline import BuildConfig, BuildReport
from bayesretrieval.indexing.scalars import ScalarComputer
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
        scales: ``(n,)`` float64 (zeros when the file has neither scale nor activation).
        variance: the variance columns found.
        variance_diag: ``(n, D)`` float32 or ``None``.
        variance_lowrank: ``(n, r, D)`` float32 or ``None``.
        skipped: skip rows (dicts).
        activations: ``(n, h)`` float32 from the ``activation`` column, or ``None``.
    """

    explicit_ids: np.ndarray | None
    paths: list
    means: np.ndarray
    scales: np.ndarray
    variance: VarianceSpec
    variance_diag: np.ndarray | None
    variance_lowrank: np.ndarray | None
    skipped: list
    activations: np.ndarray | None = None


def _find(names: list, role: str) -> str | None:
    return next((n for n in COLUMN_NAMES[role] if n in names), None)


def read_embeddings(path: str | Path, posterior: PosteriorPair) -> EmbeddingTable:
    """Read and validate a precomputed-embeddings Parquet for a posterior of dimension D.

    Raises:
        ValueError: if the id/path or embedding column is missing.
    """
    table = pq.read_table(path)
    names = table.column_names
    cols = {role: _find(names, role) for role in COLUMN_NAMES}
    if cols["embedding"] is None or (cols["item_id"] is None and cols["path"] is None):
        raise ValueError(
            f"{path}: expected an embedding column ({', '.join(COLUMN_NAMES['embedding'])}) and an id "
            f"or path column ({', '.join(COLUMN_NAMES['item_id'] + COLUMN_NAMES['path'])}); got {names}"
        )
    dim = posterior.image.out_features
    ids = table.column(cols["item_id"]).to_pylist() if cols["item_id"] else None
    paths = table.column(cols["path"]).to_pylist() if cols["path"] else [str(i) for i in ids]
    rows = {role: table.column(c).to_pylist() if c else None for role, c in cols.items()}
    rank = _lowrank_rank(rows["variance_lowrank"], dim)
    keep, skipped, seen = [], [], set()
    for i, key in enumerate(ids if ids is not None else paths):
        problem = _row_problem(rows, i, dim, rank, posterior.image.in_features)
        if problem is None and (key is None or key in seen):
            problem = (SkipReason.DUPLICATE_ID, f"{cols['item_id'] or cols['path']} {key!r} repeated or missing")
        if problem is not None:
            skipped.append({"path": str(paths[i]), "reason": problem[0].value, "detail": problem[1]})
            continue
        seen.add(key)
        keep.append(i)
    pick = lambda role, shape: None if rows[role] is None else np.asarray(  # noqa: E731
        [rows[role][i] for i in keep], np.float64).reshape(len(keep), *shape)
    means = pick("embedding", (dim,))
    scales = np.zeros(len(keep))
    activations = None if rows["activation"] is None else pick("activation", (-1,))
    if rows["scale"] is not None:
        scales = pick("scale", ())
    elif activations is not None:
        scales = posterior.image.activation_scale(activations).numpy()
    activations = None if activations is None else activations.astype(np.float32)
    lowrank = pick("variance_lowrank", (rank, dim)) if rank else None
    diag = pick("variance_diag", (dim,))
    if lowrank is not None and diag is None:
        diag = np.zeros((len(keep), dim))
    spec = VarianceSpec(CovarianceForm.LOWRANK, rank) if rank else VarianceSpec(
        CovarianceForm.DIAG if diag is not None else CovarianceForm.KFAC)
    return EmbeddingTable(
        np.asarray([ids[i] for i in keep], np.int64) if ids is not None else None,
        [str(paths[i]) for i in keep], means.astype(np.float32), scales, spec,
        None if diag is None else diag.astype(np.float32),
        None if lowrank is None else lowrank.astype(np.float32), skipped, activations,
    )


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
    data = read_embeddings(embeddings_file, posterior)
    if config.store_activations and data.activations is None:
        raise ValueError(f"--store-activations needs an 'activation' column in {embeddings_file} "
                         f"({posterior.image.in_features} floats per row, the image tower's pre-projection output)")
    if config.variance.form is not CovarianceForm.KFAC and config.variance != data.variance:
        raise ValueError(f"variance {config.variance} requested, {embeddings_file} has {data.variance}")
    with index_lock(index_dir):
        previous = previous_items(index_dir, model, posterior, data.variance, "embeddings", config.rebuild,
                                  config.store_activations)
        ids, next_id = _assign_ids(data, previous)
        uncertainty = ScalarComputer(posterior).from_scales(torch.from_numpy(data.means), torch.from_numpy(data.scales))
        unknown = np.full(len(ids), -1)
        items = ItemArrays(ids, data.paths, unknown, unknown, unknown.astype(np.int32), unknown.astype(np.int32),
                           data.means, uncertainty.scalars, data.variance_diag, data.variance_lowrank,
                           data.activations if config.store_activations else None)
        info = VersionInfo("embeddings", str(Path(embeddings_file).resolve()), model.to_dict(), data.variance,
                           config.faiss_factory, next_id)
        manifest = write_version(index_dir, items, skipped_table(data.skipped), posterior, info)
    removed = len(set(previous.paths) - set(data.paths))
    reasons = {}
    for row in data.skipped:
        reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
    return BuildReport(manifest, True, len(ids), 0, 0, removed, reasons, time.perf_counter() - started)


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
