"""Does an uncertainty tell when retrieval is wrong? Binned recall, failure AUROC, risk-coverage.

Inputs are per-query arrays of the same length ``n``: an ``uncertainty`` (higher means
less sure) and a boolean ``correct`` (the top-1 result is relevant) or ``failed`` (its
negation).
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from bayesretrieval.metrics import binary_labels


def _pair(uncertainty, flags, name: str) -> tuple[np.ndarray, np.ndarray]:
    u = np.asarray(uncertainty, dtype=np.float64).reshape(-1)
    f = np.asarray(flags).reshape(-1)
    if u.shape != f.shape:
        raise ValueError(f"uncertainty has {u.size} values, {name} has {f.size}")
    if u.size == 0:
        raise ValueError("no queries given")
    if np.isnan(u).any():
        raise ValueError("uncertainty has NaN values")
    return u, binary_labels(f, name)


def binned_recall(uncertainty, correct, bins: int = 10) -> dict:
    """Recall@1 in ``bins`` equal-count uncertainty bins, and how it trends (PCME++/ProbVLM style).

    Queries are sorted by uncertainty (stable) and split into ``bins`` groups of (almost)
    equal size, bin 0 the most certain. The trend is the Spearman correlation and the
    ``R^2`` of a least-squares line between bin index and the bin's Recall@1; a useful
    uncertainty gives a strongly negative Spearman.

    Args:
        uncertainty: ``(n,)``.
        correct: ``(n,)`` whether each query's top-1 result is relevant.
        bins: number of bins, ``2 <= bins <= n``.

    Returns:
        ``{"recall": [bins], "upper_edge": [bins], "count": [bins], "spearman": ..., "r2": ...}``
        (``spearman`` and ``r2`` are NaN when every bin has the same recall).
    """
    u, c = _pair(uncertainty, correct, "correct")
    if not 2 <= bins <= u.size:
        raise ValueError(f"bins must be in [2, n={u.size}], got {bins}")
    groups = np.array_split(np.argsort(u, kind="stable"), bins)
    recall = np.array([c[g].mean() for g in groups])
    index = np.arange(bins, dtype=np.float64)
    constant = np.ptp(recall) == 0
    spearman = float("nan") if constant else float(stats.spearmanr(index, recall).statistic)
    r2 = float("nan") if constant else float(stats.pearsonr(index, recall).statistic ** 2)
    return {"recall": recall.tolist(), "upper_edge": [float(u[g].max()) for g in groups],
            "count": [int(len(g)) for g in groups], "spearman": spearman, "r2": r2}


def failure_auroc(uncertainty, failed) -> float:
    """AUROC of ``uncertainty`` for telling failed queries from correct ones (0.5 is chance).

    ``P(u_failed > u_correct)`` with ties counted half (the Mann-Whitney statistic).

    Raises:
        ValueError: if all queries failed or none did.
    """
    u, f = _pair(uncertainty, failed, "failed")
    n_pos, n_neg = int(f.sum()), int((~f).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs both classes, got {n_pos} failures and {n_neg} successes")
    ranks = stats.rankdata(u)
    return float((ranks[f].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc_standard_error(auroc: float, n_failed: int, n_correct: int) -> float:
    """Hanley & McNeil (1982) standard error of an AUROC from ``n_failed`` positives and ``n_correct`` negatives.

    ``SE^2 = (A(1-A) + (n_f - 1)(Q1 - A^2) + (n_c - 1)(Q2 - A^2)) / (n_f n_c)`` with
    ``Q1 = A / (2 - A)`` and ``Q2 = 2A^2 / (1 + A)``.
    """
    if n_failed < 1 or n_correct < 1:
        raise ValueError(f"need both classes, got {n_failed} failures and {n_correct} successes")
    if not 0 <= auroc <= 1:
        raise ValueError(f"auroc must be in [0, 1], got {auroc}")
    q1, q2 = auroc / (2 - auroc), 2 * auroc**2 / (1 + auroc)
    var = (auroc * (1 - auroc) + (n_failed - 1) * (q1 - auroc**2) + (n_correct - 1) * (q2 - auroc**2))
    return float(np.sqrt(max(var, 0.0) / (n_failed * n_correct)))


def risk_coverage(uncertainty, failed) -> dict:
    """Risk when abstaining on the least certain queries, at every coverage.

    Keeping the ``i`` most certain queries (``i = 1..n``, ties in input order) gives
    coverage ``i/n`` and risk = failure rate among them. AURC is the mean risk over the
    ``n`` coverages; ``oracle_aurc`` is the same for a perfect ranking (failures last),
    the floor that ``aurc`` can reach with this failure rate.

    Returns:
        ``{"coverage": (n,), "risk": (n,), "aurc": ..., "oracle_aurc": ...}``.
    """
    u, f = _pair(uncertainty, failed, "failed")
    kept = np.arange(1, u.size + 1)
    risk = np.cumsum(f[np.argsort(u, kind="stable")]) / kept
    oracle = np.cumsum(np.sort(f)) / kept
    return {"coverage": kept / u.size, "risk": risk, "aurc": float(risk.mean()), "oracle_aurc": float(oracle.mean())}
