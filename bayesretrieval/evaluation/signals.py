"""Per-query uncertainty signals for the top-1 result, by name (a registry, not if-chains).

Each signal maps a query's top results (and what was fitted on held-in queries) to one
number, higher meaning "less sure the top-1 result is relevant". The Bayesian signals
use the cosine moments ``m, v`` of the top-1 and runner-up results (docs/math.md sections 3
and 5) or the posterior's per-item scale ``q``; the baselines use only the cosines of the
mean embeddings or, optionally, distances of the pre-projection activations to the fitting
set (:mod:`~bayesretrieval.evaluation.ood`). A signal whose input a benchmark did not
record is skipped (:func:`available_signals`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable

import numpy as np
from scipy import special

from bayesretrieval.evaluation.baselines import softmax_confidence
from bayesretrieval.queries.calibration import ProbitCalibration

TINY = 1e-12


@dataclass
class TopResults:
    """The two best results of every query under the ranking being judged, and the query itself.

    Attributes:
        mean: ``(n, 2)`` ``E[cos]`` of the top-1 and runner-up results.
        var: ``(n, 2)`` ``Var[cos]``.
        map_cosine: ``(n, 2)`` cosines of the mean embeddings.
        relevant: ``(n, 2)`` bool.
        query_variance: ``(n,)`` the query embedding's relative variance ``q_t tr(Sigma_T) / |mu_t|^2``.
        log_normaliser: ``(n,)`` the gallery softmax log-normaliser at the fitted temperature.
        item_scale: optional ``(n,)`` the posterior's ``q = a^T A^-1 a`` of the top-1 item.
        item_mahalanobis: optional ``(n,)`` centred Mahalanobis distance of the top-1 item's activation.
        item_knn: optional ``(n,)`` its kNN distance to the fitting activations.
        query_mahalanobis: optional ``(n,)`` the same for the query's text activation.
        query_knn: optional ``(n,)`` likewise.
        item_var: optional ``(n,)`` the item's own part of the top-1 ``Var[cos]``.
        probit_log_normaliser: optional ``(n,)`` the gallery probit-softmax log-normaliser at
            its fitted temperature (:func:`~bayesretrieval.evaluation.baselines.softmax_statistics`).
        aleatoric_var: optional ``(n,)`` the top-1 item's aleatoric cosine variance
            (:class:`~bayesretrieval.posterior.aleatoric.AleatoricHead`).
    """

    mean: np.ndarray
    var: np.ndarray
    map_cosine: np.ndarray
    relevant: np.ndarray
    query_variance: np.ndarray
    log_normaliser: np.ndarray
    item_scale: np.ndarray | None = None
    item_mahalanobis: np.ndarray | None = None
    item_knn: np.ndarray | None = None
    query_mahalanobis: np.ndarray | None = None
    query_knn: np.ndarray | None = None
    item_var: np.ndarray | None = None
    probit_log_normaliser: np.ndarray | None = None
    aleatoric_var: np.ndarray | None = None

    def take(self, rows) -> "TopResults":
        """The queries ``rows`` (a boolean mask or indices)."""
        return TopResults(*(None if getattr(self, f) is None else np.asarray(getattr(self, f))[rows]
                            for f in self.__dataclass_fields__))


@dataclass
class Fitted:
    """What the signals need that was fitted on held-in queries.

    Attributes:
        probit: the match-probability link (docs/math.md section 11).
        temperature: the softmax temperature (a multiplier of ``logit_scale``).
        logit_scale: ``s``.
        probit_temperature: the probit softmax's own temperature (``None``: not fitted).
    """

    probit: ProbitCalibration
    temperature: float
    logit_scale: float
    probit_temperature: float | None = None


class Signal(str, Enum):
    """Uncertainty of a query's top-1 result."""

    STD = "std"
    """``sqrt(v_1)``: the std of the top-1 cosine."""
    STD_OVER_GAP = "std_over_gap"
    """``sqrt(v_1) / (m_1 - m_2)``: the top-1 std relative to its lead over the runner-up."""
    FLIP_PROBABILITY = "flip_probability"
    """``Phi(-(m_1 - m_2) / sqrt(v_1 + v_2))``: chance the runner-up outscores the top-1 result."""
    MISMATCH_PROBABILITY = "mismatch_probability"
    """``1 - Phi((m_1 - tau) / sqrt(v_1 + noise_std^2))``: the calibrated chance the top-1 is no match."""
    QUERY_VARIANCE = "query_variance"
    """``q_t tr(Sigma_T) / |mu_t|^2``: the query's own relative variance (ignores the gallery)."""
    ITEM_SCALE = "item_scale"
    """``q = a^T A^-1 a`` of the top-1 item: the posterior's image-side uncertainty (ignores the query)."""
    LCB_FLIP = "lcb_flip"
    """``(m_2 - sqrt(v_2)) - (m_1 - sqrt(v_1))``: positive when ``lcb`` (kappa 1) would put the runner-up first."""
    EXPECTED_COSINE = "expected_cosine"
    """``-m_1``: the negated posterior mean cosine of the top-1 result (Bayesian, but no variance)."""
    ITEM_STD = "item_std"
    """``sqrt(v_item,1)``: the std the top-1 item's own noise contributes (the query's part left out)."""
    PROBIT_SOFTMAX = "probit_softmax"
    """``-p_1`` of the probit softmax over the gallery, ``softmax_j(s m_j / T / sqrt(1 + pi/8 (s/T)^2 v_j))``
    with its own fitted ``T``: the chance the top-1 is the best match (BayesVLM's probit, for retrieval)."""
    ALEATORIC_STD = "aleatoric_std"
    """``sigma_a`` of the top-1 item: the aleatoric head's std for ambiguity the weight posterior cannot see."""
    TOTAL_STD = "total_std"
    """``sqrt(v_1 + sigma_a^2)``: the epistemic and aleatoric stds of the top-1 cosine combined."""
    COSINE = "cosine"
    """Baseline: ``-c_1``, the negated cosine of the means of the top-1 result."""
    MARGIN = "margin"
    """Baseline: ``-(c_1 - c_2)``, the negated cosine margin of the top-1 over the runner-up."""
    SOFTMAX = "softmax"
    """Baseline: ``-p_1``, the negated temperature-scaled softmax probability of the top-1 result."""
    ITEM_MAHALANOBIS = "item_mahalanobis"
    """Baseline: centred Mahalanobis distance of the top-1 item's activation to the fitting images'."""
    ITEM_KNN = "item_knn"
    """Baseline: cosine distance of the top-1 item's activation to its k-th nearest fitting image."""
    QUERY_MAHALANOBIS = "query_mahalanobis"
    """Baseline: centred Mahalanobis distance of the query's activation to the fitting captions'."""
    QUERY_KNN = "query_knn"
    """Baseline: cosine distance of the query's activation to its k-th nearest fitting caption."""

    @property
    def is_baseline(self) -> bool:
        """Whether the signal uses no posterior (only mean embeddings or activations)."""
        return self in _BASELINES


_BASELINES = frozenset({Signal.COSINE, Signal.MARGIN, Signal.SOFTMAX, Signal.ITEM_MAHALANOBIS, Signal.ITEM_KNN,
                        Signal.QUERY_MAHALANOBIS, Signal.QUERY_KNN})

_INPUTS: dict[Signal, str] = {Signal.ITEM_SCALE: "item_scale", Signal.ITEM_MAHALANOBIS: "item_mahalanobis",
                              Signal.ITEM_KNN: "item_knn", Signal.QUERY_MAHALANOBIS: "query_mahalanobis",
                              Signal.QUERY_KNN: "query_knn", Signal.ITEM_STD: "item_var",
                              Signal.PROBIT_SOFTMAX: "probit_log_normaliser", Signal.ALEATORIC_STD: "aleatoric_var",
                              Signal.TOTAL_STD: "aleatoric_var"}
"""The optional :class:`TopResults` field each signal needs."""


def available_signals(top: TopResults) -> list[Signal]:
    """The signals whose inputs ``top`` holds, in declaration order."""
    return [s for s in Signal if s not in _INPUTS or getattr(top, _INPUTS[s]) is not None]


def _lcb(top: TopResults, column: int) -> np.ndarray:
    return top.mean[:, column] - np.sqrt(top.var[:, column])


def _gap(top: TopResults) -> np.ndarray:
    return np.maximum(top.mean[:, 0] - top.mean[:, 1], TINY)


_SIGNALS: dict[Signal, Callable[[TopResults, Fitted], np.ndarray]] = {
    Signal.STD: lambda t, f: np.sqrt(t.var[:, 0]),
    Signal.STD_OVER_GAP: lambda t, f: np.sqrt(t.var[:, 0]) / _gap(t),
    Signal.FLIP_PROBABILITY: lambda t, f: special.ndtr(-_gap(t) / np.sqrt(t.var[:, 0] + t.var[:, 1] + TINY)),
    Signal.MISMATCH_PROBABILITY: lambda t, f: 1.0 - f.probit.probability(t.mean[:, 0], t.var[:, 0]),
    Signal.QUERY_VARIANCE: lambda t, f: t.query_variance,
    Signal.ITEM_SCALE: lambda t, f: t.item_scale,
    Signal.LCB_FLIP: lambda t, f: _lcb(t, 1) - _lcb(t, 0),
    Signal.EXPECTED_COSINE: lambda t, f: -t.mean[:, 0],
    Signal.ITEM_STD: lambda t, f: np.sqrt(t.item_var),
    Signal.PROBIT_SOFTMAX: lambda t, f: -softmax_confidence(t.mean[:, 0], t.probit_log_normaliser, f.logit_scale,
                                                            f.probit_temperature, t.var[:, 0]),
    Signal.ALEATORIC_STD: lambda t, f: np.sqrt(t.aleatoric_var),
    Signal.TOTAL_STD: lambda t, f: np.sqrt(t.var[:, 0] + t.aleatoric_var),
    Signal.COSINE: lambda t, f: -t.map_cosine[:, 0],
    Signal.MARGIN: lambda t, f: -(t.map_cosine[:, 0] - t.map_cosine[:, 1]),
    Signal.SOFTMAX: lambda t, f: -softmax_confidence(t.map_cosine[:, 0], t.log_normaliser, f.logit_scale,
                                                     f.temperature),
    Signal.ITEM_MAHALANOBIS: lambda t, f: t.item_mahalanobis,
    Signal.ITEM_KNN: lambda t, f: t.item_knn,
    Signal.QUERY_MAHALANOBIS: lambda t, f: t.query_mahalanobis,
    Signal.QUERY_KNN: lambda t, f: t.query_knn,
}


def signal_values(signal: Signal | str, top: TopResults, fitted: Fitted) -> np.ndarray:
    """The uncertainty ``(n,)`` of every query's top-1 result under ``signal``.

    Raises:
        ValueError: if ``top`` lacks the signal's optional input.
    """
    signal = Signal(signal)
    if signal not in available_signals(top):
        raise ValueError(f"signal {signal.value!r} needs TopResults.{_INPUTS[signal]}, which is None")
    values = _SIGNALS[signal](top, fitted)
    return np.asarray(values, dtype=np.float64).reshape(-1)
