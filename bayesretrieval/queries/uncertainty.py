"""Cosine moments of (query, candidate) pairs for each form of item uncertainty an index holds.

Every form feeds :func:`bayesretrieval.similarity.cosine_moments_from_statistics` (the one
place the estimators live) through a *per-pair layout*: the ``P = nq * kc`` (query,
candidate) pairs are flattened, the item side's statistics get shape ``(1, P)`` and the
query side's ``(P,)``, so the estimators' ``x[:, None]`` / ``y[None, :]`` broadcasting
meets pair by pair and the result has shape ``(1, 1, P)``. This lets the per-item
covariance forms put per-pair numbers where the Kronecker form has shared constants.

Forms (MATH.md section 4):

- ``kfac``: item covariance ``q_i Sigma_I``; the stored scalars are exact.
- ``diag``: item covariance ``diag(d_i)`` (``variance_diag``).
- ``lowrank``: item covariance ``L_i^T L_i + diag(d_i)`` (``variance_lowrank``, ``variance_diag``).

The query always carries ``q_y Sigma_Q`` with ``Sigma_Q`` its modality's output covariance
(``Sigma_T`` for text, ``Sigma_I`` for image queries).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch

from bayesretrieval.posterior import Modality, PosteriorPair
from bayesretrieval.similarity import (
    CosineEstimator,
    CovarianceConstants,
    PairTerms,
    SideStatistics,
    cosine_moments_from_statistics,
    uses_diagonal_covariance,
)
from bayesretrieval.store.format import SCALAR_COLUMNS


class UncertaintyForm(str, Enum):
    """How the index describes an item's embedding covariance."""

    KFAC = "kfac"
    """``q_i Sigma_I`` from the stored per-item scalars (exact, MATH.md section 4)."""
    DIAG = "diag"
    """A per-item diagonal covariance ``diag(variance_diag_i)``."""
    LOWRANK = "lowrank"
    """A per-item low-rank factor plus diagonal, ``L_i^T L_i + diag(variance_diag_i)``."""


_COL = {name: i for i, name in enumerate(SCALAR_COLUMNS)}
PRODUCT_CHUNK_ROWS = 128
"""Candidate means converted to float64 at a time by :func:`candidate_moments` (512 KiB at D = 512)."""


@dataclass(frozen=True)
class ModelCovariances:
    """The output covariances used for one (item, query) modality pair and estimator.

    Attributes:
        item_cov: ``Sigma_I`` ``(D, D)`` float64 (its diagonal for diagonal estimators).
        query_cov: ``Sigma_Q`` ``(D, D)`` float64 (its diagonal for diagonal estimators).
        query_modality: modality of the queries.
        diagonal: whether the estimator uses diagonal covariances.
        constants: traces of the pair ``(Sigma_I, Sigma_Q)``.
    """

    item_cov: torch.Tensor
    query_cov: torch.Tensor
    query_modality: Modality
    diagonal: bool
    constants: CovarianceConstants

    @classmethod
    def from_posterior(
        cls, posterior: PosteriorPair, query_modality: Modality | str, estimator: CosineEstimator | str
    ) -> "ModelCovariances":
        """Select and (for ``published``) diagonalise the covariances."""
        query_modality = Modality(query_modality)
        diagonal = uses_diagonal_covariance(estimator)
        query_posterior = posterior.image if query_modality is Modality.IMAGE else posterior.text
        item_cov, query_cov = posterior.image.output_cov, query_posterior.output_cov
        if diagonal:
            item_cov, query_cov = torch.diag(torch.diagonal(item_cov)), torch.diag(torch.diagonal(query_cov))
        item_cov, query_cov = item_cov.to(torch.float64), query_cov.to(torch.float64)
        constants = CovarianceConstants.from_covariances(item_cov, query_cov)
        return cls(item_cov, query_cov, query_modality, diagonal, constants)

    def item_columns(self) -> tuple[int, int]:
        """Scalar columns of ``mu^T Sigma_I mu`` and ``mu^T Sigma_Q mu`` for stored items."""
        suffix = "_diag" if self.diagonal else ""
        other = "quad_image" if self.query_modality is Modality.IMAGE else "quad_text"
        return _COL["quad_image" + suffix], _COL[other + suffix]


@dataclass
class QuerySide:
    """Per-query quantities, computed once per query (MATH.md section 4).

    Attributes:
        means: ``(nq, D)`` float64 unnormalised query means ``mu_y``.
        stats: query statistics, each ``(nq,)``: ``scale`` ``q_y``, ``norm_sq``,
            ``own_quad`` ``mu_y^T Sigma_Q mu_y``, ``other_quad`` ``mu_y^T Sigma_I mu_y``.
        probes: ``(nq, D, 3)``: ``mu_y``, ``Sigma_I mu_y`` and ``Sigma_Q mu_y``, the vectors
            a candidate mean is multiplied with.
        expected_norm: ``(nq,)`` ``sqrt(E|y|^2)``.
    """

    means: torch.Tensor
    stats: SideStatistics
    probes: torch.Tensor
    expected_norm: torch.Tensor

    @classmethod
    def build(cls, means, scales, covs: ModelCovariances) -> "QuerySide":
        """From query means ``(nq, D)`` and scales ``q_y`` ``(nq,)`` (tensors or arrays)."""
        means = torch.as_tensor(means).detach().to(torch.float64)
        scales = torch.as_tensor(scales).detach().to(torch.float64)
        if means.ndim != 2 or means.shape[1] != covs.item_cov.shape[0]:
            raise ValueError(f"query means have shape {tuple(means.shape)}, expected (nq, {covs.item_cov.shape[0]})")
        if scales.shape != (means.shape[0],):
            raise ValueError(f"query scales have shape {tuple(scales.shape)}, expected ({means.shape[0]},)")
        rows = torch.empty((len(means), 3, means.shape[1]), dtype=torch.float64)  # written in place: no copies
        rows[:, 0] = means
        torch.mm(means, covs.item_cov, out=rows[:, 1])
        torch.mm(means, covs.query_cov, out=rows[:, 2])
        norm_sq, other_quad, own_quad = torch.bmm(rows, means[:, :, None])[:, :, 0].unbind(1)
        stats = SideStatistics(scales, norm_sq, own_quad, other_quad)
        expected_norm = torch.sqrt(stats.expected_norm_sq(covs.constants.trace_y))
        return cls(means, stats, rows.transpose(1, 2), expected_norm)

    def faiss_queries(self) -> np.ndarray:
        """``xq = mu_y / sqrt(E|y|^2)`` ``(nq, D)`` float32: FAISS inner products are ``E[cos]``."""
        return np.ascontiguousarray((self.means / self.expected_norm[:, None]).numpy(), dtype=np.float32)

    def take(self, rows: np.ndarray) -> "QuerySide":
        """The queries at positions ``rows`` (``self`` when that is all of them, in order)."""
        if len(rows) == len(self.means) and np.array_equal(rows, np.arange(len(rows))):
            return self
        rows = torch.as_tensor(rows, dtype=torch.long)
        stats = SideStatistics(*(t[rows] for t in (self.stats.scale, self.stats.norm_sq,
                                                   self.stats.own_quad, self.stats.other_quad)))
        return QuerySide(self.means[rows], stats, self.probes[rows], self.expected_norm[rows])


@dataclass
class Candidates:
    """Stored rows of the candidates of every query, padded to ``kc`` per query.

    Attributes:
        item_ids: ``(nq, kc)`` int64, ``-1`` where there is no candidate.
        means: ``(nq, kc, D)`` float32 unnormalised item means (zeros where ``-1``).
        scalars: ``(nq, kc, 6)`` float64 stored scalars (ones where ``-1``).
        variance_diag: ``(nq, kc, D)`` or ``None``.
        variance_lowrank: ``(nq, kc, r, D)`` or ``None``.
    """

    item_ids: np.ndarray
    means: np.ndarray
    scalars: np.ndarray
    variance_diag: np.ndarray | None = None
    variance_lowrank: np.ndarray | None = None


@dataclass
class PairMoments:
    """Moments of the cosine for every (query, candidate), each ``(nq, kc)`` float64.

    Attributes:
        mean: ``E[cos]``.
        var: ``Var[cos]``.
        map_cosine: cosine of the means ``mu_x . mu_y / (|mu_x| |mu_y|)``.
    """

    mean: torch.Tensor
    var: torch.Tensor
    map_cosine: torch.Tensor


def candidate_moments(
    query: QuerySide,
    items: Candidates,
    covs: ModelCovariances,
    form: UncertaintyForm | str = UncertaintyForm.KFAC,
    estimator: CosineEstimator | str = CosineEstimator.SECOND_ORDER,
) -> PairMoments:
    """Cosine moments of every query with each of its candidates.

    Args:
        query: the prepared queries (``nq``).
        items: the candidates, ``kc`` per query.
        covs: covariances matching ``estimator`` (see :meth:`ModelCovariances.from_posterior`).
        form: which item uncertainty to use.
        estimator: a :class:`~bayesretrieval.similarity.CosineEstimator` or its name.

    Returns:
        The moments, each ``(nq, kc)``; entries where ``items.item_ids == -1`` are
        meaningless.
    """
    nq, kc = items.item_ids.shape
    if query.means.shape[0] != nq:
        raise ValueError(f"candidates for {nq} queries, got {query.means.shape[0]} queries")
    scalars = torch.from_numpy(np.asarray(items.scalars, dtype=np.float64).reshape(nq * kc, -1))
    dot, cross_item, cross_y = _probe_products(items.means, query.probes).reshape(nq * kc, 3).unbind(1)
    repeat = lambda t: t.repeat_interleave(kc, dim=0)  # noqa: E731  (per query -> per pair)
    own_col, other_col = covs.item_columns()
    y = SideStatistics(*(repeat(t) for t in (query.stats.scale, query.stats.norm_sq,
                                            query.stats.own_quad, query.stats.other_quad)))
    form = UncertaintyForm(form)
    if form is UncertaintyForm.KFAC:
        x = SideStatistics(scalars[:, 0], scalars[:, 1], scalars[:, own_col], scalars[:, other_col])
        pair = PairTerms(dot, cross_item, cross_y)
        constants = covs.constants
    else:
        means = torch.from_numpy(np.asarray(items.means, dtype=np.float64).reshape(nq * kc, -1))
        y_means = repeat(query.means)
        item_cov = _item_covariance(items, form, nq * kc, covs.diagonal)
        x = SideStatistics(torch.ones_like(dot), scalars[:, 1], item_cov.quad(means, means), scalars[:, other_col])
        y.other_quad = item_cov.quad(y_means, y_means)
        pair = PairTerms(dot, item_cov.quad(means, y_means), cross_y)
        constants = item_cov.constants(covs)
    x = SideStatistics(*(t[None, :] for t in (x.scale, x.norm_sq, x.own_quad, x.other_quad)))
    mean, var = cosine_moments_from_statistics(x, y, pair, constants, estimator)
    map_cosine = dot / torch.sqrt(scalars[:, 1] * query.stats.norm_sq.repeat_interleave(kc))
    return PairMoments(mean.reshape(nq, kc), var.reshape(nq, kc), map_cosine.reshape(nq, kc))


def _probe_products(means: np.ndarray, probes: torch.Tensor) -> torch.Tensor:
    """``(nq, kc, 3)`` float64: each candidate mean ``(nq, kc, D)`` times its query's probes ``(nq, D, 3)``.

    The means go to float64 a few queries at a time: a float64 copy of them all would be
    as large again as the means and, on some machines, that much fresh memory costs
    more than the products.
    """
    nq, kc = means.shape[:2]
    out = torch.empty((nq, kc, probes.shape[2]), dtype=torch.float64)
    step = max(1, PRODUCT_CHUNK_ROWS // max(kc, 1))
    for start in range(0, nq, step):
        block = slice(start, start + step)
        torch.bmm(torch.from_numpy(np.asarray(means[block], dtype=np.float64)), probes[block], out=out[block])
    return out


@dataclass
class _PerItemCovariance:
    """``S = L^T L + diag(d)`` per pair: ``lowrank`` ``(P, r, D)`` (or ``None``), ``diag`` ``(P, D)``."""

    lowrank: torch.Tensor | None
    diag: torch.Tensor

    def quad(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``u_p^T S_p v_p`` for ``(P, D)`` rows, shape ``(P,)``."""
        out = (self.diag * u * v).sum(1)
        if self.lowrank is not None:
            out = out + (torch.einsum("prd,pd->pr", self.lowrank, u) * torch.einsum("prd,pd->pr", self.lowrank, v)).sum(1)
        return out

    def constants(self, covs: ModelCovariances) -> CovarianceConstants:
        """Per-pair ``tr S``, ``tr(S Sigma_Q)``, ``tr(S^2)`` with the query's shared traces."""
        trace = self.diag.sum(1)
        trace_xy = self.diag @ torch.diagonal(covs.query_cov)
        trace_xx = (self.diag**2).sum(1)
        if self.lowrank is not None:
            low = self.lowrank
            trace = trace + (low**2).sum((1, 2))
            trace_xy = trace_xy + ((low @ covs.query_cov) * low).sum((1, 2))
            gram = low @ low.transpose(1, 2)
            trace_xx = trace_xx + 2 * ((low**2).sum(1) * self.diag).sum(1) + (gram**2).sum((1, 2))
        return CovarianceConstants(
            trace_x=trace, trace_y=covs.constants.trace_y, trace_xy=trace_xy,
            trace_xx=trace_xx, trace_yy=covs.constants.trace_yy,
        )


def _item_covariance(items: Candidates, form: UncertaintyForm, num_pairs: int, diagonal: bool) -> _PerItemCovariance:
    if items.variance_diag is None or (form is UncertaintyForm.LOWRANK and items.variance_lowrank is None):
        raise ValueError(f"uncertainty form {form.value!r} needs the index's variance columns, which it lacks")
    diag = torch.from_numpy(np.asarray(items.variance_diag, dtype=np.float64).reshape(num_pairs, -1))
    lowrank = None
    if form is UncertaintyForm.LOWRANK:
        low = np.asarray(items.variance_lowrank, dtype=np.float64)
        lowrank = torch.from_numpy(low.reshape(num_pairs, low.shape[-2], low.shape[-1]))
    if diagonal and lowrank is not None:
        diag, lowrank = diag + (lowrank**2).sum(1), None
    return _PerItemCovariance(lowrank, diag)
