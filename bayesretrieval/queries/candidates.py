"""FAISS candidates, exact rerank from stored means and scalars, and the exactness certificate.

FAISS returns ``kc`` candidates per query by the expected cosine of the stored vectors;
the candidates' rows are read from the index arrays and scored exactly in float64. A
query's top-``k`` is certified when its ``k``-th score is above the bound on any
unreturned item's score (docs/math.md section 8, :mod:`bayesretrieval.queries.bounds`);
uncertified queries are searched again with :data:`GROWTH` times as many candidates, up
to a limit. The first round's size is a static rule of the scorer
(:meth:`~bayesretrieval.queries.scorers.Scorer.first_round`), so the same call always
does the same work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import faiss
import numpy as np
import torch

from bayesretrieval.options import DEFAULT_MAX_CANDIDATES
from bayesretrieval.queries.bounds import (
    ScoreBounds,
    Spectra,
    candidate_variance_floor,
    float32_slack,
    has_variance_floor,
    score_bounds,
)
from bayesretrieval.queries.scorers import Scorer
from bayesretrieval.queries.uncertainty import ModelCovariances, PairMoments, QuerySide, pair_moments
from bayesretrieval.similarity import CosineEstimator
from bayesretrieval.store import CovarianceForm, IndexReader
from bayesretrieval.store.extremes import CollectionExtremes

GROWTH = 4
"""Factor by which an uncertified query's candidate count grows from one round to the next."""
RERANK_MARGIN = 1
"""Candidates beyond ``k`` the first rerank stage scores: one more makes its provisional
``k``-th score tight enough that, for ``expected``, no later candidate usually survives
the bound and the second stage scores nothing."""

_MOMENT_NAMES = ("mean", "var", "map_cosine", "var_query", "var_item", "var_joint")
"""The :class:`PairMoments` a :class:`SearchOutcome` keeps for its top ``k``."""


@dataclass
class SearchOutcome:
    """Certified top-``k`` of a batch of queries.

    Attributes:
        item_ids: ``(nq, k)`` int64, ``-1`` padding when fewer items are eligible.
        scores: ``(nq, k)`` float64.
        mean: ``(nq, k)`` ``E[cos]``.
        var: ``(nq, k)`` ``Var[cos]``.
        map_cosine: ``(nq, k)`` cosine of the means.
        var_query: ``(nq, k)`` the part of ``var`` due to the query's noise alone (docs/math.md section 7).
        var_item: ``(nq, k)`` the part due to the item's noise alone.
        var_joint: ``(nq, k)`` the joint part, ``var`` less the two (before clamping).
        certified: ``(nq,)`` whether the certificate held (no unreturned item can enter).
        exact: ``(nq,)`` certified and FAISS's ranking exhaustive: equal to a brute-force rerank.
        candidates: ``(nq,)`` FAISS candidates the last round asked for.
        needed: ``(nq,)`` the fewest FAISS candidates whose certificate holds (the
            last round's count where none of its does).
        seconds: wall time of the ``faiss`` searches and of the ``rerank`` (scoring,
            bounds and certificate), summed over the rounds.
    """

    item_ids: np.ndarray
    scores: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    map_cosine: np.ndarray
    var_query: np.ndarray
    var_item: np.ndarray
    var_joint: np.ndarray
    certified: np.ndarray
    exact: np.ndarray
    candidates: np.ndarray
    needed: np.ndarray
    seconds: dict = field(default_factory=lambda: {"faiss": 0.0, "rerank": 0.0})

    @classmethod
    def empty(cls, nq: int, k: int) -> "SearchOutcome":
        """No results yet for ``nq`` queries: ids ``-1``, scores ``-inf``, moments NaN, nothing certified."""
        moments = {name: np.full((nq, k), np.nan) for name in _MOMENT_NAMES}
        return cls(item_ids=np.full((nq, k), -1, np.int64), scores=np.full((nq, k), -np.inf), **moments,
                   certified=np.zeros(nq, bool), exact=np.zeros(nq, bool), candidates=np.zeros(nq, np.int64),
                   needed=np.zeros(nq, np.int64))


@dataclass
class ScoredPairs:
    """Scored (query, item) pairs of a batch, flat.

    Attributes:
        query_rows: ``(P,)`` positions of the queries in the batch.
        item_ids: ``(P,)``.
        moments: each ``(P,)``.
        scores: ``(P,)`` float64.
    """

    query_rows: np.ndarray
    item_ids: np.ndarray
    moments: PairMoments
    scores: np.ndarray

    def __add__(self, other: "ScoredPairs") -> "ScoredPairs":
        """Both sets of pairs, ``self``'s first."""
        return ScoredPairs(
            np.concatenate([self.query_rows, other.query_rows]), np.concatenate([self.item_ids, other.item_ids]),
            PairMoments(*(torch.cat([a, b])
                          for a, b in zip(vars(self.moments).values(), vars(other.moments).values()))),
            np.concatenate([self.scores, other.scores]))

    def top(self, nq: int, k: int) -> np.ndarray:
        """``(nq, k)`` positions of each query's best ``k`` pairs, ``-1`` padding.

        Higher score first; ties go to the smaller item id, so results never depend on
        FAISS's order.
        """
        order = np.lexsort((self.item_ids, -self.scores, self.query_rows))
        rows = self.query_rows[order]
        rank = np.arange(len(order)) - np.searchsorted(rows, rows)
        keep = rank < k
        positions = np.full((nq, k), -1, dtype=np.int64)
        positions[rows[keep], rank[keep]] = order[keep]
        return positions

    def kth_scores(self, positions: np.ndarray) -> np.ndarray:
        """``(nq,)`` the ``k``-th best score of each query, ``-inf`` for a query with fewer than ``k`` pairs."""
        return _at(self.scores, positions[:, -1], -np.inf)


def stores_exact_vectors(index: faiss.Index) -> bool:
    """Whether FAISS's inner products are exact up to float32 rounding: ``Flat`` or ``IVF*,Flat`` storage."""
    return isinstance(_inner(index), (faiss.IndexFlat, faiss.IndexIVFFlat))


def is_exhaustive(index: faiss.Index, nprobe: int | None) -> bool:
    """Whether FAISS's ranking is exact: exact storage, and every IVF list probed."""
    inner = _inner(index)
    if isinstance(inner, faiss.IndexIVF):
        return stores_exact_vectors(index) and (nprobe or inner.nprobe) >= inner.nlist
    return stores_exact_vectors(index)


def search_parameters(index: faiss.Index, selector, nprobe: int | None):
    """FAISS search parameters with an optional ID selector and ``nprobe`` (IVF); ``None`` when neither applies."""
    inner = _inner(index)
    if isinstance(inner, faiss.IndexIVF):
        params = faiss.SearchParametersIVF()
        params.nprobe = int(nprobe or inner.nprobe)
    elif selector is not None:
        params = faiss.SearchParameters()
    else:
        return None
    if selector is not None:
        params.sel = selector
    return params


def _inner(index: faiss.Index) -> faiss.Index:
    """The index under an ``IDMap`` wrapper."""
    return faiss.downcast_index(index.index) if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)) else index


class CandidateSearch:
    """Certified exact reranking over a FAISS index and the stored arrays.

    Args:
        reader: the index version; its FAISS index holds ``mu / sqrt(|mu|^2 + q tr Sigma_I)``
            with ids = item ids.
        covs: covariances for the query modality and estimator.
        form: the item covariance form.
        estimator: the cosine estimator.
    """

    def __init__(self, reader: IndexReader, covs: ModelCovariances, form: CovarianceForm | str = CovarianceForm.KFAC,
                 estimator: CosineEstimator | str = CosineEstimator.SECOND_ORDER):
        self.reader, self.index, self.covs = reader, reader.faiss_index, covs
        if self.index.d != covs.item_cov.shape[0]:
            raise ValueError(f"FAISS index has dim {self.index.d}, posterior has dim {covs.item_cov.shape[0]}")
        self.form, self.estimator = CovarianceForm(form), CosineEstimator(estimator)
        self.extremes: CollectionExtremes = reader.extremes(self.form)
        self.spectra = Spectra.of(covs)
        self.slack = float32_slack(self.index.d)
        self.has_floor = has_variance_floor(self.form, self.estimator)
        self.prunes = stores_exact_vectors(self.index)

    def pair_moments(self, query: QuerySide, query_rows: np.ndarray, item_ids: np.ndarray) -> PairMoments:
        """Exact moments of the pairs (query ``query_rows[p]``, item ``item_ids[p]``), each ``(P,)``.

        Raises:
            ValueError: if an item id is not in the index.
        """
        items = self.reader.fetch(item_ids, self.form)
        return pair_moments(query, query_rows, items, self.covs, self.form, self.estimator)

    def moments(self, query: QuerySide, I: np.ndarray) -> PairMoments:
        """Exact moments of every query with each of its items ``I`` ``(nq, c)``.

        Each moment is ``(nq, c)``, NaN where ``I`` is ``-1``.
        """
        rows, columns = np.nonzero(I >= 0)
        flat = self.pair_moments(query, rows, I[rows, columns])
        spread = lambda values: torch.full(I.shape, torch.nan, dtype=torch.float64).index_put_(  # noqa: E731
            (torch.from_numpy(rows), torch.from_numpy(columns)), values)
        return PairMoments(*(spread(values) for values in vars(flat).values()))

    def search(self, query: QuerySide, scorer: Scorer, k: int, selector=None, nprobe: int | None = None,
               candidates: int | None = None, max_candidates: int = DEFAULT_MAX_CANDIDATES) -> SearchOutcome:
        """Top ``k`` per query by ``scorer``, growing the candidate set until certified.

        Args:
            query: ``nq`` prepared queries.
            scorer: the ranking score.
            k: results per query (``>= 1``).
            selector: a FAISS ``IDSelector`` restricting the search, or ``None``.
            nprobe: IVF lists to probe (``None``: the index's setting).
            candidates: first-round FAISS candidate count (default: the scorer's
                :meth:`~bayesretrieval.queries.scorers.Scorer.first_round`). Only speed
                depends on it.
            max_candidates: stop growing here and report the query as not certified.

        Returns:
            The outcome, arrays ``(nq, k)`` and ``(nq,)``.
        """
        xq = query.faiss_queries()
        params = search_parameters(self.index, selector, nprobe)
        total = max(int(self.index.ntotal), 1)
        kc = min(max(candidates or scorer.first_round(k), k), total)
        out = SearchOutcome.empty(len(xq), k)
        pending = np.arange(len(xq))
        while pending.size:
            start = time.perf_counter()
            D, I = self.index.search(xq[pending], kc, params=params)
            searched = time.perf_counter()
            sub = query.take(pending)
            bounds = score_bounds(D.astype(np.float64) + self.slack, sub, self.covs, self.extremes, self.form,
                                  self.estimator, self.spectra)  # column j: any item whose inner product is <= D[:, j]
            column_bounds = scorer.upper_bound(bounds)
            pairs = self._rerank(sub, scorer, k, D, I, bounds, column_bounds)
            top = pairs.top(len(pending), k)
            kth = pairs.kth_scores(top)
            certified = (I[:, -1] < 0) | (kc >= total) | (kth > column_bounds[:, -1])
            done = certified | (kc >= max_candidates)
            store_pairs(out, pending[done], pairs, top[done])
            out.certified[pending[done]] = certified[done]
            out.candidates[pending[done]] = kc
            out.needed[pending[done]] = _certifying_count(column_bounds, kth)[done]
            pending = pending[~done]
            kc = min(kc * GROWTH, total, max(max_candidates, k))
            out.seconds["faiss"] += searched - start
            out.seconds["rerank"] += time.perf_counter() - searched
        out.exact = out.certified & is_exhaustive(self.index, nprobe)
        return out

    def _rerank(self, query: QuerySide, scorer: Scorer, k: int, D: np.ndarray, I: np.ndarray,
                bounds: ScoreBounds, column_bounds: np.ndarray) -> ScoredPairs:
        """Exact scores of the candidates that can still enter the top ``k``, in two stages.

        The first ``k +`` :data:`RERANK_MARGIN` candidates give a provisional ``k``-th
        score; a later candidate whose score bound (``column_bounds``, tightened by its
        variance floor where the scorer gains from one) is below it cannot enter the top
        ``k`` and is not read. Every stored row read costs a random memory access. FAISS's
        inner products bound nothing when its vectors are quantised (``SQ8``, ...): there
        every candidate is scored.
        """
        in_first = np.arange(I.shape[1]) < (k + RERANK_MARGIN if self.prunes else I.shape[1])
        pairs = self._score(query, scorer, I, (I >= 0) & in_first)
        if in_first.all():
            return pairs
        kth = pairs.kth_scores(pairs.top(len(I), k))
        may_enter = (column_bounds >= kth[:, None]) & (I >= 0) & ~in_first
        if scorer.uses_variance_floor and self.has_floor:
            self._apply_variance_floor(may_enter, query, scorer, kth, D, I, bounds)
        return pairs + self._score(query, scorer, I, may_enter)

    def _score(self, query: QuerySide, scorer: Scorer, I: np.ndarray, mask: np.ndarray) -> ScoredPairs:
        """The pairs (query ``q``, item ``I[q, j]``) where ``mask``, scored."""
        rows, columns = np.nonzero(mask)
        item_ids = I[rows, columns]
        moments = self.pair_moments(query, rows, item_ids)
        return ScoredPairs(rows, item_ids, moments, scorer.scores(moments))

    def _apply_variance_floor(self, may_enter: np.ndarray, query: QuerySide, scorer: Scorer, kth: np.ndarray,
                              D: np.ndarray, I: np.ndarray, bounds: ScoreBounds) -> None:
        """Clear ``may_enter`` where a candidate's bound with its variance floor is below ``kth``.

        The floor needs only the candidate's stored scalars, not its mean (docs/math.md section 9).
        """
        rows, columns = np.nonzero(may_enter)
        f = D[rows, columns].astype(np.float64)
        floor = candidate_variance_floor(f, self.slack, self.reader.fetch_scalars(I[rows, columns]), query, rows,
                                         self.covs, self.estimator, self.spectra)
        pair_bounds = ScoreBounds(bounds.mean[rows, columns], bounds.var[rows, 0], bounds.map_cosine[rows, columns],
                                  floor)
        below = scorer.upper_bound(pair_bounds) < kth[rows]
        may_enter[rows[below], columns[below]] = False


def _certifying_count(column_bounds: np.ndarray, kth: np.ndarray) -> np.ndarray:
    """Per query, the fewest candidates whose certificate holds.

    That is one past the first column whose bound is below the ``k``-th score (bounds only
    fall along a row); all columns if none is.
    """
    below = column_bounds < kth[:, None]
    return np.where(below.any(axis=1), below.argmax(axis=1) + 1, column_bounds.shape[1])


def store_pairs(out: SearchOutcome, rows: np.ndarray, pairs: ScoredPairs, positions: np.ndarray) -> None:
    """Write the pairs at ``positions`` ``(len(rows), k)`` into the outcome's ``rows``."""
    out.item_ids[rows] = _at(pairs.item_ids, positions, -1)
    out.scores[rows] = _at(pairs.scores, positions, -np.inf)
    for name in _MOMENT_NAMES:
        getattr(out, name)[rows] = _at(getattr(pairs.moments, name).numpy(), positions, np.nan)


def _at(values: np.ndarray, positions: np.ndarray, fill) -> np.ndarray:
    """``values[positions]`` with ``fill`` where a position is ``-1`` (also when ``values`` is empty)."""
    return np.append(values, fill)[positions]
