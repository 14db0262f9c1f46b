"""Upper bounds on the scores of items FAISS has not returned (docs/math.md section 8).

FAISS returns candidates by ``f = mu_x . mu_y / (r_I r_y)`` with ``r_I^2 = |mu_x|^2 + q tr Sigma_I``
(the stored vectors) and ``r_y^2 = E|y|^2``. Any item not returned has ``f <= f_min``, the
smallest inner product returned (plus float32 slack). Every score here is ``f`` times a
positive per-item factor times a per-query factor, or is bounded by such a product plus a
bound on the standard deviation, so collection-wide extremes of a few per-item ratios
turn ``f_min`` into a bound on the score of every unreturned item.

The extremes are computed when an index version is written and read from its manifest
(:mod:`bayesretrieval.store.extremes`). The per-candidate variance floor is derived in
docs/math.md section 9.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bayesretrieval.queries.uncertainty import ModelCovariances, QuerySide
from bayesretrieval.similarity import CosineEstimator
from bayesretrieval.store import CovarianceForm, ItemScalars
from bayesretrieval.store.extremes import CollectionExtremes

FLOOR_MARGIN = 1 - 1e-9
"""Shrinks variance floors so that rounding never lifts one above the variance it bounds."""
SPLIT_SHRINK = 1 - 1e-6
"""Takes the split eigenvalue just below the computed smallest one, so ``Sigma - lam I`` stays
positive semidefinite despite the eigensolver's rounding."""


@dataclass
class ScoreBounds:
    """Bounds on what the items they cover can reach, one entry per query or per (query, candidate).

    Attributes:
        mean: upper bound on ``E[cos]``.
        var: upper bound on ``Var[cos]`` over the whole collection (broadcasts against ``mean``).
        map_cosine: upper bound on the cosine of the means.
        var_floor: lower bound on ``Var[cos]``: ``0``, or per candidate when the
            bounds cover known candidates (see :func:`candidate_variance_floor`).
    """

    mean: np.ndarray
    var: np.ndarray
    map_cosine: np.ndarray
    var_floor: np.ndarray | float = 0.0


@dataclass(frozen=True)
class Spectra:
    """Extreme eigenvalues of the covariances in use (``Sigma_I`` of the items, ``Sigma_Q`` of the queries)."""

    item_min: float
    item_max: float
    query_min: float
    query_max: float

    @classmethod
    def of(cls, covs: ModelCovariances) -> "Spectra":
        """Eigenvalues of ``covs.item_cov`` and ``covs.query_cov``."""
        item, query = (torch.linalg.eigvalsh(c) for c in (covs.item_cov, covs.query_cov))
        return cls(float(item[0]), float(item[-1]), float(query[0]), float(query[-1]))


def float32_slack(dim: int) -> float:
    """Worst-case error of FAISS's float32 inner product of two vectors of norm <= 1 in ``dim`` dimensions.

    ``(dim + 8) * 2^-24`` covers the rounding of both stored vectors and the accumulation.
    """
    return (dim + 8) * 2.0**-24


def _scaled_bound(f_bound: np.ndarray, low: float, high: float) -> np.ndarray:
    """Bound on ``f * c`` for ``f <= f_bound`` and ``c`` in ``[low, high]`` (``c > 0``)."""
    return np.where(f_bound > 0, f_bound * high, f_bound * low)


def score_bounds(
    f_bound: np.ndarray,
    query: QuerySide,
    covs: ModelCovariances,
    extremes: CollectionExtremes,
    form: CovarianceForm | str,
    estimator: CosineEstimator | str,
    spectra: Spectra,
) -> ScoreBounds:
    """Bounds for items with FAISS inner product at most ``f_bound`` (``(nq,)`` or ``(nq, c)``).

    Args:
        f_bound: ``(nq,)`` largest FAISS inner product an unreturned item can have, or
            ``(nq, c)`` such values (e.g. every returned candidate's), bounded one by one.
        query: the prepared queries.
        covs: the covariances the estimator uses.
        extremes: the collection extremes.
        form: the item covariance form.
        estimator: the cosine estimator.
        spectra: the covariances' extreme eigenvalues.

    Returns:
        The bounds, shaped like ``f_bound`` (``var`` as ``(nq,)`` or ``(nq, 1)``).
    """
    estimator = CosineEstimator(estimator)
    f_bound = np.asarray(f_bound, dtype=np.float64)
    per_query = (slice(None),) + (None,) * (f_bound.ndim - 1)
    y = query.stats
    map_factor = (query.expected_norm / torch.sqrt(y.norm_sq)).numpy()[per_query]
    map_bound = _scaled_bound(f_bound, extremes.map_factor_min, extremes.map_factor_max) * map_factor
    if estimator is CosineEstimator.DELTA:
        mean_bound = map_bound
    else:
        mean_bound = _scaled_bound(f_bound, extremes.mean_factor_min, extremes.mean_factor_max)
    var_bound = _VARIANCE_BOUNDS[estimator](y, covs, extremes, CovarianceForm(form), spectra)
    return ScoreBounds(mean_bound, var_bound.numpy()[per_query], map_bound)


def _item_unit_terms(covs, form, spectra):
    """``(lambda_max, tr(S Sigma_Q), tr(S^2))`` per unit of the item-noise ratio."""
    if form is CovarianceForm.KFAC:
        trace = covs.constants.trace_x
        return spectra.item_max / trace, covs.constants.trace_xy / trace, covs.constants.trace_xx / trace**2
    return 1.0, spectra.query_max, 1.0


def _second_order_variance_bound(y, covs, extremes, form, spectra) -> torch.Tensor:
    """Bound on the second-order (and ProbCosine) variance over all items.

    With ``rho = max t / r_S^2`` and ``r_y^2 = E|y|^2``, by Cauchy-Schwarz on each term of
    :func:`bayesretrieval.similarity._moments_second_order`::

        Var <= 4 rho lam_I |mu_y|^2 / r_y^2 + 4 q_y lam_Q / r_y^2 + rho q_y tr(S Sigma_Q) / r_y^2
               + (rho^2 tr(S^2) + q_y^2 tr(Sigma_Q^2) / r_y^4) / 2

    (per unit of noise). ProbCosine's variance is a subset of these terms.
    """
    lam_item, trace_xy, trace_xx = _item_unit_terms(covs, form, spectra)
    rho = extremes.noise_ratio_max
    ry2 = y.expected_norm_sq(covs.constants.trace_y)
    return (4 * rho * lam_item * y.norm_sq / ry2 + 4 * y.scale * spectra.query_max / ry2
            + rho * y.scale * trace_xy / ry2
            + 0.5 * (rho**2 * trace_xx + y.scale**2 * covs.constants.trace_yy / ry2**2))


def _delta_variance_bound(y, covs, extremes, form, spectra) -> torch.Tensor:
    """Bound on the delta-method variance: ``|grad_x| <= 2 / |mu_x|`` and its mirror."""
    lam_item, _, _ = _item_unit_terms(covs, form, spectra)
    return 4 * extremes.plain_noise_ratio_max * lam_item + 4 * y.scale * spectra.query_max / y.norm_sq


_VARIANCE_BOUNDS = {
    CosineEstimator.PUBLISHED: _second_order_variance_bound,
    CosineEstimator.KRONECKER: _second_order_variance_bound,
    CosineEstimator.SECOND_ORDER: _second_order_variance_bound,
    CosineEstimator.DELTA: _delta_variance_bound,
}


def has_variance_floor(form: CovarianceForm | str, estimator: CosineEstimator | str) -> bool:
    """Whether :func:`candidate_variance_floor` gives more than ``0`` for this form and estimator."""
    return CovarianceForm(form) is CovarianceForm.KFAC and CosineEstimator(estimator) is not CosineEstimator.DELTA


def candidate_variance_floor(
    f: np.ndarray,
    slack: float,
    item_scalars: ItemScalars,
    query: QuerySide,
    query_rows: np.ndarray,
    covs: ModelCovariances,
    estimator: CosineEstimator | str,
    spectra: Spectra,
) -> np.ndarray:
    """Lower bound on ``Var[cos]`` of returned ``kfac`` candidates, without their mean vectors.

    For the ``kfac`` form ``E[cos]`` is FAISS's inner product ``f`` up to ``slack``, and
    the stored scalars give every variance term except the cross products
    ``mu_x^T Sigma mu_y``. ProbCosine's variance needs none of those (it is exact here);
    the second-order variance's terms with a cross product are bounded by
    :func:`_cross_term_floor` (docs/math.md section 9).

    Args:
        f: ``(P,)`` FAISS inner products of the (query, candidate) pairs.
        slack: FAISS's float32 error bound on ``f``.
        item_scalars: the candidates' stored scalars, each ``(P,)``.
        query: the prepared queries.
        query_rows: ``(P,)`` each pair's position in ``query``.
        covs: the covariances the estimator uses.
        estimator: the cosine estimator (not ``delta``: see :func:`has_variance_floor`).
        spectra: the covariances' extreme eigenvalues.

    Returns:
        ``(P,)``.
    """
    estimator = CosineEstimator(estimator)
    const = covs.constants
    y = {name: value.numpy()[query_rows] for name, value in vars(query.stats).items()}
    q_x, norm_x = item_scalars.scale, item_scalars.norm_sq
    quad_x_item, quad_x_query = covs.item_quads(item_scalars)
    rx2 = norm_x + q_x * const.trace_x
    q_y, norm_y, quad_y_item, quad_y_query = y["scale"], y["norm_sq"], y["other_quad"], y["own_quad"]
    ry2 = norm_y + q_y * const.trace_y
    bilinear = q_x * q_y * const.trace_xy
    if estimator is not CosineEstimator.SECOND_ORDER:
        return FLOOR_MARGIN * (q_x * quad_y_item + q_y * quad_x_query + bilinear) / (rx2 * ry2)
    mean_abs = (np.maximum(np.abs(f) - slack, 0.0), np.abs(f) + slack)
    ratio = np.sqrt(ry2 / rx2)
    linear_x = q_x * _cross_term_floor(norm_y, quad_y_item, norm_x, quad_x_item, rx2,
                                       (mean_abs[0] * ratio, mean_abs[1] * ratio), spectra.item_min)
    linear_y = q_y * _cross_term_floor(norm_x, quad_x_query, norm_y, quad_y_query, ry2,
                                       (mean_abs[0] / ratio, mean_abs[1] / ratio), spectra.query_min)
    curvature = 0.5 * mean_abs[0] ** 2 * (q_x**2 * const.trace_xx / rx2**2 + q_y**2 * const.trace_yy / ry2**2)
    return FLOOR_MARGIN * ((linear_x + linear_y + bilinear) / (rx2 * ry2) + curvature)


def _cross_term_floor(b_sq, b_quad, a_sq, a_quad, a_expected_sq, t_range, lambda_min: float) -> np.ndarray:
    """Lower bound on ``(b - t a)^T Sigma (b - t a)`` over ``|t|`` in ``t_range``, from norms alone.

    Here ``t = a.b / r_a^2`` (``r_a^2 = a_expected_sq``), ``b_sq = |b|^2``, ``b_quad = b^T Sigma b``
    and the same for ``a``. Two bounds, the larger is kept:

    - the split ``Sigma = lam I + (Sigma - lam I)`` with ``lam`` just below the smallest
      eigenvalue: ``lam |b - t a|^2`` (with ``|b - t a|^2 = |b|^2 - t^2 (2 r_a^2 - |a|^2)``,
      concave in ``t``, so smallest at the largest ``|t|``) plus the reverse triangle
      inequality in the norm of the positive semidefinite rest,
      ``(|b|_R - |t| |a|_R)^2`` with ``|b|_R^2 = b^T Sigma b - lam |b|^2`` (convex in ``|t|``,
      so smallest at its root clamped into the range);
    - the reverse triangle inequality in the ``Sigma`` norm alone,
      ``(sqrt(b^T Sigma b) - |t| sqrt(a^T Sigma a))^2``.
    """
    low, high = t_range
    lam = max(lambda_min, 0.0) * SPLIT_SHRINK
    euclidean = lam * np.maximum(b_sq - high**2 * (2 * a_expected_sq - a_sq), 0.0)
    split = euclidean + _triangle_floor(np.maximum(b_quad - lam * b_sq, 0.0), np.maximum(a_quad - lam * a_sq, 0.0),
                                        low, high)
    return np.maximum(split, _triangle_floor(b_quad, a_quad, low, high))


def _triangle_floor(b_quad, a_quad, low, high) -> np.ndarray:
    """``min (|b| - |t| |a|)^2`` over ``|t|`` in ``[low, high]``, for norms given by their squares."""
    b_norm, a_norm = np.sqrt(np.maximum(b_quad, 0.0)), np.sqrt(np.maximum(a_quad, 0.0))
    root = np.clip(b_norm / np.where(a_norm > 0, a_norm, np.inf), low, high)
    return (b_norm - root * a_norm) ** 2
