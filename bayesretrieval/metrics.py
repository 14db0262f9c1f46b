"""Calibration and retrieval metrics as pure functions over arrays.

Probabilities ``p`` and labels ``y`` are 1-D arrays of the same length ``n`` (labels 0/1
or booleans); rankings are ``(nq, k)`` arrays of item ids with ``-1`` for "no result".
"""

from __future__ import annotations

import numpy as np

EPS = 1e-12


def _binary(probabilities, labels) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"probabilities have {p.size} values, labels have {y.size}")
    if p.size == 0:
        raise ValueError("no pairs given")
    if np.any((p < 0) | (p > 1)) or not np.isfinite(p).all():
        raise ValueError("probabilities must lie in [0, 1]")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0/1 or booleans")
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


def recall_at_k(I, relevant: list, k: int) -> float:
    """Mean over queries of ``|top-k ∩ relevant| / min(k, |relevant|)`` (queries without relevant items skipped).

    Args:
        I: ``(nq, >=k)`` ranked item ids, ``-1`` for none.
        relevant: ``nq`` collections of relevant ids.
        k: cut-off (``>= 1``).
    """
    I = np.asarray(I)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(relevant) != len(I):
        raise ValueError(f"{len(I)} rankings, {len(relevant)} relevance sets")
    values = [len(set(row[:k].tolist()) & set(rel)) / min(k, len(rel)) for row, rel in zip(I, relevant) if len(rel)]
    return float(np.mean(values)) if values else float("nan")


def precision_at_k(I, relevant: list, k: int) -> float:
    """Mean over queries of ``|top-k ∩ relevant| / k``."""
    I = np.asarray(I)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(relevant) != len(I):
        raise ValueError(f"{len(I)} rankings, {len(relevant)} relevance sets")
    return float(np.mean([len(set(row[:k].tolist()) & set(rel)) / k for row, rel in zip(I, relevant)]))
