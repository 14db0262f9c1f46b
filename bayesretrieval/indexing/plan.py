"""Deciding what a (re-)build must do: keep, encode, drop; and which id each file gets."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bayesretrieval.indexing.decode import RETRIED_REASONS
from bayesretrieval.indexing.sources import SourceFile
from bayesretrieval.store import IndexReader, ItemMetadata, Manifest
from bayesretrieval.store import format as fmt

ITEM_META_COLUMNS = ["item_id", "path", "file_size", "mtime_ns", "width", "height"]


@dataclass
class PreviousItems(ItemMetadata):
    """What an existing index knows about its files, row-aligned with its (id-sorted) rows.

    Attributes:
        skipped: the version's ``skipped.parquet`` rows as dicts.
        next_item_id: the next unused id.
        manifest: the version's manifest (``None`` when there is no index).
        stored: the stored rows (``means``, ``scalars``, ``variance_diag``,
            ``variance_lowrank``, ``activations``, row-aligned): the open :class:`IndexReader`, or the rows
            salvaged from a damaged version; ``None`` when no row can be reused.
        damaged: files of the version found missing or damaged, with why (the version
            must be republished even when nothing else changed).

    The file columns are those of :class:`~bayesretrieval.store.ItemMetadata`.
    """

    skipped: list = field(default_factory=list)
    next_item_id: int = 0
    manifest: Manifest | None = None
    stored: object | None = None
    damaged: dict = field(default_factory=dict)

    @classmethod
    def empty(cls, next_item_id: int = 0) -> "PreviousItems":
        """No previous items (ids start at ``next_item_id``)."""
        zeros = np.zeros(0, np.int64)
        return cls(zeros, [], zeros, zeros, zeros.astype(np.int32), zeros.astype(np.int32),
                   next_item_id=int(next_item_id))

    @classmethod
    def from_reader(cls, reader: IndexReader) -> "PreviousItems":
        """Read the metadata columns of an intact, open version."""
        table = reader.read_items(columns=ITEM_META_COLUMNS)
        column = lambda name, dtype: _filled(table.column(name), dtype)  # noqa: E731
        return cls(
            item_ids=column("item_id", np.int64),
            paths=table.column("path").to_pylist(),
            file_size=column("file_size", np.int64),
            mtime_ns=column("mtime_ns", np.int64),
            width=column("width", np.int32),
            height=column("height", np.int32),
            skipped=reader.read_skipped().to_pylist(),
            next_item_id=int(reader.manifest.next_item_id),
            manifest=reader.manifest,
            stored=reader,
        )

    @classmethod
    def salvage(cls, version_dir: Path, manifest: Manifest, damaged: dict) -> "PreviousItems":
        """What can be read from the intact files of a damaged version.

        ``items.parquet`` holds every column of every item, so while it is intact every
        unchanged file keeps its row; otherwise the ids of the paths are kept (from
        ``item_ids.npy`` and the path files when those are intact) and every file is
        encoded again.
        """
        from bayesretrieval.indexing.assemble import items_from_results

        intact = lambda *names: not any(n in damaged for n in names)  # noqa: E731
        skipped = (pq.read_table(version_dir / fmt.SKIPPED_FILE).to_pylist() if intact(fmt.SKIPPED_FILE) else [])
        if intact(fmt.ITEMS_FILE):
            table = pq.read_table(version_dir / fmt.ITEMS_FILE)
            rows = items_from_results(table, table.column("item_id").to_numpy(), manifest.embed_dim,
                                      manifest.variance_spec, manifest.activation_dim)
            return cls(rows.item_ids, rows.paths, rows.file_size, rows.mtime_ns, rows.width, rows.height,
                       skipped, manifest.next_item_id, manifest, rows, damaged)
        previous = cls.empty(manifest.next_item_id)
        if intact(fmt.ITEM_IDS_FILE, fmt.PATH_OFFSETS_FILE, fmt.PATHS_FILE):
            ids = np.load(version_dir / fmt.ITEM_IDS_FILE)
            offsets = np.load(version_dir / fmt.PATH_OFFSETS_FILE)
            data = (version_dir / fmt.PATHS_FILE).read_bytes()
            unknown = np.full(len(ids), -1)  # no file stamps: every file is encoded again, under its old id
            previous = cls(ids, [data[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:])],
                           unknown, unknown, unknown.astype(np.int32), unknown.astype(np.int32))
        previous.skipped, previous.next_item_id = skipped, int(manifest.next_item_id)
        previous.manifest, previous.damaged = manifest, damaged
        return previous


def _filled(column: pa.ChunkedArray, dtype) -> np.ndarray:
    return np.asarray(column.fill_null(-1).to_numpy(zero_copy_only=False), dtype=dtype)


@dataclass
class BuildPlan:
    """The outcome of comparing the walked files with the previous index.

    Attributes:
        keep_positions: ``(K,)`` rows of the previous arrays that stay as they are.
        todo: files to decode and encode, sorted by path.
        todo_ids: ``(len(todo),)`` the id each of them gets.
        kept_skips: previous skip rows for files that did not change.
        removed: number of previous items whose file is gone.
        next_item_id: the next unused id after this build.
    """

    keep_positions: np.ndarray
    todo: list
    todo_ids: np.ndarray
    kept_skips: list
    removed: int
    next_item_id: int


def plan_build(files: list[SourceFile], previous: PreviousItems, reuse_items: bool) -> BuildPlan:
    """Compare the walk with the previous index.

    A file is unchanged when its path, size and mtime match; skipped files count as
    unchanged too, except for :data:`RETRIED_REASONS` (tried again every time). Ids are stable per path: a
    file keeps the id its path had (even when changed, or on a rebuild), and new paths get
    fresh ids in path order from ``previous.next_item_id``, so the result depends only on
    the previous index and the folder's content.

    Args:
        files: the walk's result, sorted by path.
        previous: the previous index (or :meth:`PreviousItems.empty`).
        reuse_items: ``False`` for a rebuild (re-encode every file, still keeping ids).

    Returns:
        The plan.
    """
    by_path = {p: i for i, p in enumerate(previous.paths)}
    skip_by_path = {row["path"]: row for row in previous.skipped}
    keep, todo, todo_ids, kept_skips = [], [], [], []
    next_id = int(previous.next_item_id)
    for source in files:
        pos = by_path.get(source.path)
        stamp = (source.file_size, source.mtime_ns)
        if reuse_items and pos is not None and (previous.file_size[pos], previous.mtime_ns[pos]) == stamp:
            keep.append(pos)
            continue
        skip = skip_by_path.get(source.path)
        if (reuse_items and skip is not None and skip["reason"] not in RETRIED_REASONS
                and (skip["file_size"], skip["mtime_ns"]) == stamp):
            kept_skips.append(skip)
            continue
        if pos is not None:
            todo_ids.append(int(previous.item_ids[pos]))
        else:
            todo_ids.append(next_id)
            next_id += 1
        todo.append(source)
    walked = {f.path for f in files}
    removed = sum(1 for p in previous.paths if p not in walked)
    return BuildPlan(np.asarray(keep, np.int64), todo, np.asarray(todo_ids, np.int64), kept_skips, removed, next_id)
