"""Turn sweep records into the benchmark's numbers: retrieval, uncertainty vs error, calibration.

Queries are split into a held-in half (fits the probit link, the logistic baseline and
the softmax temperature) and a held-out half (every uncertainty and calibration number);
retrieval metrics involve no fitting and use all queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from bayesretrieval import metrics
from bayesretrieval.evaluation.baselines import fit_temperature
from bayesretrieval.evaluation.selective import auroc_standard_error, binned_recall, failure_auroc, risk_coverage
from bayesretrieval.evaluation.signals import Fitted, TopResults, available_signals, signal_values
from bayesretrieval.evaluation.sweep import SweepRecords
from bayesretrieval.queries.calibration import LogisticCalibration, ProbitCalibration


@dataclass
class Evaluation:
    """The numbers (JSON-ready) and the curves behind the plots.

    Attributes:
        summary: retrieval, per-signal failure detection and binned recall, calibration.
        curves: ``{"risk_coverage": {signal: (coverage, risk)}, "reliability": {link: table}}``.
    """

    summary: dict
    curves: dict


def summarise_ranking(first_hit, ap, hits_top, top: int, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Recall@k, precision@``top`` and mAP over queries (definitions in :mod:`bayesretrieval.metrics`).

    Args:
        first_hit: ``(nq,)`` from :func:`~bayesretrieval.metrics.first_hit_rank`.
        ap: ``(nq,)`` from :func:`~bayesretrieval.metrics.average_precision`.
        hits_top: ``(nq,)`` from :func:`~bayesretrieval.metrics.hits_at_k` with ``k = top``.
        top: the precision cut-off.
        ks: recall cut-offs.

    Returns:
        ``{"recall@1": ..., "precision@10": ..., "map": ..., "queries": nq}``.
    """
    summary = {f"recall@{k}": metrics.recall_at_k(first_hit, k) for k in ks}
    summary[f"precision@{top}"] = metrics.precision_at_k(hits_top, top)
    summary["map"] = float(np.nanmean(ap))
    summary["queries"] = int(len(first_hit))
    return summary


def split_queries(n: int, seed: int, fit_fraction: float = 0.5) -> np.ndarray:
    """A random boolean mask ``(n,)`` of held-in (fitting) queries; the rest are held out."""
    if not 0 < fit_fraction < 1:
        raise ValueError(f"fit_fraction must be in (0, 1), got {fit_fraction}")
    n_fit = int(round(n * fit_fraction))
    if not 0 < n_fit < n:
        raise ValueError(f"{n} queries cannot be split into two non-empty halves")
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n)[:n_fit]] = True
    return mask


def evaluate(records: SweepRecords, fit: np.ndarray, logit_scale: float, bins: int = 10,
             ece_bins: int = 15, groups: dict | None = None) -> Evaluation:
    """Compute every benchmark number from one sweep.

    Args:
        records: the sweep.
        fit: ``(n,)`` bool, the held-in queries (see :func:`split_queries`).
        logit_scale: ``s`` of the model.
        bins: equal-count uncertainty bins for Recall@1.
        ece_bins: equal-width bins of the ECE.
        groups: optional ``{name: (n,) bool}`` query groups (e.g. full vs partial
            queries); each gets its held-out top-1 recall and per-signal failure AUROC.

    Returns:
        The :class:`Evaluation`.
    """
    fit = np.asarray(fit, dtype=bool)
    held = ~fit
    if fit.shape != records.query_variance.shape:
        raise ValueError(f"fit mask has shape {fit.shape}, records have {records.query_variance.shape}")
    retrieval = {label: summarise_ranking(r["first_hit"], r["ap"], r["hits"], records.top)
                 for label, r in records.rankings.items()}
    temperature, t_index = fit_temperature(records.log_normaliser[fit], records.relevant_log_mass[fit],
                                           records.temperatures)
    pairs = lambda name, rows: getattr(records, name)[rows].reshape(-1)  # noqa: E731
    probit = ProbitCalibration().fit(pairs("pair_mean", fit), pairs("pair_var", fit), pairs("pair_relevant", fit))
    logistic = LogisticCalibration().fit(pairs("pair_map", fit), pairs("pair_relevant", fit))
    labels = pairs("pair_relevant", held)
    probabilities = {"probit": probit.probability(pairs("pair_mean", held), pairs("pair_var", held)),
                     "logistic_map": logistic.probability(pairs("pair_map", held))}
    calibration = {name: {"ece": metrics.expected_calibration_error(p, labels, ece_bins),
                          "brier": metrics.brier_score(p, labels), "nll": metrics.negative_log_likelihood(p, labels)}
                   for name, p in probabilities.items()}
    calibration["probit"].update(threshold=probit.threshold_, noise_std=probit.noise_std_)
    calibration["pairs"] = {"per_query": records.top, "held_out": int(labels.size), "positives": int(labels.sum())}
    top = TopResults(records.pair_mean[:, :2], records.pair_var[:, :2], records.pair_map[:, :2],
                     records.pair_relevant[:, :2], records.query_variance, records.log_normaliser[:, t_index])
    held_top, fit_top = top.take(held), top.take(fit)
    fitted = Fitted(probit, temperature, logit_scale)
    failed = ~held_top.relevant[:, 0]
    signals, curves = {}, {"risk_coverage": {}, "reliability": {}}
    for signal in available_signals(top):
        u = signal_values(signal, held_top, fitted)
        rc = risk_coverage(u, failed)
        auroc = _auroc(u, failed)
        stderr = float("nan") if np.isnan(auroc) else auroc_standard_error(auroc, failed.sum(), (~failed).sum())
        signals[signal.value] = {"baseline": signal.is_baseline, "failure_auroc": auroc,
                                 "failure_auroc_stderr": stderr,
                                 "failure_auroc_held_in": _auroc(signal_values(signal, fit_top, fitted),
                                                                 ~fit_top.relevant[:, 0]),
                                 "aurc": rc["aurc"], "binned_recall@1": binned_recall(u, ~failed, bins)}
        curves["risk_coverage"][signal.value] = (rc["coverage"], rc["risk"])
    for name, p in probabilities.items():
        curves["reliability"][name] = metrics.reliability_table(p, labels, ece_bins)
    by_group = {}
    for name, mask in (groups or {}).items():
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != fit.shape:
            raise ValueError(f"group {name!r} has shape {mask.shape}, records have {fit.shape}")
        part = top.take(mask & held)
        part_failed = ~part.relevant[:, 0]
        by_group[name] = {"held_out": int(part_failed.size), "top1_recall": float(1 - part_failed.mean()),
                          "failure_auroc": {s.value: _auroc(signal_values(s, part, fitted), part_failed)
                                            for s in available_signals(top)}}
    summary = {
        "queries": {"total": int(fit.size), "held_in": int(fit.sum()), "held_out": int(held.sum())},
        "retrieval": retrieval,
        "top1_recall_held_out": float(1 - failed.mean()),
        "oracle_aurc": risk_coverage(np.zeros(failed.size), failed)["oracle_aurc"],
        "signals": signals,
        "calibration": calibration,
        "softmax_temperature": temperature,
        "selected_on_held_in": {kind: _select(signals, kind == "baseline") for kind in ("bayesian", "baseline")},
        "groups": by_group,
    }
    return Evaluation(summary, curves)


def _select(signals: dict, baseline: bool) -> dict:
    """The signal of a kind with the best held-in failure AUROC, and its held-out numbers."""
    candidates = {k: v for k, v in signals.items() if v["baseline"] == baseline
                  and not np.isnan(v["failure_auroc_held_in"])}
    if not candidates:
        return {"signal": None}
    name = max(candidates, key=lambda k: candidates[k]["failure_auroc_held_in"])
    return {"signal": name, "failure_auroc": candidates[name]["failure_auroc"], "aurc": candidates[name]["aurc"]}


def _auroc(u: np.ndarray, failed: np.ndarray) -> float:
    """Failure AUROC, NaN when the held-out top-1 results are all right or all wrong."""
    return failure_auroc(u, failed) if 0 < failed.sum() < failed.size else float("nan")
