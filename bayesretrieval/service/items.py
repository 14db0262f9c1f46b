"""Per-item answers: metadata with the audit's uncertainty, and thumbnails served by item id."""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
from PIL import Image

from bayesretrieval.indexing.decode import ImageSkipped, decode_image
from bayesretrieval.options import DEFAULT_MAX_PIXELS, AuditScore
from bayesretrieval.queries.audit import item_variance_terms, uncertainty_scores
from bayesretrieval.service.security import resolve_item_file
from bayesretrieval.store import CovarianceForm, IndexReader
from bayesretrieval.store.format import SCALAR_COLUMNS, ItemScalars

METADATA_COLUMNS = ["item_id", "path", "file_size", "mtime_ns", "width", "height"]


@dataclass(frozen=True)
class CollectionStats:
    """The audit's per-item scores of one version, in row order, for O(1) item look-ups.

    Attributes:
        version: the version they describe.
        uncertainty: ``(N,)`` ``tr S / |mu|^2``.
        cosine_std: ``(N,)`` random-direction cosine std.
        ranking: ``(N,)`` the audit's ranking score per row.
        sorted_ranking: ``(N,)`` the same, ascending (for percentiles).
        by: the ranking score's name.
    """

    version: str
    uncertainty: np.ndarray
    cosine_std: np.ndarray
    ranking: np.ndarray
    sorted_ranking: np.ndarray
    by: AuditScore

    @classmethod
    def compute(cls, reader: IndexReader, form: CovarianceForm) -> "CollectionStats":
        """One vectorised pass over the version's scalars (as :func:`~bayesretrieval.queries.audit.audit_index`)."""
        scalars = ItemScalars.from_table(np.asarray(reader.scalars))
        trace, quad = item_variance_terms(reader, form)
        uncertainty, cosine_std = uncertainty_scores(trace, quad, scalars.norm_sq, reader.embed_dim)
        by = AuditScore.SCALE if np.any(scalars.scale > 0) else AuditScore.UNCERTAINTY
        ranking = scalars.scale if by is AuditScore.SCALE else uncertainty
        return cls(reader.manifest.version, uncertainty, cosine_std, ranking, np.sort(ranking), by)

    def percentile(self, row: int) -> float:
        """Percent of the collection whose ranking score is at most row ``row``'s (as the audit's column)."""
        below = np.searchsorted(self.sorted_ranking, self.ranking[row], side="right")
        return 100.0 * float(below) / max(len(self.ranking), 1)

    def threshold(self, percentile: float) -> float:
        """The ranking score above which an item scores higher than ``percentile`` percent of the collection."""
        if not len(self.sorted_ranking):
            return float("nan")
        return float(np.quantile(self.sorted_ranking, percentile / 100.0, method="inverted_cdf"))

    def marks(self, reader: IndexReader, item_ids, percentile: float) -> list[tuple]:
        """``(item percentile, high uncertainty)`` per item id of ``reader``'s version (``None``s for unknown ids).

        An item is highly uncertain when its ranking score is above :meth:`threshold`: at least
        ``percentile`` percent of the collection has a lower score.
        """
        rows = np.asarray(reader.positions(np.asarray(item_ids, dtype=np.int64)))
        threshold = self.threshold(percentile)
        return [(self.percentile(row), bool(self.ranking[row] > threshold)) if row >= 0
                else (None, None) for row in rows]


class StatsCache:
    """:class:`CollectionStats` of the newest version asked for, computed once per version."""

    def __init__(self, form: CovarianceForm):
        self.form = form
        self._stats: CollectionStats | None = None
        self._lock = threading.Lock()

    def get(self, reader: IndexReader) -> CollectionStats:
        """The stats of ``reader``'s version."""
        stats = self._stats
        if stats is not None and stats.version == reader.manifest.version:
            return stats
        with self._lock:
            if self._stats is None or self._stats.version != reader.manifest.version:
                self._stats = CollectionStats.compute(reader, self.form)
            return self._stats


def item_record(reader: IndexReader, item_id: int, stats: CollectionStats) -> dict | None:
    """An item's metadata, scalars and audit scores, or ``None`` when ``item_id`` is not in the version."""
    row = int(reader.positions(np.asarray([item_id], dtype=np.int64))[0])
    if row < 0:
        return None
    table = reader.read_items(columns=METADATA_COLUMNS, filters=pc.field("item_id") == item_id)
    metadata = table.to_pylist()[0] if table.num_rows else {"item_id": item_id, "path": reader.paths([item_id])[0]}
    scalars = np.asarray(reader.scalars[row], dtype=np.float64)
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
