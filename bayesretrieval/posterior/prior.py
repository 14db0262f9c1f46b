"""Prior precision ``lambda`` by type-II maximum likelihood (docs/math.md section 2).

With ``theta`` the MAP projection (``p = h * D`` numbers), the Laplace evidence of a
Kronecker-factored posterior as a function of ``lambda`` is, up to constants,

    M(lambda) = -1/2 lambda |theta|^2 + p/2 log(lambda) - 1/2 [D logdet P_A + h logdet P_B]

with ``P_A = sqrt(n) A + sqrt(lambda) I`` and ``P_B = sqrt(n) B + sqrt(lambda) I``. Both
log-determinants are sums over the eigenvalues of ``A`` and ``B``, so one evaluation costs
``O(h + D)`` once the eigenvalues are known. The optimiser works on ``log lambda``: a fine
grid locates the best bracket, bounded Brent refines inside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from bayesretrieval.options import PriorObjective
from bayesretrieval.posterior.kronecker import symmetrize

DEFAULT_LOG10_BOUNDS = (-4.0, 10.0)
GRID_POINTS = 281


@dataclass(frozen=True)
class FactorSpectrum:
    """What the evidence needs from one projection's factors.

    Attributes:
        eig_a: eigenvalues of the symmetrised ``A``, clipped at 0, shape ``(h,)`` float64.
        eig_b: eigenvalues of the symmetrised ``B``, clipped at 0, shape ``(D,)`` float64.
        theta_sq_norm: ``|theta|^2``, the squared Frobenius norm of the MAP projection.
    """

    eig_a: np.ndarray
    eig_b: np.ndarray
    theta_sq_norm: float

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, theta_sq_norm: float) -> "FactorSpectrum":
        """Eigen-decompose ``A`` (``(h, h)``) and ``B`` (``(D, D)``) in float64.

        Float32 round-off leaves tiny negative eigenvalues; they are clipped at 0.
        """
        for name, factor in (("A", A), ("B", B)):
            if factor.ndim != 2 or factor.shape[0] != factor.shape[1]:
                raise ValueError(f"{name} must be a square matrix, got shape {tuple(factor.shape)}")
        if not theta_sq_norm > 0:
            raise ValueError(f"theta_sq_norm must be positive, got {theta_sq_norm}")
        eig = [
            torch.linalg.eigvalsh(symmetrize(f.detach().to("cpu", torch.float64))).clamp_min(0).numpy()
            for f in (A, B)
        ]
        return cls(eig[0], eig[1], float(theta_sq_norm))

    @property
    def in_features(self) -> int:
        """``h``."""
        return int(self.eig_a.shape[0])

    @property
    def out_features(self) -> int:
        """``D``."""
        return int(self.eig_b.shape[0])


def _log_dets(spectrum: FactorSpectrum, log_lambda: float, n: float) -> tuple[float, float]:
    root_lambda = math.exp(0.5 * log_lambda)
    root_n = math.sqrt(n)
    return (
        float(np.log(root_n * spectrum.eig_a + root_lambda).sum()),
        float(np.log(root_n * spectrum.eig_b + root_lambda).sum()),
    )


def _data_fit(spectrum: FactorSpectrum, log_lambda: float) -> float:
    p = spectrum.in_features * spectrum.out_features
    return -0.5 * math.exp(log_lambda) * spectrum.theta_sq_norm + 0.5 * p * log_lambda


def kronecker_log_evidence(spectrum: FactorSpectrum, log_lambda: float, n: float) -> float:
    """The Laplace evidence of docs/math.md section 2, up to constants.

    ``-1/2 lambda |theta|^2 + p/2 log lambda - 1/2 [D logdet P_A + h logdet P_B]``,
    using ``det(P_A kron P_B) = det(P_A)^D det(P_B)^h``.
    """
    logdet_a, logdet_b = _log_dets(spectrum, log_lambda, n)
    h, d = spectrum.in_features, spectrum.out_features
    return _data_fit(spectrum, log_lambda) - 0.5 * (d * logdet_a + h * logdet_b)


def bayesvlm_reference_log_evidence(spectrum: FactorSpectrum, log_lambda: float, n: float) -> float:
    """BayesVLM's reference objective: exponents swapped, no 1/2 on the log-determinant.

    ``-1/2 lambda |theta|^2 + p/2 log lambda - [h logdet P_A + D logdet P_B]``. Its optima
    are the published lambdas (docs/math.md section 2); it is not the Laplace evidence.
    """
    logdet_a, logdet_b = _log_dets(spectrum, log_lambda, n)
    h, d = spectrum.in_features, spectrum.out_features
    return _data_fit(spectrum, log_lambda) - (h * logdet_a + d * logdet_b)


OBJECTIVES: dict[PriorObjective, Callable[[FactorSpectrum, float, float], float]] = {
    PriorObjective.KRONECKER: kronecker_log_evidence,
    PriorObjective.BAYESVLM_REFERENCE: bayesvlm_reference_log_evidence,
}
"""The registry behind :attr:`PriorObjective.log_evidence`: each objective's function."""


def optimize_prior_precision(
    spectrum: FactorSpectrum | Sequence[FactorSpectrum],
    pseudo_data_count: float = 1.0,
    objective: PriorObjective | str = PriorObjective.KRONECKER,
    log10_bounds: tuple[float, float] = DEFAULT_LOG10_BOUNDS,
) -> float:
    """Return the ``lambda`` maximising ``objective`` (docs/math.md section 2).

    A grid of ``GRID_POINTS`` values of ``log lambda`` spanning ``log10_bounds`` finds the
    best grid point; bounded Brent then refines between its neighbours. Several spectra
    (the layers of one block-diagonal posterior sharing ``lambda``, docs/math.md section 13)
    add their objectives: the log-determinants and the prior terms are sums over blocks.

    Args:
        spectrum: eigenvalues of ``A`` and ``B`` and ``|theta|^2``, or a sequence of them.
        pseudo_data_count: ``n``, positive.
        objective: a :class:`PriorObjective` or its name.
        log10_bounds: search interval for ``log10 lambda``.

    Returns:
        The optimal ``lambda``.

    Raises:
        ValueError: on a non-positive ``n``, bad bounds, or an optimum on a bound (the
            interval is too narrow for these factors).
    """
    objective = PriorObjective(objective)
    if not pseudo_data_count > 0:
        raise ValueError(f"pseudo_data_count must be positive, got {pseudo_data_count}")
    low, high = log10_bounds
    if not low < high:
        raise ValueError(f"log10_bounds must be increasing, got {log10_bounds}")

    spectra = [spectrum] if isinstance(spectrum, FactorSpectrum) else list(spectrum)

    def loss(log_lambda: float) -> float:
        return -sum(objective.log_evidence(s, log_lambda, pseudo_data_count) for s in spectra)

    grid = np.linspace(low * math.log(10), high * math.log(10), GRID_POINTS)
    best = int(np.argmin([loss(x) for x in grid]))
    if best in (0, GRID_POINTS - 1):
        raise ValueError(
            f"{objective.value} objective has no optimum inside log10_bounds {log10_bounds} "
            f"(best at the bound lambda = {math.exp(grid[best]):.4g}); rank-deficient factors "
            "(fewer pairs than the activation width) can cause this: fit on more pairs, "
            "widen the bounds, or give lambda explicitly"
        )
    result = minimize_scalar(
        loss, bounds=(grid[best - 1], grid[best + 1]), method="bounded", options={"xatol": 1e-10}
    )
    return float(math.exp(result.x))
