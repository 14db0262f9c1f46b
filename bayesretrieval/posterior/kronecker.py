"""Kronecker-factored Laplace posterior over CLIP's projection layers (docs/math.md sections 1-2).

The posterior over one projection ``P`` (``h x D``) is matrix normal with input-side
covariance ``A^-1`` (``h x h``) and output-side covariance ``Sigma_B`` (``D x D``). For an
input with activation ``a`` the embedding ``a @ P`` is Gaussian with covariance
``q * Sigma_B`` where ``q = a^T A^-1 a``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray


class Modality(str, Enum):
    """Which tower a posterior belongs to."""

    IMAGE = "image"
    """The image projection ``P_I = model.visual.proj``."""
    TEXT = "text"
    """The text projection ``P_T = model.text_projection``."""


def symmetrize(matrix: torch.Tensor) -> torch.Tensor:
    """Return ``(M + M^T) / 2`` (curvature factors carry float32 round-off)."""
    return (matrix + matrix.T) / 2


def _precision_inverse(
    factor: torch.Tensor, pseudo_data_count: float, prior_precision: float
) -> torch.Tensor:
    """Return ``inv(sqrt(n) * F + sqrt(lambda) * I)`` in float64, symmetrised (docs/math.md s.2)."""
    factor = symmetrize(factor.to(torch.float64))
    eye = torch.eye(factor.shape[0], dtype=torch.float64, device=factor.device)
    precision = math.sqrt(pseudo_data_count) * factor + math.sqrt(prior_precision) * eye
    return symmetrize(torch.linalg.inv(precision))


@dataclass
class KroneckerPosterior:
    """Matrix-normal posterior over one projection matrix.

    Attributes:
        a_inv: input-side covariance ``A^-1``, shape ``(h, h)``, float64.
        output_cov: output-side covariance ``Sigma_B``, shape ``(D, D)``, float64. For a
            diagonal-only posterior (BayesVLM-Base checkpoints) this is ``diag(b_diag)``.
        modality: which tower.
        is_diagonal: whether only the diagonal of ``Sigma_B`` is known.
        pseudo_data_count: ``n`` used to build it, if known.
        prior_precision: ``lambda`` used to build it, if known.
        factors: the raw curvature factors ``{"A": ..., "B": ...}`` before the prior, if
            known (lets ``n`` and ``lambda`` be changed later).
    """

    a_inv: torch.Tensor
    output_cov: torch.Tensor
    modality: Modality
    is_diagonal: bool = False
    pseudo_data_count: float | None = None
    prior_precision: float | None = None
    factors: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def __post_init__(self):
        self.modality = Modality(self.modality)
        self.a_inv = self.a_inv.to(torch.float64)
        self.output_cov = self.output_cov.to(torch.float64)
        for name, matrix in (("a_inv", self.a_inv), ("output_cov", self.output_cov)):
            if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
                raise ValueError(f"{name} must be a square matrix, got shape {tuple(matrix.shape)}")

    @classmethod
    def from_factors(
        cls,
        A: torch.Tensor,
        B: torch.Tensor,
        pseudo_data_count: float,
        prior_precision: float,
        modality: Modality | str,
    ) -> "KroneckerPosterior":
        """Build the posterior from curvature factors (docs/math.md section 2).

        ``A^-1 = inv(sqrt(n) A + sqrt(lambda) I)``, ``Sigma_B = inv(sqrt(n) B + sqrt(lambda) I)``.

        Args:
            A: input-side factor ``(1/sqrt(N)) sum a a^T``, shape ``(h, h)``.
            B: output-side factor ``(1/sqrt(N)) sum H``, shape ``(D, D)``.
            pseudo_data_count: ``n``, positive.
            prior_precision: ``lambda``, positive.
            modality: which tower.

        Returns:
            The posterior, keeping the raw factors.
        """
        if pseudo_data_count <= 0 or prior_precision <= 0:
            raise ValueError(
                f"pseudo_data_count and prior_precision must be positive, got "
                f"{pseudo_data_count} and {prior_precision}"
            )
        return cls(
            a_inv=_precision_inverse(A, pseudo_data_count, prior_precision),
            output_cov=_precision_inverse(B, pseudo_data_count, prior_precision),
            modality=modality,
            pseudo_data_count=float(pseudo_data_count),
            prior_precision=float(prior_precision),
            factors={"A": A.to(torch.float64), "B": B.to(torch.float64)},
        )

    def with_prior(
        self, pseudo_data_count: float | None = None, prior_precision: float | None = None
    ) -> "KroneckerPosterior":
        """Rebuild from the raw factors with another ``n`` and/or ``lambda``."""
        if self.factors is None:
            raise ValueError(
                f"{self.modality.value} posterior has no raw curvature factors; n and "
                "lambda cannot be changed"
            )
        return KroneckerPosterior.from_factors(
            self.factors["A"],
            self.factors["B"],
            pseudo_data_count if pseudo_data_count is not None else self.pseudo_data_count,
            prior_precision if prior_precision is not None else self.prior_precision,
            self.modality,
        )

    @property
    def in_features(self) -> int:
        """``h``, the activation width."""
        return int(self.a_inv.shape[0])

    @property
    def out_features(self) -> int:
        """``D``, the embedding dimension."""
        return int(self.output_cov.shape[0])

    @property
    def output_var(self) -> torch.Tensor:
        """Diagonal of ``Sigma_B``, shape ``(D,)``."""
        return torch.diagonal(self.output_cov)

    def check_projection(self, projection_shape: tuple[int, ...], model_name: str = "model") -> None:
        """Raise if a projection of this shape is not the one the posterior covers.

        Raises:
            ValueError: naming both shapes.
        """
        expected = (self.in_features, self.out_features)
        if tuple(projection_shape) != expected:
            raise ValueError(
                f"{self.modality.value} posterior covers a projection of shape {expected}, "
                f"{model_name} has {tuple(projection_shape)}"
            )

    def activation_scale(self, activations: ArrayLike) -> torch.Tensor:
        """Return ``q = a^T A^-1 a`` per row, shape ``(N,)`` float64 (docs/math.md section 1)."""
        a = _as_float64(activations, self.a_inv.device)
        if a.ndim != 2 or a.shape[1] != self.in_features:
            raise ValueError(
                f"activations must have shape (N, {self.in_features}), got {tuple(a.shape)}"
            )
        return ((a @ self.a_inv) * a).sum(1)

    def relative_variance(self, embeds: ArrayLike, activations: ArrayLike) -> torch.Tensor:
        """``q tr(Sigma_B) / |mu|^2`` per row, ``(N,)`` float64: the embedding's total variance over its squared norm.

        Scale-free, so it compares inputs of any norm (docs/math.md section 4).
        """
        return self.relative_variance_from_scale(self.activation_scale(activations), embeds)

    def relative_variance_from_scale(self, scales: ArrayLike, embeds: ArrayLike) -> torch.Tensor:
        """:meth:`relative_variance` from already computed ``q`` ``(N,)``."""
        means = _as_float64(embeds, self.a_inv.device)
        return _as_float64(scales, self.a_inv.device) * torch.trace(self.output_cov) / (means * means).sum(1)

    def embedding_variance(self, activations: ArrayLike) -> torch.Tensor:
        """Diagonal variance of the unnormalised embeddings, shape ``(N, D)``.

        ``Var[g_i] = q_i * diag(Sigma_B)``.
        """
        return self.activation_scale(activations)[:, None] * self.output_var[None, :]

    def embedding_covariance(self, activation: ArrayLike) -> torch.Tensor:
        """Full covariance ``q * Sigma_B`` of one embedding, shape ``(D, D)``."""
        q = self.activation_scale(_as_float64(activation, self.a_inv.device).reshape(1, -1))
        return q[0] * self.output_cov

    def diagonal(self) -> "KroneckerPosterior":
        """The same posterior with ``Sigma_B`` replaced by its diagonal."""
        return KroneckerPosterior(
            self.a_inv,
            torch.diag(self.output_var),
            self.modality,
            is_diagonal=True,
            pseudo_data_count=self.pseudo_data_count,
            prior_precision=self.prior_precision,
        )

    def sample_projection_noise(self, num_samples: int, generator: torch.Generator | None = None):
        """Draw ``E`` with ``vec(E) ~ N(0, A^-1 kron Sigma_B)``, shape ``(S, h, D)``."""
        left = torch.linalg.cholesky(self.a_inv)
        right = torch.linalg.cholesky(self.output_cov)
        z = torch.randn(
            num_samples, self.in_features, self.out_features, dtype=torch.float64, generator=generator
        )
        return left @ z @ right.T


def _as_float64(values: ArrayLike, device: torch.device) -> torch.Tensor:
    if isinstance(values, np.ndarray):
        values = torch.from_numpy(values)
    return values.to(device=device, dtype=torch.float64)
