"""Calibration and retrieval metrics as pure functions over arrays.

Calibration: probabilities ``p`` and labels ``y`` are 1-D arrays of the same length ``n``
(labels 0/1 or booleans, checked by :func:`binary_labels`).

Retrieval: ``scores`` ``(nq, nb)`` (higher is better) and ``relevant`` ``(nq, nb)``
booleans. Each row is ranked by a stable sort of ``-scores``, so ties go to the smaller
column (columns are in item-id order, the engine's tie-break). The per-query quantities
(:func:`first_hit_rank`, :func:`hits_at_k`, :func:`average_precision`) let a sweep over a
large gallery stream query chunks; :func:`recall_at_k` and :func:`precision_at_k` average
them over queries.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-12
NO_HIT = np.iinfo(np.int64).max
""":func:`first_hit_rank` of a query without relevant items: past every cut-off ``k``."""


def binary_labels(labels, name: str = "labels") -> np.ndarray:
    """Check that every value is 0/1 or a boolean and return them as booleans.

    Args:
        labels: array-like of any shape.
        name: what the values are, for the error message.

    Returns:
        Bool array of the same shape.

    Raises:
        ValueError: on any other value (NaN included), naming the first one.
    """
    values = np.asarray(labels)
    if values.dtype == bool:
        return values
    bad = ~np.isin(values, (0, 1))
    if bad.any():
        first = values.reshape(-1)[np.flatnonzero(bad)[:1]].tolist()[0]
        raise ValueError(f"{name} must be 0/1 or booleans, got {first!r}")
    return values.astype(bool)


def _binary(probabilities, labels) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    y = binary_labels(labels).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"probabilities have {p.size} values, labels have {y.size}")
    if p.size == 0:
        raise ValueError("no pairs given")
    if np.any((p < 0) | (p > 1)) or not np.isfinite(p).all():
        raise ValueError("probabilities must lie in [0, 1]")
    return p, y.astype(np.float64)


def expected_calibration_error(probabilities, labels, bins: int = 15) -> float:
    """ECE with ``bins`` equal-width bins on ``[0, 1]``: ``sum_b n_b/n |mean(y_b) - mean(p_b)|``.

    A probability equal to a bin edge goes to the bin on its right (1.0 to the last bin).
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    p, y = _binary(probabilities, labels)
    which = np.minimum((p * bins).astype(np.int64), bins - 1)
    count = np.bincount(which, minlength=bins)
    gap = np.abs(np.bincount(which, y, bins) - np.bincount(which, p, bins))
    return float(gap.sum() / p.size) if count.any() else 0.0


def reliability_table(probabilities, labels, bins: int = 15) -> dict:
    """Per-bin counts, mean probability and observed frequency (NaN for empty bins), each ``(bins,)``."""
    p, y = _binary(probabilities, labels)
    which = np.minimum((p * bins).astype(np.int64), bins - 1)
    count = np.bincount(which, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "lower": np.arange(bins) / bins,
            "count": count,
            "mean_probability": np.bincount(which, p, bins) / count,
            "frequency": np.bincount(which, y, bins) / count,
        }


def brier_score(probabilities, labels) -> float:
    """Mean squared error ``mean((p - y)^2)``."""
    p, y = _binary(probabilities, labels)
    return float(np.mean((p - y) ** 2))


def negative_log_likelihood(probabilities, labels) -> float:
    """Mean Bernoulli NLL ``-mean(y log p + (1 - y) log(1 - p))``, probabilities clipped to ``[eps, 1-eps]``."""
    p, y = _binary(probabilities, labels)
    p = np.clip(p, EPS, 1 - EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def _ranked_relevance(scores, relevant) -> np.ndarray:
    """``relevant`` re-ordered by each row's ranking, ``(nq, nb)`` bool."""
    scores = np.asarray(scores, dtype=np.float64)
    relevant = binary_labels(relevant, "relevant")
    if scores.ndim != 2 or scores.shape != relevant.shape:
        raise ValueError(f"scores and relevant must both be (nq, nb), got {scores.shape} and {relevant.shape}")
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(relevant, order, axis=1)


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def first_hit_rank(scores, relevant) -> np.ndarray:
    """0-based rank of each query's best-ranked relevant item, ``(nq,)`` int64 (:data:`NO_HIT` when none)."""
    hits = _ranked_relevance(scores, relevant)
    return np.where(hits.any(axis=1), hits.argmax(axis=1), NO_HIT).astype(np.int64)


def hits_at_k(scores, relevant, k: int) -> np.ndarray:
    """Number of relevant items among each query's top ``k``, ``(nq,)`` int64."""
    _check_k(k)
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


def recall_at_k(first_hit, k: int) -> float:
    """Recall@k: the fraction of queries with at least one relevant item among their top ``k``.

    ``recall@k = (1/nq) sum_q [r_q < k]``, with ``r_q`` the 0-based rank of query ``q``'s
    best-ranked relevant item; a query without relevant items counts as a miss. This is
    the Recall@K of text-image retrieval benchmarks (a hit rate), not the fraction of all
    relevant items that were retrieved.

    Args:
        first_hit: ``(nq,)`` ranks from :func:`first_hit_rank`.
        k: cut-off, ``>= 1``.

    Returns:
        A value in ``[0, 1]``.
    """
    first_hit = _per_query(first_hit, k)
    return float(np.mean(first_hit < k))


def precision_at_k(hits, k: int) -> float:
    """Precision@k: ``(1/nq) sum_q h_q / k``, the mean fraction of relevant items in the top ``k``.

    Args:
        hits: ``(nq,)`` counts from :func:`hits_at_k` with the same ``k``.
        k: cut-off, ``>= 1``.

    Returns:
        A value in ``[0, 1]``.
    """
    hits = _per_query(hits, k)
    if (hits < 0).any() or (hits > k).any():
        raise ValueError(f"hits must be counts in [0, k={k}], got {hits.min()} to {hits.max()}")
    return float(np.mean(hits / k))


def _per_query(values, k: int) -> np.ndarray:
    """``values`` as a flat ``(nq,)`` array, after checking ``k`` and that there is a query.

    Raises:
        ValueError: for ``k < 1`` or no queries.
    """
    _check_k(k)
    values = np.asarray(values).reshape(-1)
    if values.size == 0:
        raise ValueError("no queries given")
    return values
