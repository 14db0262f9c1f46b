"""Curvature factors ``A`` and ``B`` of the Kronecker Laplace posterior (docs/math.md section 2).

``H_i`` is the Gauss-Newton Hessian of the InfoNCE loss with respect to the unnormalised
embedding ``g_i``, with the other modality's normalised embeddings of the same chunk as
classes. With ``ghat = g/|g|``, ``Yhat`` the ``(C, D)`` normalised targets,
``z = Yhat ghat`` (the cosines) and ``p = softmax(s z)``:

    J   = (I - ghat ghat^T) / |g|
    M   = Yhat^T diag(p) Yhat - (Yhat^T p)(Yhat^T p)^T
    H_i = s^2 J M J

The sum over sources never needs a ``(C, D, D)`` tensor: expanding ``J M J`` gives

    |g|^2 J M J = M - ghat u^T - u ghat^T + c ghat ghat^T,
    u = M ghat = Yhat^T (p * z) - m (p . z),   c = ghat^T M ghat = p . z^2 - (p . z)^2

with ``m = Yhat^T p``, and every term summed over sources is one matrix product of
``(b, D)`` or ``(C, D)`` matrices. Cost per chunk is ``O(C^2 D + C D^2)``, memory
``O(b C + D^2)`` for a sub-batch of ``b`` sources.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bayesretrieval.options import DEFAULT_SOURCE_BATCH
from bayesretrieval.posterior.kronecker import Modality


def _check_pair(sources: torch.Tensor, targets: torch.Tensor) -> None:
    if sources.ndim != 2 or targets.ndim != 2 or sources.shape[1] != targets.shape[1]:
        raise ValueError(
            f"sources and targets must be (b, D) and (C, D) with the same D, got "
            f"{tuple(sources.shape)} and {tuple(targets.shape)}"
        )


def _softmax_terms(sources: torch.Tensor, targets_hat: torch.Tensor, logit_scale: float):
    """Return ``ghat (b, D)``, ``|g|^2 (b,)``, ``z (b, C)``, ``p (b, C)``."""
    norms_sq = (sources * sources).sum(dim=1)
    sources_hat = sources / norms_sq.sqrt()[:, None]
    cosines = sources_hat @ targets_hat.T
    probs = torch.softmax(logit_scale * cosines, dim=1)
    return sources_hat, norms_sq, cosines, probs


def infonce_ggn(sources: torch.Tensor, targets: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Per-source InfoNCE Gauss-Newton Hessians ``H_i = s^2 J M J``, shape ``(b, D, D)``.

    The direct formula of docs/math.md section 2, batched with einsum; memory ``O(b D^2)``, so
    use it for small ``b``. :func:`infonce_ggn_sum` computes the sum without this tensor.

    Args:
        sources: unnormalised embeddings ``g``, shape ``(b, D)``.
        targets: the other modality's embeddings of the chunk (any norm), shape ``(C, D)``.
        logit_scale: ``s = exp(logit_scale)``, the multiplier of the cosines.

    Returns:
        Hessians with respect to ``g``, shape ``(b, D, D)``.
    """
    _check_pair(sources, targets)
    targets_hat = targets / targets.norm(dim=1, keepdim=True)
    sources_hat, norms_sq, _, probs = _softmax_terms(sources, targets_hat, logit_scale)
    eye = torch.eye(sources.shape[1], dtype=sources.dtype, device=sources.device)
    jac = (eye - torch.einsum("bi,bj->bij", sources_hat, sources_hat)) / norms_sq.sqrt()[:, None, None]
    mean = probs @ targets_hat
    middle = torch.einsum("bc,ci,cj->bij", probs, targets_hat, targets_hat)
    middle = middle - torch.einsum("bi,bj->bij", mean, mean)
    return logit_scale**2 * jac @ middle @ jac


def infonce_ggn_sum(
    sources: torch.Tensor,
    targets: torch.Tensor,
    logit_scale: float,
    source_batch: int = DEFAULT_SOURCE_BATCH,
) -> torch.Tensor:
    """``sum_i H_i`` over all sources, shape ``(D, D)``, without per-source matrices.

    Uses the expansion in the module docstring. Sources are processed ``source_batch`` at
    a time, so the largest temporary is ``(source_batch, C)``.

    Args:
        sources: unnormalised embeddings ``g``, shape ``(b, D)``.
        targets: the other modality's embeddings of the chunk, shape ``(C, D)``.
        logit_scale: ``s``, the multiplier of the cosines.
        source_batch: sources per sub-batch.

    Returns:
        The summed Gauss-Newton Hessian, shape ``(D, D)``, in the inputs' dtype.
    """
    _check_pair(sources, targets)
    if source_batch < 1:
        raise ValueError(f"source_batch must be at least 1, got {source_batch}")
    targets_hat = targets / targets.norm(dim=1, keepdim=True)
    dim = sources.shape[1]
    class_weights = torch.zeros(targets.shape[0], dtype=sources.dtype, device=sources.device)
    total = torch.zeros(dim, dim, dtype=sources.dtype, device=sources.device)
    for batch in sources.split(source_batch):
        sources_hat, norms_sq, cosines, probs = _softmax_terms(batch, targets_hat, logit_scale)
        inv_norms_sq = 1.0 / norms_sq
        class_weights += inv_norms_sq @ probs
        mean = probs @ targets_hat
        weighted = probs * cosines
        p_dot_z = weighted.sum(dim=1)
        u = weighted @ targets_hat - mean * p_dot_z[:, None]
        c = (weighted * cosines).sum(dim=1) - p_dot_z**2
        scaled_hat = sources_hat * inv_norms_sq[:, None]
        cross = scaled_hat.T @ u
        total += (
            -(mean * inv_norms_sq[:, None]).T @ mean
            - cross
            - cross.T
            + (scaled_hat * c[:, None]).T @ sources_hat
        )
    total += (targets_hat * class_weights[:, None]).T @ targets_hat
    return logit_scale**2 * total


def activation_outer_sum(activations: torch.Tensor) -> torch.Tensor:
    """``sum_i a_i a_i^T``, shape ``(h, h)``, for activations of shape ``(N, h)``."""
    if activations.ndim != 2:
        raise ValueError(f"activations must have shape (N, h), got {tuple(activations.shape)}")
    return activations.T @ activations


@dataclass
class _ModalitySums:
    activation_outer: torch.Tensor
    hessian: torch.Tensor


@dataclass
class ChunkCurvature:
    """Streaming sums of ``a a^T`` and ``H`` for both towers over chunks of ``C`` pairs.

    Feed chunks of exactly ``chunk_size`` aligned pairs with :meth:`add_chunk`; read the
    factors ``A = (1/sqrt(N)) sum a a^T`` and ``B = (1/sqrt(N)) sum H`` with
    :meth:`factors`. Each chunk is computed in its inputs' dtype and added into float64
    sums, so memory is ``O(C (h + D) + h^2 + D^2)`` whatever the number of chunks.

    Attributes:
        logit_scale: ``s``.
        chunk_size: ``C``, the pairs per chunk (the number of InfoNCE classes).
        source_batch: sources per sub-batch in :func:`infonce_ggn_sum`.
        num_pairs: pairs added so far (``N``).
    """

    logit_scale: float
    chunk_size: int
    source_batch: int = DEFAULT_SOURCE_BATCH
    num_pairs: int = 0
    _sums: dict[Modality, _ModalitySums] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.chunk_size < 2:
            raise ValueError(f"chunk_size must be at least 2 (InfoNCE needs classes), got {self.chunk_size}")
        if not self.logit_scale > 0:
            raise ValueError(f"logit_scale must be positive, got {self.logit_scale}")

    def add_chunk(
        self,
        image_activations: torch.Tensor,
        image_embeds: torch.Tensor,
        text_activations: torch.Tensor,
        text_embeds: torch.Tensor,
    ) -> None:
        """Add one chunk of ``C`` aligned pairs (row ``i`` of each is pair ``i``).

        Args:
            image_activations: ``(C, h_I)``.
            image_embeds: unnormalised image embeddings, ``(C, D)``.
            text_activations: ``(C, h_T)``.
            text_embeds: unnormalised text embeddings, ``(C, D)``.
        """
        tensors = (image_activations, image_embeds, text_activations, text_embeds)
        rows = {int(t.shape[0]) for t in tensors}
        if rows != {self.chunk_size}:
            raise ValueError(
                f"a chunk must hold chunk_size={self.chunk_size} rows in each tensor, got "
                f"{[int(t.shape[0]) for t in tensors]}"
            )
        towers = (
            (Modality.IMAGE, image_activations, image_embeds, text_embeds),
            (Modality.TEXT, text_activations, text_embeds, image_embeds),
        )
        for modality, activations, sources, targets in towers:
            outer = activation_outer_sum(activations).to(torch.float64)
            hessian = infonce_ggn_sum(sources, targets, self.logit_scale, self.source_batch)
            self._add(modality, outer, hessian.to(torch.float64))
        self.num_pairs += self.chunk_size

    def _add(self, modality: Modality, outer: torch.Tensor, hessian: torch.Tensor) -> None:
        sums = self._sums.get(modality)
        if sums is None:
            self._sums[modality] = _ModalitySums(outer, hessian)
            return
        if sums.activation_outer.shape != outer.shape or sums.hessian.shape != hessian.shape:
            raise ValueError(
                f"{modality.value} chunk has activation width {outer.shape[0]} and embedding "
                f"dim {hessian.shape[0]}, earlier chunks had {sums.activation_outer.shape[0]} "
                f"and {sums.hessian.shape[0]}"
            )
        sums.activation_outer += outer
        sums.hessian += hessian

    def factors(self, modality: Modality | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(A, B)`` for one tower, float64, symmetrised (docs/math.md section 2).

        Raises:
            ValueError: if no chunk has been added.
        """
        modality = Modality(modality)
        if self.num_pairs == 0:
            raise ValueError("no chunk added yet: the curvature factors need at least one chunk")
        sums = self._sums[modality]
        scale = self.num_pairs**-0.5
        outer, hessian = sums.activation_outer, sums.hessian
        return scale * (outer + outer.T) / 2, scale * (hessian + hessian.T) / 2
