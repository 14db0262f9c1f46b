"""Moments of the cosine between two Gaussian embeddings (docs/math.md sections 3, 4 and 7).

Side ``x`` (e.g. an image item) is ``N(mu_x, q_x Sigma_x)`` and side ``y`` (e.g. a text
query) is ``N(mu_y, q_y Sigma_y)``, independent. Every estimator here works from per-side
scalars, per-pair dot products and per-covariance-pair constants (docs/math.md section 4), so
an index stores a handful of numbers per item and never a ``D x D`` matrix.

Pure torch functions, float64 throughout; no FAISS, no open_clip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from bayesretrieval.options import DEFAULT_ESTIMATOR, CosineEstimator
from bayesretrieval.posterior.kronecker import KroneckerPosterior


@dataclass(frozen=True)
class CovarianceConstants:
    """Traces that the variance needs for one pair of covariances (shared per modality).

    Attributes:
        trace_x: ``tr Sigma_x``.
        trace_y: ``tr Sigma_y``.
        trace_xy: ``tr(Sigma_x Sigma_y)``.
        trace_xx: ``tr(Sigma_x^2)``.
        trace_yy: ``tr(Sigma_y^2)``.
    """

    trace_x: float
    trace_y: float
    trace_xy: float
    trace_xx: float
    trace_yy: float

    @classmethod
    def from_covariances(cls, cov_x: torch.Tensor, cov_y: torch.Tensor) -> "CovarianceConstants":
        """Compute the traces from two ``(D, D)`` covariances."""
        cov_x, cov_y = cov_x.to(torch.float64), cov_y.to(torch.float64)
        return cls(
            trace_x=float(torch.trace(cov_x)),
            trace_y=float(torch.trace(cov_y)),
            trace_xy=float((cov_x * cov_y.T).sum()),
            trace_xx=float((cov_x * cov_x.T).sum()),
            trace_yy=float((cov_y * cov_y.T).sum()),
        )


@dataclass
class SideStatistics:
    """Per-embedding scalars of one side (docs/math.md section 4), each shape ``(N,)``.

    Attributes:
        scale: ``q = a^T A^-1 a``.
        norm_sq: ``|mu|^2``.
        own_quad: ``mu^T Sigma_own mu`` with this side's output covariance.
        other_quad: ``mu^T Sigma_other mu`` with the other side's output covariance.
    """

    scale: torch.Tensor
    norm_sq: torch.Tensor
    own_quad: torch.Tensor
    other_quad: torch.Tensor

    def expected_norm_sq(self, own_trace: float) -> torch.Tensor:
        """``E|x|^2 = |mu|^2 + q tr Sigma_own``, shape ``(N,)``."""
        return self.norm_sq + self.scale * own_trace


@dataclass
class PairTerms:
    """Per-pair inner products, each shape ``(N, M)`` for N x-side and M y-side embeddings.

    Attributes:
        dot: ``mu_x . mu_y``.
        cross_x: ``mu_x^T Sigma_x mu_y``.
        cross_y: ``mu_x^T Sigma_y mu_y``.
    """

    dot: torch.Tensor
    cross_x: torch.Tensor
    cross_y: torch.Tensor


def side_statistics(
    means: torch.Tensor, scales: torch.Tensor, own_cov: torch.Tensor, other_cov: torch.Tensor
) -> SideStatistics:
    """Compute the per-embedding scalars for a batch.

    Args:
        means: mean embeddings ``mu``, shape ``(N, D)``.
        scales: ``q`` per embedding, shape ``(N,)``.
        own_cov: this side's ``Sigma``, shape ``(D, D)``.
        other_cov: the other side's ``Sigma``, shape ``(D, D)``.

    Returns:
        The statistics, float64.
    """
    means = _float64(means)
    return SideStatistics(
        scale=_float64(scales),
        norm_sq=(means * means).sum(1),
        own_quad=((means @ _float64(own_cov)) * means).sum(1),
        other_quad=((means @ _float64(other_cov)) * means).sum(1),
    )


def pair_terms(
    means_x: torch.Tensor, means_y: torch.Tensor, cov_x: torch.Tensor, cov_y: torch.Tensor
) -> PairTerms:
    """Inner products for all ``(N, M)`` pairs: ``mu_x . mu_y``, ``mu_x^T Sigma mu_y``.

    The query side computes ``Sigma_x mu_y`` and ``Sigma_y mu_y`` once, so each pair costs
    three dot products.
    """
    means_x, means_y = _float64(means_x), _float64(means_y)
    return PairTerms(
        dot=means_x @ means_y.T,
        cross_x=means_x @ (means_y @ _float64(cov_x)).T,
        cross_y=means_x @ (means_y @ _float64(cov_y)).T,
    )


def _quadratic(bb: torch.Tensor, ab: torch.Tensor, aa: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``(b - t a)^T Sigma (b - t a)`` from ``b'Sb``, ``a'Sb``, ``a'Sa``."""
    return bb - 2 * t * ab + t * t * aa


def _moments_probcosine(x, y, pair, const):
    """Smith et al. ProbCosine (docs/math.md section 3) with the covariances given.

    Returns ``(mean, var_query, var_item, var_joint)``: the terms ``q_y mu_x^T Sigma_y mu_x``,
    ``q_x mu_y^T Sigma_x mu_y`` and ``q_x q_y tr(Sigma_x Sigma_y)``, each over ``r_x^2 r_y^2``.
    """
    rx2 = x.expected_norm_sq(const.trace_x)[:, None]
    ry2 = y.expected_norm_sq(const.trace_y)[None, :]
    qx, qy = x.scale[:, None], y.scale[None, :]
    normaliser = rx2 * ry2
    var_item = qx * y.other_quad[None, :] / normaliser
    var_query = qy * x.other_quad[:, None] / normaliser
    return pair.dot / torch.sqrt(normaliser), var_query, var_item, qx * qy * const.trace_xy / normaliser


def _moments_delta(x, y, pair, const):
    """First-order delta method: ``grad_x = (yhat - c xhat)/|mu_x|`` and its mirror.

    Returns ``(mean, var_query, var_item, var_joint)``; the joint part is 0 (first order
    has no term with both sides' noise).
    """
    nx2, ny2 = x.norm_sq[:, None], y.norm_sq[None, :]
    cosine = pair.dot / torch.sqrt(nx2 * ny2)
    var_item = _quadratic(y.other_quad[None, :] / ny2, pair.cross_x / torch.sqrt(nx2 * ny2),
                          x.own_quad[:, None] / nx2, cosine) * x.scale[:, None] / nx2
    var_query = _quadratic(x.other_quad[:, None] / nx2, pair.cross_y / torch.sqrt(nx2 * ny2),
                           y.own_quad[None, :] / ny2, cosine) * y.scale[None, :] / ny2
    return cosine, var_query, var_item, torch.zeros_like(var_item)


def _moments_second_order(x, y, pair, const):
    """Radial linearisation around ``E|x|^2`` plus bilinear and curvature terms.

    With ``r_x^2 = E|x|^2``, ``m = mu_x.mu_y / (r_x r_y)`` and
    ``g_x = (mu_y - (mu_x.mu_y / r_x^2) mu_x) / (r_x r_y)`` (and its mirror ``g_y``)::

        Var[cos] ~= g_x' S_x g_x + g_y' S_y g_y + tr(S_x S_y) / (r_x^2 r_y^2)
                    + m^2 / 2 * (tr(S_x^2) / r_x^4 + tr(S_y^2) / r_y^4)

    The last term is the variance of the squared norms' fluctuation, which dominates for
    near-parallel pairs where the gradient vanishes (docs/math.md section 7).

    Returns ``(mean, var_query, var_item, var_joint)``: the terms with only ``S_y``
    (``g_y' S_y g_y`` and ``S_y``'s curvature), only ``S_x``, and ``tr(S_x S_y) / (r_x^2 r_y^2)``.
    """
    rx2 = x.expected_norm_sq(const.trace_x)[:, None]
    ry2 = y.expected_norm_sq(const.trace_y)[None, :]
    qx, qy = x.scale[:, None], y.scale[None, :]
    normaliser = rx2 * ry2
    mean = pair.dot / torch.sqrt(normaliser)
    half_mean_sq = 0.5 * mean**2
    linear_x = qx * _quadratic(y.other_quad[None, :], pair.cross_x, x.own_quad[:, None], pair.dot / rx2)
    linear_y = qy * _quadratic(x.other_quad[:, None], pair.cross_y, y.own_quad[None, :], pair.dot / ry2)
    var_item = linear_x / normaliser + half_mean_sq * (qx**2 * const.trace_xx / rx2**2)
    var_query = linear_y / normaliser + half_mean_sq * (qy**2 * const.trace_yy / ry2**2)
    return mean, var_query, var_item, qx * qy * const.trace_xy / normaliser


MomentFunction = Callable[[SideStatistics, SideStatistics, PairTerms, CovarianceConstants], tuple]
"""``(x, y, pair, constants) -> (mean, var_query, var_item, var_joint)``, each ``(N, M)``."""

_ESTIMATORS: dict[CosineEstimator, MomentFunction] = {
    CosineEstimator.PUBLISHED: _moments_probcosine,
    CosineEstimator.KRONECKER: _moments_probcosine,
    CosineEstimator.DELTA: _moments_delta,
    CosineEstimator.SECOND_ORDER: _moments_second_order,
}


@dataclass
class CosineMoments:
    """Mean and variance of the cosine, with the variance split by where the noise comes from.

    Side ``x`` is the item (the image side of a search), side ``y`` the query. Every
    estimator's variance is a sum of terms with only the item's noise, only the query's,
    and both (docs/math.md section 7); each part is that sum of terms, not clamped (it may
    be a rounding error below 0), while ``var`` is their sum clamped at 0. Each is a float64
    tensor of one shape.

    Attributes:
        mean: ``E[cos]``.
        var: ``Var[cos] = max(var_query + var_item + var_joint, 0)``.
        var_query: the terms with only the query's (side ``y``'s) noise.
        var_item: the terms with only the item's (side ``x``'s) noise.
        var_joint: the terms with both (``q_x q_y tr(Sigma_x Sigma_y) / (r_x^2 r_y^2)``; 0 for ``delta``).
    """

    mean: torch.Tensor
    var: torch.Tensor
    var_query: torch.Tensor
    var_item: torch.Tensor
    var_joint: torch.Tensor


def uses_diagonal_covariance(estimator: CosineEstimator | str) -> bool:
    """Whether the estimator replaces every ``Sigma`` by its diagonal (``published``)."""
    return CosineEstimator(estimator) is CosineEstimator.PUBLISHED


def cosine_moment_parts_from_statistics(
    x: SideStatistics,
    y: SideStatistics,
    pair: PairTerms,
    constants: CovarianceConstants,
    estimator: CosineEstimator | str = DEFAULT_ESTIMATOR,
) -> CosineMoments:
    """Mean, variance and the variance's query / item / joint parts of ``cos(x_i, y_j)`` from stored scalars.

    The caller is responsible for computing statistics with diagonal covariances when
    ``uses_diagonal_covariance(estimator)``.

    Returns:
        The moments, each shape ``(N, M)``, float64; ``var`` is the parts' sum clamped at 0.
    """
    mean, var_query, var_item, var_joint = _ESTIMATORS[CosineEstimator(estimator)](x, y, pair, constants)
    var = (var_query + var_item + var_joint).clamp_min(0.0)
    return CosineMoments(mean, var, var_query, var_item, var_joint)


def cosine_moments_from_statistics(
    x: SideStatistics,
    y: SideStatistics,
    pair: PairTerms,
    constants: CovarianceConstants,
    estimator: CosineEstimator | str = DEFAULT_ESTIMATOR,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of ``cos(x_i, y_j)`` for all pairs from stored scalars.

    :func:`cosine_moment_parts_from_statistics` without the parts.

    Returns:
        ``(mean, var)``, each shape ``(N, M)``, float64; ``var`` is clamped at 0.
    """
    moments = cosine_moment_parts_from_statistics(x, y, pair, constants, estimator)
    return moments.mean, moments.var


def cosine_moment_parts(
    means_x: torch.Tensor,
    scales_x: torch.Tensor,
    cov_x: torch.Tensor,
    means_y: torch.Tensor,
    scales_y: torch.Tensor,
    cov_y: torch.Tensor,
    estimator: CosineEstimator | str = DEFAULT_ESTIMATOR,
) -> CosineMoments:
    """:func:`cosine_moments` with the variance's parts: ``var_item`` (side x), ``var_query`` (side y), ``var_joint``.

    Takes :func:`cosine_moments`'s arguments.

    Returns:
        The moments, each ``(N, M)``, float64.
    """
    if uses_diagonal_covariance(estimator):
        cov_x, cov_y = torch.diag(torch.diagonal(cov_x)), torch.diag(torch.diagonal(cov_y))
    x = side_statistics(means_x, scales_x, cov_x, cov_y)
    y = side_statistics(means_y, scales_y, cov_y, cov_x)
    pair = pair_terms(means_x, means_y, cov_x, cov_y)
    constants = CovarianceConstants.from_covariances(cov_x, cov_y)
    return cosine_moment_parts_from_statistics(x, y, pair, constants, estimator)


def cosine_moments(
    means_x: torch.Tensor,
    scales_x: torch.Tensor,
    cov_x: torch.Tensor,
    means_y: torch.Tensor,
    scales_y: torch.Tensor,
    cov_y: torch.Tensor,
    estimator: CosineEstimator | str = DEFAULT_ESTIMATOR,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of ``cos(x_i, y_j)`` for ``x_i ~ N(mu_i, q_i Sigma_x)`` etc.

    Args:
        means_x: ``(N, D)`` means of side x.
        scales_x: ``(N,)`` scales ``q`` of side x.
        cov_x: ``(D, D)`` shared output covariance of side x.
        means_y: ``(M, D)`` means of side y.
        scales_y: ``(M,)`` scales of side y.
        cov_y: ``(D, D)`` shared output covariance of side y.
        estimator: a :class:`CosineEstimator` or its name.

    Returns:
        ``(mean, var)``, each ``(N, M)``, float64 (:func:`cosine_moment_parts` also splits ``var``).
    """
    moments = cosine_moment_parts(means_x, scales_x, cov_x, means_y, scales_y, cov_y, estimator)
    return moments.mean, moments.var


def shared_projection_cosine_moments(
    means_x: torch.Tensor,
    activations_x: torch.Tensor,
    means_y: torch.Tensor,
    activations_y: torch.Tensor,
    posterior: KroneckerPosterior,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Second-order mean and variance of ``cos(x_i, y_j)`` for two embeddings of one tower.

    Both embeddings pass through the same uncertain projection ``P``, so their noises are
    jointly Gaussian with cross-covariance ``c_ij Sigma``, ``c_ij = a_i^T A^-1 a_j``
    (docs/math.md section 12). An input compared with itself has cosine 1 and variance 0.
    With ``c = 0`` this is the ``second_order`` estimator.

    Args:
        means_x: ``(N, D)`` means.
        activations_x: ``(N, h)`` their pre-projection activations.
        means_y: ``(M, D)`` means.
        activations_y: ``(M, h)`` activations.
        posterior: the tower's posterior (``A^-1`` and ``Sigma = Sigma_B``).

    Returns:
        ``(mean, var)``, each ``(N, M)``, float64; ``var`` clamped at 0.
    """
    sigma = posterior.output_cov.to(torch.float64)
    a_inv = posterior.a_inv.to(torch.float64)
    mx, my = _float64(means_x), _float64(means_y)
    ax, ay = _float64(activations_x), _float64(activations_y)
    qx, qy = ((ax @ a_inv) * ax).sum(1)[:, None], ((ay @ a_inv) * ay).sum(1)[None, :]
    c = (ax @ a_inv) @ ay.T
    trace, trace_sq = float(torch.trace(sigma)), float((sigma * sigma.T).sum())
    sxx, syy = ((mx @ sigma) * mx).sum(1)[:, None], ((my @ sigma) * my).sum(1)[None, :]
    sxy = (mx @ sigma) @ my.T
    rx2, ry2 = (mx * mx).sum(1)[:, None] + qx * trace, (my * my).sum(1)[None, :] + qy * trace
    rxy = torch.sqrt(rx2 * ry2)
    dot = mx @ my.T + c * trace  # E[x.y]
    mean = dot / rxy
    tx, ty = dot / rx2, dot / ry2  # radial coefficients of g_x = (mu_y - tx mu_x) / rxy and its mirror
    gxx = _quadratic(syy, sxy, sxx, tx)
    gyy = _quadratic(sxx, sxy, syy, ty)
    gxy = sxy - ty * syy - tx * sxx + tx * ty * sxy
    linear = (qx * gxx + qy * gyy + 2 * c * gxy) / (rx2 * ry2)
    half = 0.5 / rxy  # the quadratic form's coefficient matrix k, times C = [[qx, c], [c, qy]]
    k11, k22 = -0.5 * mean / rx2, -0.5 * mean / ry2
    kc = ((k11 * qx + half * c, k11 * c + half * qy), (half * qx + k22 * c, half * c + k22 * qy))
    quadratic = 2 * trace_sq * (kc[0][0] ** 2 + 2 * kc[0][1] * kc[1][0] + kc[1][1] ** 2)
    return mean, (linear + quadratic).clamp_min(0.0)


def probabilistic_logits(
    image_embeds,
    image_activations,
    image_posterior: KroneckerPosterior,
    text_embeds,
    text_activations,
    text_posterior: KroneckerPosterior,
    logit_scale: float = 100.0,
    estimator: CosineEstimator | str = "published",
):
    """Mean and variance of the image-text logits ``s * cos``.

    Args:
        image_embeds: unnormalised image means ``(N_images, D)``.
        image_activations: image activations ``(N_images, h_I)``.
        image_posterior: posterior over the image projection.
        text_embeds: unnormalised text means ``(N_texts, D)``.
        text_activations: text activations ``(N_texts, h_T)``.
        text_posterior: posterior over the text projection.
        logit_scale: ``s`` (already exponentiated).
        estimator: a :class:`CosineEstimator` or its name.

    Returns:
        ``(mean, var)``, each ``(N_images, N_texts)``; numpy arrays for numpy inputs,
        float64 torch tensors otherwise.
    """
    as_numpy = isinstance(image_embeds, np.ndarray)
    mean, var = cosine_moments(
        _float64(image_embeds),
        image_posterior.activation_scale(image_activations),
        image_posterior.output_cov,
        _float64(text_embeds),
        text_posterior.activation_scale(text_activations),
        text_posterior.output_cov,
        estimator,
    )
    mean, var = mean * logit_scale, var * logit_scale**2
    return (mean.numpy(), var.numpy()) if as_numpy else (mean, var)


def probit_probabilities(logit_mean: torch.Tensor, logit_var: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Probit-approximated softmax ``softmax(mean / sqrt(1 + pi/8 var))`` (docs/math.md section 6)."""
    return probit_log_probabilities(logit_mean, logit_var, dim).exp()


def best_match_probabilities(groups: np.ndarray, logit_mean: np.ndarray, logit_var: np.ndarray,
                             block: int = 1 << 22) -> np.ndarray:
    """Per row, the chance it is its group's match: ``E[softmax]`` of Gaussian logits within each group.

    Retrieval's analogue of BayesVLM's zero-shot probit, with a query's results as its
    group, by the pairwise mean-field approximation (docs/math.md section 5)

        p_i = 1 / sum_j exp(-(m_i - m_j) / sqrt(1 + pi/8 (v_i + v_j))),

    normalised within the group. Unlike the per-logit probit (:func:`probit_probabilities`),
    it is unchanged when every logit of a group moves by the same amount, as the softmax is.

    Args:
        groups: ``(n,)`` group labels, each group's rows contiguous (a query's results).
        logit_mean: ``(n,)``.
        logit_var: ``(n,)``.
        block: most entries of the pairwise arrays held at once.

    Returns:
        ``(n,)`` float64 probabilities summing to 1 within each group.
    """
    groups = np.asarray(groups)
    mean, var = np.asarray(logit_mean, np.float64), np.asarray(logit_var, np.float64)
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]]) if groups.size else np.zeros(0, np.int64)
    sizes = np.diff(np.r_[starts, groups.size])
    row = np.repeat(np.arange(starts.size), sizes)
    column = np.arange(groups.size) - np.repeat(starts, sizes)
    width = int(sizes.max()) if sizes.size else 0
    means, variances = np.full((starts.size, width), np.nan), np.zeros((starts.size, width))
    means[row, column], variances[row, column] = mean, var
    out = np.empty_like(means)
    step = max(1, block // max(1, width * width))
    for lo in range(0, starts.size, step):
        m, v = means[lo:lo + step], variances[lo:lo + step]
        with np.errstate(over="ignore", divide="ignore"):  # a far better rival: p = 0; padding: dropped below
            spread = np.sqrt(1 + math.pi / 8 * (v[:, :, None] + v[:, None, :]))
            terms = np.exp(-(m[:, :, None] - m[:, None, :]) / spread)
            p = 1.0 / np.nansum(terms, axis=2)
        out[lo:lo + step] = p / np.nansum(np.where(np.isnan(m), np.nan, p), axis=1, keepdims=True)
    return out[row, column]


def probit_log_probabilities(logit_mean: torch.Tensor, logit_var: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The log of :func:`probit_probabilities`, computed stably (for likelihoods)."""
    return torch.log_softmax(logit_mean / torch.sqrt(1 + math.pi / 8 * logit_var), dim=dim)


def _float64(values) -> torch.Tensor:
    if isinstance(values, np.ndarray):
        values = torch.from_numpy(values)
    return values.detach().to(torch.float64)
