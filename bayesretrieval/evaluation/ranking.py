"""Per-query retrieval quantities from a dense score matrix, and their summaries.

Every function takes ``scores`` ``(nq, nb)`` (higher is better) and ``relevant`` ``(nq, nb)``
booleans and ranks each row by a stable sort of ``-scores``, so ties go to the smaller
column (columns are in item-id order, the engine's tie-break). Returning per-query
values lets a sweep over a large gallery stream query chunks and summarise at the end.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _ranked_relevance(scores, relevant) -> np.ndarray:
    """``relevant`` re-ordered by each row's ranking, ``(nq, nb)`` bool."""
    scores = np.asarray(scores, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    if scores.ndim != 2 or scores.shape != relevant.shape:
        raise ValueError(f"scores and relevant must both be (nq, nb), got {scores.shape} and {relevant.shape}")
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(relevant, order, axis=1)


def first_hit_rank(scores, relevant) -> np.ndarray:
    """0-based rank of each query's best-ranked relevant item, ``(nq,)`` int64 (``nb`` when none)."""
    hits = _ranked_relevance(scores, relevant)
    return np.where(hits.any(axis=1), hits.argmax(axis=1), hits.shape[1]).astype(np.int64)


def hits_at_k(scores, relevant, k: int) -> np.ndarray:
    """Number of relevant items among each query's top ``k``, ``(nq,)`` int64."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return _ranked_relevance(scores, relevant)[:, :k].sum(axis=1).astype(np.int64)


def average_precision(scores, relevant) -> np.ndarray:
    """Average precision of every query over the whole ranking, ``(nq,)`` (NaN without relevant items).

    ``AP = (1/R) sum_{r: item at rank r relevant} precision@r``, with ``R`` the number of
    relevant items.
    """
    hits = _ranked_relevance(scores, relevant)
    cumulative = np.cumsum(hits, axis=1)
    precision = cumulative / np.arange(1, hits.shape[1] + 1)
    total = hits.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (precision * hits).sum(axis=1) / total, np.nan)


def summarise_ranking(first_hit, ap, hits_top, top: int, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Recall@k (a hit among the top ``k``), precision@``top`` and mAP over queries.

    Args:
        first_hit: ``(nq,)`` from :func:`first_hit_rank`.
        ap: ``(nq,)`` from :func:`average_precision`.
        hits_top: ``(nq,)`` from :func:`hits_at_k` with ``k = top``.
        top: the precision cut-off.
        ks: recall cut-offs.

    Returns:
        ``{"recall@1": ..., "precision@10": ..., "map": ..., "queries": nq}``.
    """
    first_hit = np.asarray(first_hit)
    if len(first_hit) == 0:
        raise ValueError("no queries to summarise")
    summary = {f"recall@{k}": float(np.mean(first_hit < k)) for k in ks}
    summary[f"precision@{top}"] = float(np.mean(np.asarray(hits_top) / top))
    summary["map"] = float(np.nanmean(ap))
    summary["queries"] = int(len(first_hit))
    return summary
