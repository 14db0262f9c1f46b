"""Cosine moments of (query, item) pairs for each covariance form an index holds.

Every form feeds :func:`bayesretrieval.similarity.cosine_moment_parts_from_statistics` (the one
place the estimators live) through a *per-pair layout*: ``P`` (query, item) pairs, the
item side's statistics with shape ``(1, P)`` and the query side's ``(P,)``, so the
estimators' ``x[:, None]`` / ``y[None, :]`` broadcasting meets pair by pair and the
result has shape ``(1, 1, P)``. This lets the per-item covariance forms put per-pair
numbers where the Kronecker form has shared constants.

Forms (:class:`~bayesretrieval.store.CovarianceForm`, docs/math.md section 4):

- ``kfac``: item covariance ``q_i Sigma_I``; the stored scalars are exact.
- ``diag``: item covariance ``diag(d_i)`` (``variance_diag``).
- ``lowrank``: item covariance ``L_i^T L_i + diag(d_i)`` (``variance_lowrank``, ``variance_diag``).

The query always carries ``q_y Sigma_Q`` with ``Sigma_Q`` its modality's output covariance
(``Sigma_T`` for text, ``Sigma_I`` for image queries).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bayesretrieval.posterior import Modality, PosteriorPair
from bayesretrieval.similarity import (
    CosineEstimator,
    CovarianceConstants,
    PairTerms,
    SideStatistics,
    cosine_moment_parts_from_statistics,
    uses_diagonal_covariance,
)
from bayesretrieval.store import CovarianceForm, ItemRows, ItemScalars


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

    def item_quads(self, scalars: ItemScalars) -> tuple[np.ndarray, np.ndarray]:
        """Stored items' ``mu^T Sigma_I mu`` and ``mu^T Sigma_Q mu`` (diagonal ones for diagonal estimators)."""
        return scalars.quad(Modality.IMAGE.value, self.diagonal), scalars.quad(self.query_modality.value, self.diagonal)


@dataclass
class QuerySide:
    """Per-query quantities, computed once per query (docs/math.md section 4).

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
class PairMoments:
    """Moments of the cosine of (query, item) pairs, float64 tensors of one shape.

    Attributes:
        mean: ``E[cos]``.
        var: ``Var[cos] = max(var_query + var_item + var_joint, 0)``.
        map_cosine: cosine of the means ``mu_x . mu_y / (|mu_x| |mu_y|)``.
        var_query: the variance's terms with only the query's noise (docs/math.md section 7).
        var_item: the terms with only the item's noise (its per-item covariance for ``diag`` / ``lowrank``).
        var_joint: the terms with both (0 for ``delta``).

    The parts are not clamped (a rounding error may put one just below 0); they are
    ``None`` only where moments were built from a mean and variance alone.
    """

    mean: torch.Tensor
    var: torch.Tensor
    map_cosine: torch.Tensor
    var_query: torch.Tensor | None = None
    var_item: torch.Tensor | None = None
    var_joint: torch.Tensor | None = None


def pair_moments(
    query: QuerySide,
    query_rows: np.ndarray,
    items: ItemRows,
    covs: ModelCovariances,
    form: CovarianceForm | str = CovarianceForm.KFAC,
    estimator: CosineEstimator | str = CosineEstimator.SECOND_ORDER,
) -> PairMoments:
    """Cosine moments of ``P`` pairs: query ``query_rows[p]`` with item ``p`` of ``items``.

    Args:
        query: the prepared queries (``nq``).
        query_rows: ``(P,)`` positions in ``query``.
        items: the ``P`` items' stored rows.
        covs: covariances matching ``estimator`` (see :meth:`ModelCovariances.from_posterior`).
        form: which item covariance to use.
        estimator: a :class:`~bayesretrieval.similarity.CosineEstimator` or its name.

    Returns:
        The moments, each ``(P,)``.

    Raises:
        ValueError: if ``query_rows`` and ``items`` differ in length, a query row is out
            of range, or ``form`` needs variance columns that ``items`` lacks.
    """
    query_rows = np.asarray(query_rows, dtype=np.int64)
    if query_rows.shape != items.item_ids.shape:
        raise ValueError(f"{len(query_rows)} query rows for {len(items.item_ids)} items")
    if query_rows.size and not 0 <= query_rows.min() <= query_rows.max() < len(query.means):
        raise ValueError(f"query rows must be in [0, {len(query.means)}), got {query_rows.min()}..{query_rows.max()}")
    form = CovarianceForm(form)
    rows = torch.from_numpy(query_rows)
    means = torch.from_numpy(np.asarray(items.means, dtype=np.float64))
    dot, cross_item, cross_y = _probe_products(means, query.probes, query_rows).unbind(1)
    y = SideStatistics(*(t[rows] for t in (query.stats.scale, query.stats.norm_sq,
                                           query.stats.own_quad, query.stats.other_quad)))
    scalars = ItemScalars(*(torch.from_numpy(np.ascontiguousarray(v)) for v in vars(items.scalars).values()))
    own_quad, other_quad = covs.item_quads(scalars)
    if form is CovarianceForm.KFAC:
        x = SideStatistics(scalars.scale, scalars.norm_sq, own_quad, other_quad)
        pair, constants = PairTerms(dot, cross_item, cross_y), covs.constants
    else:
        y_means = query.means[rows]
        item_cov = _item_covariance(items, form, covs.diagonal)
        x = SideStatistics(torch.ones_like(dot), scalars.norm_sq, item_cov.quad(means, means), other_quad)
        y.other_quad = item_cov.quad(y_means, y_means)
        pair, constants = PairTerms(dot, item_cov.quad(means, y_means), cross_y), item_cov.constants(covs)
    x = SideStatistics(*(t[None, :] for t in (x.scale, x.norm_sq, x.own_quad, x.other_quad)))
    moments = cosine_moment_parts_from_statistics(x, y, pair, constants, estimator)
    flat = {name: values.reshape(-1) for name, values in vars(moments).items()}
    return PairMoments(map_cosine=dot / torch.sqrt(scalars.norm_sq * y.norm_sq), **flat)


def _probe_products(means: torch.Tensor, probes: torch.Tensor, query_rows: np.ndarray) -> torch.Tensor:
    """``(P, 3)`` float64: each item mean ``(P, D)`` float64 times its query's probes ``(nq, D, 3)``.

    Pairs that form a rectangle (every query, the same number of pairs each, grouped by
    query: a first rerank stage) take one batched product; other pairs one product per
    query over its pairs, so no probe is ever copied per pair.
    """
    nq, P = len(probes), len(query_rows)
    grouped = bool(np.all(query_rows[1:] >= query_rows[:-1]))
    if grouped and P and P % nq == 0 and np.array_equal(query_rows, np.repeat(np.arange(nq), P // nq)):
        return torch.bmm(means.reshape(nq, P // nq, -1), probes).reshape(P, -1)
    order = np.arange(P) if grouped else np.argsort(query_rows, kind="stable")
    bounds = np.searchsorted(query_rows[order], np.arange(nq + 1))
    means = means if grouped else means[torch.from_numpy(order)]
    products = torch.empty((P, probes.shape[2]), dtype=torch.float64)
    for q in np.flatnonzero(np.diff(bounds)):
        torch.mm(means[bounds[q]:bounds[q + 1]], probes[q], out=products[bounds[q]:bounds[q + 1]])
    if grouped:
        return products
    out = torch.empty_like(products)
    out[torch.from_numpy(order)] = products
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
            out = out + (torch.einsum("prd,pd->pr", self.lowrank, u)
                         * torch.einsum("prd,pd->pr", self.lowrank, v)).sum(1)
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


def _item_covariance(items: ItemRows, form: CovarianceForm, diagonal: bool) -> _PerItemCovariance:
    if items.variance_diag is None or (form is CovarianceForm.LOWRANK and items.variance_lowrank is None):
        raise ValueError(f"covariance form {form.value!r} needs the index's variance columns, which it lacks")
    diag = torch.from_numpy(np.asarray(items.variance_diag, dtype=np.float64))
    lowrank = None
    if form is CovarianceForm.LOWRANK:
        lowrank = torch.from_numpy(np.asarray(items.variance_lowrank, dtype=np.float64))
    if diagonal and lowrank is not None:
        diag, lowrank = diag + (lowrank**2).sum(1), None
    return _PerItemCovariance(lowrank, diag)
