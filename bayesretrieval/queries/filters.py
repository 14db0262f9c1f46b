"""Restricting a search to a subset of the collection through FAISS ID selectors.

Conditions (item ids, a path prefix, a path glob, a predicate over the Parquet columns)
are intersected into a sorted array of item ids; FAISS then only returns those, so the
certificate of :mod:`bayesretrieval.queries.candidates` holds on the subset.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Sequence

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bayesretrieval.store.format import ITEMS_FILE

VECTOR_COLUMNS = ("embedding", "variance_diag", "variance_lowrank")


@dataclass(frozen=True)
class ItemFilter:
    """Which items a search may return (all conditions must hold).

    Attributes:
        item_ids: explicit item ids.
        path_prefix: paths starting with this string (POSIX, relative to the indexed root).
        path_glob: paths matching this ``fnmatch`` pattern (``*`` also crosses ``/``).
        where: a predicate over ``items.parquet`` columns: a :class:`pyarrow.compute.Expression`
            or a pandas ``DataFrame.query`` string such as ``"width >= 64 and file_size < 5e5"``.
    """

    item_ids: Sequence[int] | None = None
    path_prefix: str | None = None
    path_glob: str | None = None
    where: str | pc.Expression | None = None

    @property
    def is_empty(self) -> bool:
        """Whether no condition is set (the whole collection)."""
        return all(v is None for v in (self.item_ids, self.path_prefix, self.path_glob, self.where))

    def select(self, reader) -> np.ndarray:
        """The allowed item ids, sorted, int64, from an :class:`~bayesretrieval.store.IndexReader`.

        Raises:
            ValueError: for a predicate that names unknown columns or does not parse.
        """
        allowed = np.asarray(reader.item_ids)
        if self.item_ids is not None:
            allowed = np.intersect1d(allowed, np.asarray(list(self.item_ids), dtype=np.int64))
        if self.path_prefix is not None or self.path_glob is not None:
            table = reader.read_items(columns=["item_id", "path"])
            mask = pa.array(np.ones(table.num_rows, bool))
            if self.path_prefix is not None:
                mask = pc.and_(mask, pc.starts_with(table["path"], self.path_prefix))
            if self.path_glob is not None:
                matcher = re.compile(fnmatch.translate(self.path_glob)).match
                mask = pc.and_(mask, pa.array([matcher(p) is not None for p in table["path"].to_pylist()]))
            allowed = np.intersect1d(allowed, table["item_id"].filter(mask).to_numpy())
        if self.where is not None:
            allowed = np.intersect1d(allowed, _where_ids(reader, self.where))
        return allowed.astype(np.int64)


def _where_ids(reader, where) -> np.ndarray:
    if isinstance(where, pc.Expression):
        try:
            return reader.read_items(columns=["item_id"], filters=where)["item_id"].to_numpy()
        except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError) as err:
            raise ValueError(f"filter predicate {where}: {err}") from None
    names = [n for n in _parquet_columns(reader) if n not in VECTOR_COLUMNS]
    frame = reader.read_items(columns=names).to_pandas()
    try:
        return frame.query(str(where))["item_id"].to_numpy()
    except Exception as err:  # pandas raises many types for a bad expression
        raise ValueError(f"filter predicate {where!r} does not apply to columns {names}: {err}") from None


def _parquet_columns(reader) -> list[str]:
    return pq.read_schema(reader.version_dir / ITEMS_FILE).names


def id_selector(item_ids: np.ndarray) -> faiss.IDSelector:
    """A FAISS selector for ``item_ids`` ``(n,)`` (the selector copies the ids)."""
    ids = np.ascontiguousarray(item_ids, dtype=np.int64)
    return faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))
