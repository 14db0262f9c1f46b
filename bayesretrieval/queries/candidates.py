"""FAISS candidates, exact rerank from stored means and scalars, and the exactness certificate.

FAISS returns ``kc`` candidates per query by the expected cosine of the stored vectors;
the candidates' means and scalars are gathered (:mod:`bayesretrieval.queries.rows`) in
``O(kc)`` and scored exactly in float64. A query's top-``k`` is certified when its
``k``-th score is above the bound on any unreturned item's score (MATH.md section 5,
:mod:`bayesretrieval.queries.bounds`); uncertified queries are searched again with four
times as many candidates, up to a limit.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterator

import faiss
import numpy as np
import torch

from bayesretrieval.queries.bounds import (
    ScoreBounds,
    Spectra,
    candidate_variance_floor,
    float32_slack,
    has_variance_floor,
    score_bounds,
)
from bayesretrieval.queries.rows import StoredRows
from bayesretrieval.queries.scorers import Scorer
from bayesretrieval.queries.uncertainty import (
    ModelCovariances,
    PairMoments,
    QuerySide,
    UncertaintyForm,
    candidate_moments,
)
from bayesretrieval.similarity import CosineEstimator
from bayesretrieval.store.extremes import CollectionBounds

GROWTH = 4
RERANK_MARGIN = 1
"""Candidates beyond ``k`` the first rerank stage scores. One more makes its provisional
``k``-th score tight enough that, for ``expected``, no later candidate usually survives the
bound, and the second stage is skipped (benchmark collection: 11 stored means read per
query in one pass, against 10.02 in two passes with none, or 18 with eight)."""
DEFAULT_MAX_CANDIDATES = 65_536
LEARNED_HEADROOM = 2
"""A search's first FAISS round asks for this many times what the hardest query of the
previous search with the same settings needed. FAISS's cost grows with the count (1M
IVF, 100 queries: 168 candidates cost 1.4-4.3 ms more than 24-48 in interleaved
measurements), and a query that needs more than it got pays a second FAISS round."""


@dataclass
class SearchOutcome:
    """Certified top-``k`` of a batch of queries.

    Attributes:
        item_ids: ``(nq, k)`` int64, ``-1`` padding when fewer items are eligible.
        scores: ``(nq, k)`` float64.
        mean: ``(nq, k)`` ``E[cos]``.
        var: ``(nq, k)`` ``Var[cos]``.
        map_cosine: ``(nq, k)`` cosine of the means.
        certified: ``(nq,)`` whether the certificate held (no unreturned item can enter).
        exact: ``(nq,)`` certified and FAISS's ranking exhaustive: equal to a brute-force rerank.
        candidates: ``(nq,)`` candidate-set size the last round used.
        needed: ``(nq,)`` the fewest FAISS candidates whose certificate holds (the
            last round's size where none of its does).
        seconds: wall time of the ``faiss`` searches and of the ``rerank`` (scoring,
            bounds and certificate), summed over the rounds.
    """

    item_ids: np.ndarray
    scores: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    map_cosine: np.ndarray
    certified: np.ndarray
    exact: np.ndarray
    candidates: np.ndarray
    needed: np.ndarray
    seconds: dict = field(default_factory=lambda: {"faiss": 0.0, "rerank": 0.0})

    @classmethod
    def empty(cls, nq: int, k: int) -> "SearchOutcome":
        """No results yet for ``nq`` queries: ids ``-1``, scores ``-inf``, nothing certified."""
        nan = np.full((nq, k), np.nan)
        return cls(np.full((nq, k), -1, np.int64), np.full((nq, k), -np.inf), nan.copy(), nan.copy(), nan.copy(),
                   np.zeros(nq, bool), np.zeros(nq, bool), np.zeros(nq, np.int64), np.zeros(nq, np.int64))


def default_candidates(k: int) -> int:
    """First-round FAISS candidate count: ``4 max(2 k, k + 32)``."""
    return GROWTH * max(2 * k, k + 32)


@contextlib.contextmanager
def serial_torch() -> Iterator[None]:
    """Run the enclosed tensor ops on one thread, restoring the setting afterwards.

    The rerank's ops are small (``nq * kc`` rows); with FAISS's OpenMP pool on the same
    cores, intra-op threads only add contention. FAISS calls must stay outside (the
    thread count is shared with FAISS's OpenMP runtime).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def is_exhaustive(index: faiss.Index, nprobe: int | None) -> bool:
    """Whether FAISS's ranking is exact: flat storage, and every IVF list probed."""
    inner = faiss.downcast_index(index.index) if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)) else index
    if isinstance(inner, faiss.IndexFlat):
        return True
    if isinstance(inner, faiss.IndexIVFFlat):
        return (nprobe or inner.nprobe) >= inner.nlist
    return False


def search_parameters(index: faiss.Index, selector, nprobe: int | None):
    """FAISS search parameters with an optional ID selector and ``nprobe`` (IVF); ``None`` when neither applies."""
    inner = faiss.downcast_index(index.index) if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)) else index
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


class CandidateSearch:
    """Certified exact reranking over a FAISS index and the stored arrays.

    Args:
        index: inner-product FAISS index over ``mu / sqrt(|mu|^2 + q tr Sigma_I)``, ids = item ids.
        items: the stored rows.
        covs: covariances for the query modality and estimator.
        extremes: the collection's ratio extremes (see :class:`CollectionBounds`).
        form: the item uncertainty form.
        estimator: the cosine estimator.
    """

    def __init__(self, index, items: StoredRows, covs: ModelCovariances, extremes: CollectionBounds,
                 form: UncertaintyForm | str = UncertaintyForm.KFAC,
                 estimator: CosineEstimator | str = CosineEstimator.SECOND_ORDER):
        if index.d != covs.item_cov.shape[0]:
            raise ValueError(f"FAISS index has dim {index.d}, posterior has dim {covs.item_cov.shape[0]}")
        self.index, self.items, self.covs, self.extremes = index, items, covs, extremes
        self.form, self.estimator = UncertaintyForm(form), CosineEstimator(estimator)
        self.spectra = Spectra.of(covs)
        self.slack = float32_slack(index.d)
        self.has_floor = has_variance_floor(self.form, self.estimator)
        self._learned: dict[tuple, int] = {}

    def moments(self, query: QuerySide, I: np.ndarray) -> PairMoments:
        """Exact moments of queries with the items ``I`` ``(nq, kc)``."""
        return candidate_moments(query, self.items.gather(I, self.form), self.covs, self.form, self.estimator)

    def search(self, query: QuerySide, scorer: Scorer, k: int, selector=None, nprobe: int | None = None,
               candidates: int | None = None, max_candidates: int = DEFAULT_MAX_CANDIDATES) -> SearchOutcome:
        """Top ``k`` per query by ``scorer``, growing the candidate set until certified.

        Args:
            query: ``nq`` prepared queries.
            scorer: the ranking score.
            k: results per query (``>= 1``).
            selector: a FAISS ``IDSelector`` restricting the search, or ``None``.
            nprobe: IVF lists to probe (``None``: the index's setting).
            candidates: first-round FAISS candidate count. Default:
                :func:`default_candidates` for the first search with a score, ``kappa``,
                ``k`` and filtering; after it, :data:`LEARNED_HEADROOM` times what the
                hardest query of the previous such search needed, where that is less than
                the default or the default fell short (:func:`_next_first_round`). Only
                speed depends on it: only the candidates that can matter are reranked
                (see :meth:`_rerank`).
            max_candidates: stop growing here and report the query as not certified.

        Returns:
            The outcome, arrays ``(nq, k)`` and ``(nq,)``.
        """
        nq = query.means.shape[0]
        with serial_torch():
            xq = query.faiss_queries()
        params = search_parameters(self.index, selector, nprobe)
        exhaustive = is_exhaustive(self.index, nprobe)
        total = max(int(self.index.ntotal), 1)
        key = (scorer.name, getattr(scorer, "kappa", None), k, selector is None)
        kc = min(max(candidates or self._learned.get(key, default_candidates(k)), k), total)
        out = SearchOutcome.empty(nq, k)
        pending = np.arange(nq)
        while pending.size:
            start = time.perf_counter()
            D, I = self.index.search(xq[pending], kc, params=params)
            searched = time.perf_counter()
            out.seconds["faiss"] += searched - start
            with serial_torch():
                sub = query.take(pending)
                bounds = self._bounds(sub, D)  # column j: on any item whose inner product is at most D[:, j]
                scored, moments, ranking = self._rerank(sub, scorer, k, D, I, bounds)
                column_bounds = scorer.upper_bound(bounds)
            exhausted = (I[:, -1] < 0) | (kc >= total)
            kth = ranking.scores[:, -1] if ranking.scores.shape[1] == k else np.full(len(pending), -np.inf)
            certified = exhausted | (kth > column_bounds[:, -1])
            done = certified | (kc >= max_candidates)
            _store(out, pending[done], ranking, moments, scored, done)
            out.certified[pending[done]] = certified[done]
            out.candidates[pending[done]] = kc
            out.needed[pending[done]] = _certifying_count(column_bounds, kth)[done]
            pending = pending[~done]
            kc = min(kc * GROWTH, total, max(max_candidates, k))
            out.seconds["rerank"] += time.perf_counter() - searched
        out.exact = out.certified & exhaustive
        learned = _next_first_round(int(out.needed.max(initial=0)), default_candidates(k))
        self._learned[key] = min(max(learned, k + RERANK_MARGIN), total)
        return out

    def _moments_of_survivors(self, query: QuerySide, survivors: np.ndarray) -> PairMoments:
        """Like :meth:`moments` for ids packed left in ``survivors`` ``(nq, w)`` (NaN where ``-1``), scoring only real ids.

        Each query's ids are laid out in rows of the mean survivor count per query that
        has any (a row repeats its query's side), so the padding scored stays under
        one such row per query, however many survivors the busiest query has.
        """
        valid = survivors >= 0
        counts = valid.sum(1)
        width = -(-int(counts.sum()) // max(int(np.count_nonzero(counts)), 1))
        rows_per_query = -(-counts // width)
        owner = np.repeat(np.arange(len(survivors)), rows_per_query)
        q, j = np.nonzero(valid)  # by query, then column 0, 1, ... (packed left)
        row, column = (np.cumsum(rows_per_query) - rows_per_query)[q] + j // width, j % width
        ids = np.full((len(owner), width), -1, dtype=survivors.dtype)
        ids[row, column] = survivors[q, j]
        part = self.moments(query.take(owner), ids)
        spread = lambda values: torch.full(survivors.shape, torch.nan, dtype=values.dtype).index_put_(  # noqa: E731
            (torch.from_numpy(q), torch.from_numpy(j)), values[torch.from_numpy(row), torch.from_numpy(column)])
        return PairMoments(spread(part.mean), spread(part.var), spread(part.map_cosine))

    def _bounds(self, query: QuerySide, f: np.ndarray) -> ScoreBounds:
        """Bounds on items with FAISS inner product at most ``f`` (``(nq,)`` or ``(nq, c)``)."""
        return score_bounds(f.astype(np.float64) + self.slack, query, self.covs, self.extremes, self.form,
                            self.estimator, self.spectra)

    def _may_enter(self, query: QuerySide, scorer: Scorer, kth: np.ndarray, f: np.ndarray, ids: np.ndarray,
                   bounds: ScoreBounds):
        """Which candidates ``ids`` ``(nq, c)`` (FAISS inner products ``f``) can reach ``kth`` ``(nq,)``.

        Their ``bounds`` from ``f`` alone first; for scorers that gain from it, the
        candidates that pass get a variance floor from their stored scalars and are
        bounded again (in ``bounds``, a slice of the caller's).
        """
        may = (scorer.upper_bound(bounds) >= kth[:, None]) & (ids >= 0)
        if scorer.uses_variance_floor and self.has_floor and may.any():
            order, taken = _packed_columns(may)
            packed_floor = candidate_variance_floor(
                np.take_along_axis(f, order, axis=1).astype(np.float64), self.slack,
                self.items.gather_scalars(np.where(taken, np.take_along_axis(ids, order, axis=1), -1)), query,
                self.covs, self.form, self.estimator, self.spectra)
            floor = np.zeros(f.shape)
            np.put_along_axis(floor, order, np.where(taken, packed_floor, 0.0), axis=1)
            bounds.var_floor = floor
            may &= scorer.upper_bound(bounds) >= kth[:, None]
        return may

    def _rerank(self, query: QuerySide, scorer: Scorer, k: int, D: np.ndarray, I: np.ndarray, bounds: ScoreBounds):
        """Exact scores of the candidates that can still matter, in two stages.

        FAISS's first ``k +`` :data:`RERANK_MARGIN` candidates give a provisional
        ``k``-th score; a later candidate whose score bound (from its FAISS inner
        product and stored scalars) is below it cannot enter the top ``k``. Each query's
        remaining candidates are packed to the left, and the second stage scores only
        them (:meth:`_moments_of_survivors`). Every stored row gathered costs a random
        memory access, so the first stage reads few rows.

        Args:
            bounds: every candidate column's bounds from its FAISS inner product ``D``.

        Returns:
            ``(I, moments, ranking)`` over the scored candidates (``-1`` where packing
            left a gap).
        """
        first = min(I.shape[1], k + RERANK_MARGIN)
        moments = self.moments(query, I[:, :first])
        ranking = scorer.rank(moments, I[:, :first], k)
        if first == I.shape[1]:
            return I, moments, ranking
        kth = ranking.scores[:, -1] if ranking.scores.shape[1] == k else np.full(len(I), -np.inf)
        may = self._may_enter(query, scorer, kth, D[:, first:], I[:, first:], bounds.columns(first))
        survivors = _pack_left(I[:, first:], may)
        if survivors.shape[1] == 0:
            return I[:, :first], moments, ranking
        extra = self._moments_of_survivors(query, survivors)
        scored = np.concatenate([I[:, :first], survivors], axis=1)
        moments = PairMoments(*(torch.cat([a, b], dim=1) for a, b in (
            (moments.mean, extra.mean), (moments.var, extra.var), (moments.map_cosine, extra.map_cosine))))
        return scored, moments, scorer.rank(moments, scored, k)


def _next_first_round(needed: int, default: int) -> int:
    """First-round FAISS candidates after a search whose hardest query needed ``needed``.

    :data:`LEARNED_HEADROOM` times that where it fits under ``default`` (or where
    ``default`` fell short), else ``default``: a need close to it does not make a larger
    first round pay.
    """
    wanted = LEARNED_HEADROOM * needed
    return wanted if wanted <= default or needed > default else default


def _certifying_count(column_bounds: np.ndarray, kth: np.ndarray) -> np.ndarray:
    """Per query, the fewest candidates whose certificate holds: one past the first column
    whose bound is below the ``k``-th score (bounds only fall along a row); all columns if none is.
    """
    below = column_bounds < kth[:, None]
    return np.where(below.any(axis=1), below.argmax(axis=1) + 1, column_bounds.shape[1])


def _packed_columns(keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``keep`` ``(nq, c)``, its kept columns first, in order, then others; as wide as the most kept.

    Returns:
        ``(order, taken)``, both ``(nq, width)``: column indices, and which of them are kept.
    """
    width = int(keep.sum(1).max(initial=0))
    order = np.argsort(~keep, axis=1, kind="stable")[:, :width]
    return order, np.take_along_axis(keep, order, axis=1)


def _pack_left(I: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The ids of ``I`` ``(nq, c)`` where ``keep``, moved left in order, ``-1`` after; as wide as the most kept."""
    order, taken = _packed_columns(keep)
    return np.where(taken, np.take_along_axis(I, order, axis=1), -1)


def _store(out: SearchOutcome, rows: np.ndarray, ranking, moments: PairMoments, I: np.ndarray, done: np.ndarray):
    pos = ranking.positions[done]
    found = pos >= 0
    safe = np.where(found, pos, 0)
    width = pos.shape[1]
    pick = lambda a: np.where(found, np.take_along_axis(np.asarray(a)[done], safe, axis=1), np.nan)  # noqa: E731
    out.item_ids[rows, :width] = np.where(found, np.take_along_axis(I[done], safe, axis=1), -1)
    out.scores[rows, :width] = ranking.scores[done]
    out.mean[rows, :width] = pick(moments.mean.numpy())
    out.var[rows, :width] = pick(moments.var.numpy())
    out.map_cosine[rows, :width] = pick(moments.map_cosine.numpy())
