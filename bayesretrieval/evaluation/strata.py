"""Failure AUROC per query stratum, with bootstrap intervals, against the best baseline.

Pooling queries whose base rates differ (full descriptions with about 2 relevant items,
one-attribute queries with hundreds) mixes "which stratum is harder" into "which query
is harder" and can flip a signal (Simpson's paradox). So every AUROC here is computed
within one stratum; a pooled figure is only the ``n``-weighted mean of within-stratum
AUROCs, ``sum_s n_s A_s / sum_s n_s`` over the strata where ``A_s`` is defined.

Intervals are percentile bootstrap 95% intervals over queries: each replicate resamples
the queries of every stratum with replacement, within the stratum (so ``n_s`` and the
weights stay fixed), and the same replicate is used for every signal, so a difference
``A_signal - A_best_baseline`` gets a paired interval. The best baseline of a stratum is
the baseline with the highest AUROC there (chosen on the same queries, which favours the
baseline: a conservative test for the other signals). A non-baseline signal is *useful*
in a stratum when the interval of its difference to the best baseline excludes zero from
above.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

MIN_CLASS = 5
"""Fewest failures and fewest successes a stratum needs for its AUROC to be reported."""


def auroc_rows(u: np.ndarray, failed: np.ndarray) -> np.ndarray:
    """Failure AUROC of every row: ``P(u_failed > u_correct)``, ties half (Mann-Whitney).

    Args:
        u: ``(B, n)`` uncertainties.
        failed: ``(B, n)`` bool.

    Returns:
        ``(B,)``, NaN for a row without both classes.
    """
    u = np.asarray(u, dtype=np.float64)
    failed = np.asarray(failed, dtype=bool)
    if u.shape != failed.shape or u.ndim != 2:
        raise ValueError(f"u and failed must both be (B, n), got {u.shape} and {failed.shape}")
    ranks = stats.rankdata(u, axis=1)
    pos = failed.sum(axis=1).astype(np.float64)
    neg = failed.shape[1] - pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auroc = ((ranks * failed).sum(axis=1) - pos * (pos + 1) / 2) / (pos * neg)
    return np.where((pos > 0) & (neg > 0), auroc, np.nan)


def _interval(draws: np.ndarray) -> list[float]:
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return [float("nan"), float("nan")]
    return [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]


def stratified_auroc(values: dict, baselines, failed, strata: dict, n_boot: int = 1000, seed: int = 0,
                     min_class: int = MIN_CLASS) -> dict:
    """Every signal's failure AUROC per stratum and pooled (weighted mean), with intervals and verdicts.

    Args:
        values: ``{signal: (n,)}`` uncertainties (higher = less sure), NaN-free.
        baselines: the names in ``values`` that are baselines.
        failed: ``(n,)`` bool, whether the query's top-1 result is not relevant.
        strata: ``{name: (n,) bool}`` query strata (they may overlap across partitions,
            but the pooled figure assumes they are disjoint).
        n_boot: bootstrap replicates.
        seed: seed of the resampling.
        min_class: fewest failures and successes a stratum needs.

    Returns:
        ``{"strata": {name: entry}, "pooled": entry, "useful": {name: [signals]}}``; an entry
        holds ``queries``, ``failures``, ``top1_recall``, ``best_baseline`` and per signal
        ``auroc``, ``ci``, and for non-baselines ``minus_best_baseline``, its ``ci`` and ``useful``.
    """
    failed = np.asarray(failed, dtype=bool)
    names = list(values)
    baselines = [name for name in names if name in set(baselines)]
    if not baselines:
        raise ValueError("need at least one baseline signal")
    arrays = {name: np.asarray(values[name], dtype=np.float64).reshape(-1) for name in names}
    for name, array in arrays.items():
        if array.shape != failed.shape or np.isnan(array).any():
            raise ValueError(f"signal {name!r} has {array.size} values (NaN: {np.isnan(array).any()}), "
                             f"expected {failed.size} without NaN")
    rng = np.random.default_rng(seed)
    point, draws, sizes, entries = {}, {}, {}, {}
    for stratum, mask in strata.items():
        rows = np.flatnonzero(np.asarray(mask, dtype=bool))
        f = failed[rows]
        entry = {"queries": int(rows.size), "failures": int(f.sum()),
                 "top1_recall": float(1 - f.mean()) if rows.size else float("nan")}
        entries[stratum] = entry
        if f.sum() < min_class or (~f).sum() < min_class:
            entry["signals"] = None
            continue
        resample = rows[rng.integers(0, rows.size, size=(n_boot, rows.size))]
        point[stratum] = {n: float(auroc_rows(arrays[n][rows][None], f[None])[0]) for n in names}
        draws[stratum] = {n: auroc_rows(arrays[n][resample], failed[resample]) for n in names}
        sizes[stratum] = rows.size
        entry.update(_verdicts(point[stratum], draws[stratum], baselines))
    pooled = {"strata": list(point), "queries": int(sum(sizes.values())),
              "failures": int(sum(entries[s]["failures"] for s in point))}
    if point:
        weights = np.array([sizes[s] for s in point], dtype=np.float64)
        mean_point = {n: float(np.dot(weights, [point[s][n] for s in point]) / weights.sum()) for n in names}
        mean_draws = {n: _weighted_rows(np.stack([draws[s][n] for s in point]), weights) for n in names}
        pooled.update(_verdicts(mean_point, mean_draws, baselines))
    else:
        pooled["signals"] = None
    useful = {s: [n for n, v in e["signals"].items() if v.get("useful")]
              for s, e in [*entries.items(), ("pooled", pooled)] if e.get("signals")}
    return {"strata": entries, "pooled": pooled, "useful": useful}


def _weighted_rows(draws: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``(B,)`` weighted means over strata ``(S, B)``, skipping a stratum's NaN replicates."""
    ok = np.isfinite(draws)
    w = weights[:, None] * ok
    with np.errstate(invalid="ignore"):
        return np.where(w.sum(0) > 0, (np.where(ok, draws, 0.0) * w).sum(0) / w.sum(0), np.nan)


def _verdicts(point: dict, draws: dict, baselines: list) -> dict:
    """AUROC, interval, and for non-baselines the paired difference to the best baseline."""
    best = max(baselines, key=lambda n: point[n])
    signals = {}
    for name, auroc in point.items():
        entry = {"baseline": name in baselines, "auroc": auroc, "ci": _interval(draws[name])}
        if name not in baselines:
            low, high = _interval(draws[name] - draws[best])
            entry.update(minus_best_baseline=auroc - point[best], minus_best_baseline_ci=[low, high],
                         useful=bool(low > 0))
        signals[name] = entry
    return {"best_baseline": best, "signals": signals}


def stratified_mean_difference(a, b, strata: dict, n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean of ``a - b`` per query stratum and pooled (``n``-weighted), with paired bootstrap intervals.

    For per-query figures of two rankings of the same queries (e.g. precision@10 under a
    risk-averse score and under ``expected``): resampling the queries within each stratum
    keeps the pairing, so the interval is that of the difference.

    Args:
        a: ``(n,)`` per-query figures.
        b: ``(n,)`` the same queries' figures to compare with.
        strata: ``{name: (n,) bool}`` disjoint query strata.
        n_boot: bootstrap replicates.
        seed: seed of the resampling.

    Returns:
        ``{"strata": {name: entry}, "pooled": entry}``, each entry ``queries``, ``a``, ``b``,
        ``difference`` and its ``ci``.
    """
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    entries, draws, sizes = {}, [], []
    for name, mask in strata.items():
        rows = np.flatnonzero(np.asarray(mask, dtype=bool))
        if rows.size == 0:
            continue
        replicate = diff[rows[rng.integers(0, rows.size, size=(n_boot, rows.size))]].mean(axis=1)
        entries[name] = {"queries": int(rows.size), "a": float(np.mean(np.asarray(a)[rows])),
                         "b": float(np.mean(np.asarray(b)[rows])), "difference": float(diff[rows].mean()),
                         "ci": _interval(replicate)}
        draws.append(replicate)
        sizes.append(rows.size)
    weights = np.asarray(sizes, dtype=np.float64)
    pooled = {"queries": int(weights.sum()),
              "difference": float(np.dot(weights, [e["difference"] for e in entries.values()]) / weights.sum()),
              "ci": _interval(_weighted_rows(np.stack(draws), weights))}
    return {"strata": entries, "pooled": pooled}
