"""Putting the rows of a new version together: kept items, new results, skips."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from bayesretrieval.indexing.plan import PreviousItems
from bayesretrieval.store import ItemArrays, VarianceSpec
from bayesretrieval.store.format import SCALAR_COLUMNS, SKIPPED_SCHEMA


def matrix_column(table: pa.Table, name: str, width: int) -> np.ndarray:
    """A fixed-size-list column as a float32 ``(rows, width)`` array."""
    column = table.column(name).combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False) if len(column) else np.zeros(0)
    return np.asarray(values, dtype=np.float32).reshape(len(column), width)


def _ints(table: pa.Table, name: str, dtype) -> np.ndarray:
    return np.asarray(table.column(name).fill_null(-1).to_numpy(zero_copy_only=False), dtype=dtype)


def items_from_results(
    table: pa.Table, item_ids: np.ndarray, embed_dim: int, variance: VarianceSpec, activation_dim: int = 0
) -> ItemArrays:
    """Item arrays from result rows (shard schema, no skips) and their ids ``(n,)``.

    ``activation_dim`` ``h > 0`` reads the ``activation`` column too.
    """
    lowrank = None
    if variance.has_lowrank:
        lowrank = matrix_column(table, "variance_lowrank", variance.rank * embed_dim)
        lowrank = lowrank.reshape(len(table), variance.rank, embed_dim)
    return ItemArrays(
        item_ids=np.asarray(item_ids, np.int64),
        paths=table.column("path").to_pylist(),
        file_size=_ints(table, "file_size", np.int64),
        mtime_ns=_ints(table, "mtime_ns", np.int64),
        width=_ints(table, "width", np.int32),
        height=_ints(table, "height", np.int32),
        means=matrix_column(table, "embedding", embed_dim),
        scalars=np.stack([table.column(c).to_numpy() for c in SCALAR_COLUMNS], axis=1).astype(np.float64)
        if len(table) else np.zeros((0, len(SCALAR_COLUMNS))),
        variance_diag=matrix_column(table, "variance_diag", embed_dim) if variance.has_diag else None,
        variance_lowrank=lowrank,
        activations=matrix_column(table, "activation", activation_dim) if activation_dim else None,
    )


def items_from_previous(previous: PreviousItems, positions: np.ndarray) -> ItemArrays:
    """The rows of the previous version at ``positions`` ``(k,)`` (its array order)."""
    reader = previous.stored
    positions = np.asarray(positions, np.int64)
    take = lambda a: None if a is None else np.asarray(a[positions])  # noqa: E731
    return ItemArrays(
        item_ids=previous.item_ids[positions],
        paths=[previous.paths[i] for i in positions],
        file_size=previous.file_size[positions],
        mtime_ns=previous.mtime_ns[positions],
        width=previous.width[positions],
        height=previous.height[positions],
        means=np.asarray(reader.means[positions], np.float32),
        scalars=np.asarray(reader.scalars[positions], np.float64),
        variance_diag=take(reader.variance_diag),
        variance_lowrank=take(reader.variance_lowrank),
        activations=take(reader.activations),
    )


def concat_items(parts: list[ItemArrays]) -> ItemArrays:
    """Stack item arrays (variance columns and activations must agree in presence)."""
    def cat(name):
        arrays = [getattr(p, name) for p in parts]
        return None if arrays[0] is None else np.concatenate(arrays)

    return ItemArrays(
        item_ids=cat("item_ids"),
        paths=[path for p in parts for path in p.paths],
        file_size=cat("file_size"),
        mtime_ns=cat("mtime_ns"),
        width=cat("width"),
        height=cat("height"),
        means=cat("means"),
        scalars=cat("scalars"),
        variance_diag=cat("variance_diag"),
        variance_lowrank=cat("variance_lowrank"),
        activations=cat("activations"),
    )


def skipped_table(rows: list[dict]) -> pa.Table:
    """``skipped.parquet`` rows (dicts with ``path, reason, detail, file_size, mtime_ns``), by path."""
    rows = sorted(rows, key=lambda r: r["path"])
    return pa.Table.from_pylist(
        [{name: row.get(name) for name in SKIPPED_SCHEMA.names} for row in rows], schema=SKIPPED_SCHEMA
    )
