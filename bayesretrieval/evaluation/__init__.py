"""Benchmark metrics for uncertain retrieval, beyond the basics in :mod:`bayesretrieval.metrics`.

- :mod:`~bayesretrieval.evaluation.selective`: Recall@1 in uncertainty bins (Spearman, R^2),
  failure-detection AUROC, risk-coverage and AURC;
- :mod:`~bayesretrieval.evaluation.baselines`: temperature-scaled gallery softmax, margin;
- :mod:`~bayesretrieval.evaluation.ood`: centred Mahalanobis and kNN distances of activations;
- :mod:`~bayesretrieval.evaluation.signals`: the top-1 uncertainty signals, by name;
- :mod:`~bayesretrieval.evaluation.strata`: failure AUROC per query stratum, bootstrap intervals;
- :mod:`~bayesretrieval.evaluation.sweep`: every query against the whole gallery, streamed;
- :mod:`~bayesretrieval.evaluation.report`: the benchmark's numbers from a sweep (Recall@k,
  precision and mAP from :mod:`bayesretrieval.metrics`);
- :mod:`~bayesretrieval.evaluation.plots`: reliability, binned-recall and risk-coverage PNGs.
"""

from bayesretrieval.evaluation.baselines import fit_temperature, softmax_confidence, softmax_statistics
from bayesretrieval.evaluation.ood import KnnDistance, MahalanobisDistance
from bayesretrieval.evaluation.report import Evaluation, evaluate, split_queries, summarise_ranking
from bayesretrieval.evaluation.selective import auroc_standard_error, binned_recall, failure_auroc, risk_coverage
from bayesretrieval.evaluation.signals import Fitted, Signal, TopResults, available_signals, signal_values
from bayesretrieval.evaluation.strata import auroc_rows, stratified_auroc, stratified_mean_difference
from bayesretrieval.evaluation.sweep import DEFAULT_SCORES, ScoreSpec, SweepRecords, query_relative_variance, sweep

__all__ = [
    "DEFAULT_SCORES",
    "Evaluation",
    "Fitted",
    "KnnDistance",
    "MahalanobisDistance",
    "ScoreSpec",
    "Signal",
    "SweepRecords",
    "TopResults",
    "auroc_rows",
    "auroc_standard_error",
    "available_signals",
    "binned_recall",
    "evaluate",
    "failure_auroc",
    "fit_temperature",
    "query_relative_variance",
    "risk_coverage",
    "signal_values",
    "softmax_confidence",
    "softmax_statistics",
    "split_queries",
    "stratified_auroc",
    "stratified_mean_difference",
    "summarise_ranking",
    "sweep",
]
