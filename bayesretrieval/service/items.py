"""Per-item answers: metadata with the audit's uncertainty, and thumbnails served by (shard, item id)."""

import io
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Optional, Sequence

import numpy as np
import pyarrow.compute as pc
from PIL import Image

from bayesretrieval.indexing.decode import ImageSkipped, decode_image
from bayesretrieval.options import DEFAULT_MAX_PIXELS, AuditScore
from bayesretrieval.queries.audit import collection_scores, default_ranking
from bayesretrieval.service.security import resolve_item_file
from bayesretrieval.store import CovarianceForm, IndexReader
from bayesretrieval.store.format import SCALAR_COLUMNS

if TYPE_CHECKING:
    from bayesretrieval.service.app import ServiceLimits

METADATA_COLUMNS = ["item_id", "path", "file_size", "mtime_ns", "width", "height"]


@dataclass(frozen=True)
class CollectionStats:
    """The audit's per-item scores over every shard's version, for O(1) item look-ups.

    Rows run over the shards one after another (shard 0's rows first), so percentiles and
    the high-uncertainty threshold count the union of the shards' items, as
    :func:`~bayesretrieval.queries.audit.audit_shards` does.

    Attributes:
        versions: the shards' versions they describe, in shard order.
        offsets: ``(S + 1,)`` each shard's first row, and ``N``.
        uncertainty: ``(N,)`` ``tr S / |mu|^2``.
        cosine_std: ``(N,)`` random-direction cosine std.
        ranking: ``(N,)`` the audit's ranking score per row.
        sorted_ranking: ``(N,)`` the same, ascending (for percentiles).
        by: the ranking score's name.
    """

    versions: tuple[str, ...]
    offsets: np.ndarray
    uncertainty: np.ndarray
    cosine_std: np.ndarray
    ranking: np.ndarray
    sorted_ranking: np.ndarray
    by: AuditScore

    @classmethod
    def compute(cls, readers: Sequence[IndexReader], form: CovarianceForm) -> "CollectionStats":
        """One vectorised pass over each shard's scalars (as :func:`~bayesretrieval.queries.audit.audit_shards`)."""
        uncertainty, cosine_std, scale, offsets = collection_scores(readers, form)
        by = default_ranking(scale)
        ranking = scale if by is AuditScore.SCALE else uncertainty
        return cls(_versions(readers), offsets, uncertainty, cosine_std, ranking, np.sort(ranking), by)

    def rows(self, shard: int, positions) -> np.ndarray:
        """The rows here of ``shard``'s item positions (``-1`` stays ``-1``: an unknown item)."""
        positions = np.asarray(positions, dtype=np.int64)
        return np.where(positions >= 0, positions + self.offsets[shard], -1)

    def percentile(self, row: int) -> float:
        """Percent of the collection whose ranking score is at most row ``row``'s (as the audit's column)."""
        below = np.searchsorted(self.sorted_ranking, self.ranking[row], side="right")
        return 100.0 * float(below) / max(len(self.ranking), 1)

    def threshold(self, percentile: float) -> float:
        """The ranking score above which an item scores higher than ``percentile`` percent of the collection."""
        if not len(self.sorted_ranking):
            return float("nan")
        return float(np.quantile(self.sorted_ranking, percentile / 100.0, method="inverted_cdf"))

    def marks(self, readers: Sequence[IndexReader], shards, item_ids, percentile: float) -> list[tuple]:
        """``(item percentile, high uncertainty)`` per ``(shard, item id)`` of ``readers``' versions.

        An item is highly uncertain when its ranking score is above :meth:`threshold`: at least
        ``percentile`` percent of the collection has a lower score. Unknown ids get ``None``s.

        Args:
            readers: the versions these stats describe, in shard order.
            shards: ``(n,)`` each item's shard, or one shard for all of them.
            item_ids: ``(n,)`` item ids.
            percentile: the high-uncertainty percentile.
        """
        ids = np.asarray(item_ids, dtype=np.int64)
        shards = np.broadcast_to(np.asarray(shards, dtype=np.int64), ids.shape)
        rows = np.full(ids.shape, -1, np.int64)
        for shard, reader in enumerate(readers):
            mine = shards == shard
            rows[mine] = self.rows(shard, reader.positions(ids[mine]))
        threshold = self.threshold(percentile)
        return [(self.percentile(row), bool(self.ranking[row] > threshold)) if row >= 0
                else (None, None) for row in rows]


class StatsCache:
    """:class:`CollectionStats` of the newest versions asked for, computed once per set of versions."""

    def __init__(self, form: CovarianceForm):
        self.form = form
        self._stats: CollectionStats | None = None
        self._lock = threading.Lock()

    def get(self, readers: Sequence[IndexReader]) -> CollectionStats:
        """The stats of ``readers``' versions (one reader per shard, in shard order)."""
        versions = _versions(readers)
        stats = self._stats
        if stats is not None and stats.versions == versions:
            return stats
        with self._lock:
            if self._stats is None or self._stats.versions != versions:
                self._stats = CollectionStats.compute(readers, self.form)
            return self._stats


def _versions(readers: Sequence[IndexReader]) -> tuple[str, ...]:
    return tuple(reader.manifest.version for reader in readers)


def item_record(reader: IndexReader, item_id: int, stats: CollectionStats, shard: int = 0) -> dict | None:
    """An item's metadata, scalars and audit scores, or ``None`` when ``item_id`` is not in the version.

    Args:
        reader: ``shard``'s version.
        item_id: the item's id there.
        stats: the collection's stats (``reader`` is one of its shards).
        shard: ``reader``'s shard.
    """
    position = int(reader.positions(np.asarray([item_id], dtype=np.int64))[0])
    if position < 0:
        return None
    table = reader.read_items(columns=METADATA_COLUMNS, filters=pc.field("item_id") == item_id)
    metadata = table.to_pylist()[0] if table.num_rows else {"item_id": item_id, "path": reader.paths([item_id])[0]}
    scalars = np.asarray(reader.scalars[position], dtype=np.float64)
    row = int(stats.rows(shard, position))
    return {**{column: metadata.get(column) for column in METADATA_COLUMNS},
            "version": reader.manifest.version,
            "scalars": dict(zip(SCALAR_COLUMNS, scalars.tolist())),
            "uncertainty": float(stats.uncertainty[row]), "cosine_std": float(stats.cosine_std[row]),
            "percentile": stats.percentile(row), "audit_by": stats.by.value}


def thumbnail(reader: IndexReader, item_id: int, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple | None:
    """An item's thumbnail as ``(bytes, media_type)``, or ``None`` when it cannot be served.

    The file is the stored path inside the indexed folder (``manifest.source_root``);
    anything that resolves outside it, is missing or does not decode gives ``None``.
    The thumbnail is a JPEG (the decoder composites alpha on white).
    """
    if reader.manifest.source_kind != "images":
        return None
    row = int(reader.positions(np.asarray([item_id], dtype=np.int64))[0])
    if row < 0:
        return None
    path = resolve_item_file(reader.manifest.source_root, reader.paths([item_id])[0])
    if path is None:
        return None
    try:
        image = decode_image(path, max_pixels=max_pixels, draft_size=size)
    except ImageSkipped:
        return None
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue(), "image/jpeg"


def items_router(searcher, limits: "ServiceLimits", stats: StatsCache):
    """The item routes: ``/api/items/{item_id}`` and its thumbnail, the item named by ``item_id`` and ``shard``.

    ``shard`` is a query parameter from 0 to the number of served index directories minus
    one (outside: a 422); it may be left out when one directory is served, and must be
    given when several are (a 400). No route takes a path: the file is the stored path of
    the item inside its shard's indexed folder.
    """
    from fastapi import APIRouter, HTTPException, Query, Response

    from bayesretrieval.service.schemas import service_schemas

    schemas = service_schemas()
    router = APIRouter(prefix="/api", tags=["items"])
    shard_count = len(searcher.snapshot().readers)
    ShardQuery = Annotated[Optional[int], Query(  # noqa: N806 (a type alias)
        ge=0, le=shard_count - 1, description="the item's shard: the position of its index directory among those "
                                              "served (a result's `shard`); needed when several are served")]

    def shard_reader(readers: list, shard: Optional[int]) -> IndexReader:
        if shard is None and len(readers) > 1:
            raise HTTPException(400, f"{len(readers)} index directories are served: name the item's shard "
                                     f"(shard=0..{len(readers) - 1})")
        return readers[shard or 0]

    @router.get("/items/{item_id}", response_model=schemas.ItemResponse)
    def item(item_id: int, shard: ShardQuery = None) -> dict:
        """One item's path, sizes and uncertainty (its percentile counts every shard's items).

        The item is ``item_id`` of ``shard``: ids are unique within one index directory only.
        """
        readers = searcher.snapshot().readers
        reader = shard_reader(readers, shard)
        record = item_record(reader, item_id, stats.get(readers), shard or 0)
        if record is None:
            raise HTTPException(404, f"no {_item_name(item_id, shard)} in index version {reader.manifest.version}")
        query = f"?shard={shard or 0}" if shard_count > 1 else ""
        return {**record, "shard": shard or 0, "thumbnail": f"/api/items/{item_id}/thumbnail{query}"}

    @router.get("/items/{item_id}/thumbnail", response_class=Response,
                responses={200: {"content": {"image/jpeg": {}}}, 404: {"model": schemas.ErrorResponse}})
    def item_thumbnail(item_id: int, shard: ShardQuery = None,
                       size: Annotated[int, Query(ge=16, le=limits.max_thumbnail_px)] = limits.thumbnail_px
                       ) -> Response:
        """The image of ``item_id`` of ``shard``, downscaled; served only from inside that shard's indexed folder."""
        found = thumbnail(shard_reader(searcher.snapshot().readers, shard), item_id, size, limits.max_pixels)
        if found is None:
            raise HTTPException(404, f"no thumbnail for {_item_name(item_id, shard)}")
        data, media_type = found
        return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=300"})

    return router


def _item_name(item_id: int, shard: Optional[int]) -> str:
    """How error messages name an item: its id, and its shard when the request named one."""
    return f"item {item_id}" if shard is None else f"item {item_id} of shard {shard}"
