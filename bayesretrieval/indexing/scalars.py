"""Per-item posterior scalars and optional variance columns for a batch (docs/math.md sections 4 and 13)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from bayesretrieval.encoders import ClipEncoder
from bayesretrieval.posterior import PosteriorPair
from bayesretrieval.posterior.lastblock_posterior import LastBlockPosterior, item_covariance
from bayesretrieval.similarity import side_statistics
from bayesretrieval.store.format import VarianceSpec


@dataclass
class BatchUncertainty:
    """What the index stores per item besides the mean, for one batch of ``B`` items.

    Attributes:
        scalars: ``(B, 6)`` float64: ``scale, norm_sq, quad_image, quad_text,
            quad_image_diag, quad_text_diag``.
        variance_diag: ``(B, D)`` float32 or ``None``.
        variance_lowrank: ``(B, r, D)`` float32 or ``None``.
    """

    scalars: np.ndarray
    variance_diag: np.ndarray | None = None
    variance_lowrank: np.ndarray | None = None


class ScalarComputer:
    """Computes the per-item scalars of image embeddings under a Kronecker posterior.

    The covariances are converted to float64 once; each batch then costs a few
    ``(B, D) x (D, D)`` products, small next to the image tower. With a last-block
    posterior the variance columns hold each item's linearised covariance under it
    instead (:func:`~bayesretrieval.posterior.lastblock_posterior.item_covariance`); the
    scalars stay the projection posterior's, which the text side and the ``kfac`` form use.

    Args:
        posterior: the image/text posterior pair.
        variance: which optional variance columns to produce.
        lastblock: the image tower's last-block posterior, or ``None``.

    Raises:
        ValueError: for a last-block posterior without variance columns (``kfac``).
    """

    def __init__(self, posterior: PosteriorPair, variance: VarianceSpec = VarianceSpec(),
                 lastblock: LastBlockPosterior | None = None):
        if lastblock is not None and not variance.has_diag:
            raise ValueError("a last-block posterior's item covariance is stored as variance columns; "
                             "use variance diag or lowrank:R, not kfac")
        self.posterior = posterior
        self.variance = variance
        self.lastblock = lastblock
        self._sigma_image = posterior.image.output_cov.to(torch.float64)
        self._sigma_text = posterior.text.output_cov.to(torch.float64)
        self._var_image = torch.diagonal(self._sigma_image).clone()
        self._var_text = torch.diagonal(self._sigma_text).clone()
        self._lowrank_basis = None
        self._lowrank_residual = None
        if variance.has_lowrank:
            self._lowrank_basis, self._lowrank_residual = _lowrank_split(self._sigma_image, variance.rank)

    @property
    def embed_dim(self) -> int:
        """``D``."""
        return int(self._sigma_image.shape[0])

    def encode(self, encoder: ClipEncoder, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, BatchUncertainty]:
        """Encode preprocessed images ``(B, 3, H, W)``.

        Returns:
            ``(means (B, D), activations (B, h), uncertainty)`` on the CPU, where the posterior lives.
        """
        if self.lastblock is not None:
            means, activations, factors = item_covariance(encoder, self.lastblock, pixels, self.variance)
            uncertainty = self.from_activations(means, activations)
            return means, activations, replace(uncertainty, variance_diag=factors.variance_diag,
                                               variance_lowrank=factors.variance_lowrank)
        encoded = encoder.encode_image_batch(pixels)
        means, activations = encoded.embeds.cpu(), encoded.activations.cpu()
        return means, activations, self.from_activations(means, activations)

    def from_scales(self, means: torch.Tensor, scales: torch.Tensor) -> BatchUncertainty:
        """Scalars for means ``(B, D)`` and known scales ``q`` ``(B,)``."""
        if means.ndim != 2 or means.shape[1] != self.embed_dim:
            raise ValueError(f"means have shape {tuple(means.shape)}, posterior has D={self.embed_dim}")
        full = side_statistics(means, scales, self._sigma_image, self._sigma_text)
        squares = means.to(torch.float64) ** 2  # mu^T diag(Sigma) mu without a D x D product
        scalars = torch.stack(
            [full.scale, full.norm_sq, full.own_quad, full.other_quad,
             squares @ self._var_image, squares @ self._var_text], dim=1
        ).numpy()
        return BatchUncertainty(scalars, *self._variance_columns(full.scale))

    def from_activations(self, means: torch.Tensor, activations: torch.Tensor) -> BatchUncertainty:
        """Scalars for means ``(B, D)`` and pre-projection activations ``(B, h)``."""
        return self.from_scales(means, self.posterior.image.activation_scale(activations))

    def _variance_columns(self, scales: torch.Tensor):
        if not self.variance.has_diag:
            return None, None
        q = scales.to(torch.float64)
        if self._lowrank_basis is None:
            return (q[:, None] * self._var_image[None, :]).float().numpy(), None
        lowrank = q.sqrt()[:, None, None] * self._lowrank_basis[None]
        return (q[:, None] * self._lowrank_residual[None, :]).float().numpy(), lowrank.float().numpy()


def _lowrank_split(sigma: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``Sigma = L^T L + diag(d) + (off-diagonal rest)`` with ``L`` the top-``rank`` part.

    Returns:
        ``L`` ``(rank, D)`` (rows ``sqrt(lambda_j) v_j``) and ``d`` ``(D,)`` so that
        ``diag(L^T L) + d = diag(Sigma)`` exactly.

    Raises:
        ValueError: if ``rank`` exceeds ``D``.
    """
    dim = sigma.shape[0]
    if rank > dim:
        raise ValueError(f"variance rank {rank} exceeds the embedding dimension {dim}")
    eigvals, eigvecs = torch.linalg.eigh(sigma)
    top = torch.argsort(eigvals, descending=True)[:rank]
    basis = eigvals[top].clamp_min(0).sqrt()[:, None] * eigvecs[:, top].T
    residual = (torch.diagonal(sigma) - (basis * basis).sum(0)).clamp_min(0)
    return basis, residual
