"""Score every query against the whole gallery, chunk by chunk, keeping per-query records.

The sweep asks the search engine for the exact cosine moments of every (query, item)
pair (:meth:`~bayesretrieval.queries.candidates.CandidateSearch.moments`), ranks the
gallery with each requested score (the engine's own scorers), and keeps only what the
metrics need: per-query ranking quantities, the two best results under the ``expected``
ranking, the top-``k`` pairs for calibration, and the softmax log-normalisers on a
temperature grid. Memory stays ``O(chunk * nb)`` however many queries there are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from bayesretrieval.evaluation.baselines import DEFAULT_TEMPERATURES, softmax_statistics
from bayesretrieval.metrics import average_precision, first_hit_rank, hits_at_k
from bayesretrieval.posterior import KroneckerPosterior
from bayesretrieval.queries.candidates import CandidateSearch
from bayesretrieval.queries.scorers import ScoreName, make_scorer
from bayesretrieval.queries.uncertainty import QuerySide


@dataclass(frozen=True)
class ScoreSpec:
    """One ranking score with its option.

    Attributes:
        score: the score name.
        kappa: the std multiplier (``lcb`` / ``ucb`` only).
    """

    score: ScoreName
    kappa: float = 1.0

    @property
    def label(self) -> str:
        """``"lcb(kappa=1)"`` for bounds, the plain name otherwise."""
        if self.score in (ScoreName.LCB, ScoreName.UCB, ScoreName.LCB_ITEM):
            return f"{self.score.value}(kappa={self.kappa:g})"
        return self.score.value


DEFAULT_SCORES = (
    ScoreSpec(ScoreName.MAP), ScoreSpec(ScoreName.EXPECTED),
    *(ScoreSpec(ScoreName.LCB, kappa) for kappa in (0.5, 1.0, 2.0)),
    *(ScoreSpec(ScoreName.UCB, kappa) for kappa in (0.5, 1.0, 2.0)),
    *(ScoreSpec(ScoreName.LCB_ITEM, kappa) for kappa in (1.0, 2.0, 4.0, 8.0, 16.0)),
)
"""The scores a benchmark reports: ``map``, ``expected``, and ``lcb`` / ``ucb`` / ``lcb_item`` at several kappas."""


@dataclass
class SweepRecords:
    """Per-query results of a sweep (``n`` queries).

    Attributes:
        rankings: per score label, ``{"first_hit", "ap", "hits"}`` arrays ``(n,)``
            (``hits``: relevant items among the top ``top``).
        top: the precision cut-off (also the number of calibration pairs per query).
        pair_mean: ``(n, top)`` ``E[cos]`` of the top results under ``expected``.
        pair_var: ``(n, top)`` ``Var[cos]``.
        pair_map: ``(n, top)`` cosines of the means.
        pair_relevant: ``(n, top)`` bool.
        pair_item: ``(n, top)`` int64 item ids of those results.
        query_variance: ``(n,)`` relative variance of each query embedding.
        log_normaliser: ``(n, nT)`` gallery softmax log-normalisers (cosines of the means).
        relevant_log_mass: ``(n, nT)`` the same over the relevant items.
        pair_var_item: ``(n, top)`` the item's own part of ``pair_var``.
        probit_log_normaliser: ``(n, nT)`` gallery probit-softmax log-normalisers (``E[cos]``, ``Var[cos]``).
        probit_relevant_log_mass: ``(n, nT)`` the same over the relevant items.
        temperatures: ``(nT,)`` the grid.
    """

    rankings: dict
    top: int
    pair_mean: np.ndarray
    pair_var: np.ndarray
    pair_map: np.ndarray
    pair_relevant: np.ndarray
    pair_item: np.ndarray
    query_variance: np.ndarray
    log_normaliser: np.ndarray
    relevant_log_mass: np.ndarray
    pair_var_item: np.ndarray
    probit_log_normaliser: np.ndarray
    probit_relevant_log_mass: np.ndarray
    temperatures: np.ndarray = field(default_factory=lambda: DEFAULT_TEMPERATURES.copy())


def query_relative_variance(means: torch.Tensor, scales: torch.Tensor, posterior: KroneckerPosterior) -> np.ndarray:
    """``q_t tr(Sigma_T) / |mu_t|^2`` per query (docs/math.md section 1), ``(nq,)``."""
    trace = float(torch.trace(posterior.output_cov))
    means = means.to(torch.float64)
    return (scales.to(torch.float64) * trace / means.pow(2).sum(dim=1)).numpy()


def sweep(
    engine: CandidateSearch,
    query: QuerySide,
    query_variance: np.ndarray,
    item_ids: np.ndarray,
    relevance: Callable[[np.ndarray], np.ndarray],
    logit_scale: float,
    scores: Sequence[ScoreSpec] = DEFAULT_SCORES,
    top: int = 10,
    chunk_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> SweepRecords:
    """Score all queries against every item and keep the per-query records.

    Args:
        engine: the candidate search of the query modality (holds estimator and posterior).
        query: the prepared queries (``nq``).
        query_variance: ``(nq,)`` from :func:`query_relative_variance`.
        item_ids: ``(nb,)`` the gallery's item ids, sorted ascending (the tie-break order).
        relevance: maps query rows ``(c,)`` to their relevance ``(c, nb)`` bool, columns
            in ``item_ids`` order.
        logit_scale: ``s`` for the softmax baseline.
        scores: the rankings to measure.
        top: precision cut-off and calibration pairs per query (``<= nb``).
        chunk_size: queries per engine call.
        progress: called with the number of queries done after every chunk.

    Returns:
        The records.
    """
    item_ids = np.asarray(item_ids, dtype=np.int64)
    nq, nb = int(query.means.shape[0]), len(item_ids)
    if np.any(np.diff(item_ids) <= 0):
        raise ValueError("item_ids must be sorted ascending without repeats")
    if not 1 <= top <= nb:
        raise ValueError(f"top must be in [1, nb={nb}], got {top}")
    if len(query_variance) != nq:
        raise ValueError(f"{nq} queries, {len(query_variance)} query variances")
    expected = make_scorer(ScoreName.EXPECTED)
    scorers = {spec.label: make_scorer(spec.score, spec.kappa) for spec in scores}
    parts: dict[str, list] = {}
    for start in range(0, nq, chunk_size):
        rows = np.arange(start, min(start + chunk_size, nq))
        I = np.broadcast_to(item_ids, (len(rows), nb)).copy()
        moments = engine.moments(query.take(rows), I)
        relevant = np.asarray(relevance(rows), dtype=bool)
        if relevant.shape != (len(rows), nb):
            raise ValueError(f"relevance gave shape {relevant.shape}, expected {(len(rows), nb)}")
        for label, scorer in scorers.items():
            values = scorer.scores(moments)
            _append(parts, f"{label}/first_hit", first_hit_rank(values, relevant))
            _append(parts, f"{label}/ap", average_precision(values, relevant))
            _append(parts, f"{label}/hits", hits_at_k(values, relevant, top))
        order = np.argsort(-expected.scores(moments), axis=1, kind="stable")[:, :top]
        for name, array in (("pair_mean", moments.mean), ("pair_var", moments.var), ("pair_map", moments.map_cosine),
                            ("pair_var_item", moments.var_item.clamp_min(0.0))):
            _append(parts, name, np.take_along_axis(array.numpy(), order, axis=1))
        _append(parts, "pair_relevant", np.take_along_axis(relevant, order, axis=1))
        _append(parts, "pair_item", item_ids[order])
        lse, relevant_lse = softmax_statistics(moments.map_cosine.numpy(), relevant, logit_scale)
        _append(parts, "log_normaliser", lse)
        _append(parts, "relevant_log_mass", relevant_lse)
        lse, relevant_lse = softmax_statistics(moments.mean.numpy(), relevant, logit_scale, var=moments.var.numpy())
        _append(parts, "probit_log_normaliser", lse)
        _append(parts, "probit_relevant_log_mass", relevant_lse)
        if progress is not None:
            progress(int(rows[-1]) + 1)
    done = {name: np.concatenate(arrays) for name, arrays in parts.items()}
    rankings = {label: {key: done[f"{label}/{key}"] for key in ("first_hit", "ap", "hits")} for label in scorers}
    return SweepRecords(rankings, top, done["pair_mean"], done["pair_var"], done["pair_map"], done["pair_relevant"],
                        done["pair_item"], np.asarray(query_variance, dtype=np.float64), done["log_normaliser"],
                        done["relevant_log_mass"], done["pair_var_item"], done["probit_log_normaliser"],
                        done["probit_relevant_log_mass"])


def _append(parts: dict, name: str, array: np.ndarray) -> None:
    parts.setdefault(name, []).append(np.asarray(array))
