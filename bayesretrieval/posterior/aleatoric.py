"""A post-hoc aleatoric head: per-image cosine variance for ambiguity no weight posterior can see.

The Laplace posterior's variance shrinks with data: an image that is ambiguous in the
training distribution itself (a small object, a confusable pair of colours) gets no
more of it than a clear one. This head predicts an extra variance ``sigma^2(a)`` of the
image side's cosine from the image's pre-projection activation ``a``,

    log sigma^2(a) = w . (a - center) / spread + b,

fitted on image-caption pairs by the retrieval likelihood: for every caption of a batch,
the probit softmax over the batch's images, ``softmax_j(s T c_ij / sqrt(1 + pi/8 (s T)^2
sigma_j^2))`` with ``c_ij`` the cosine of the means, should put its mass on the caption's
own image. A temperature ``T`` is fitted with the head, so that the variance's level is
not made to stand in for a temperature (it can only soften logits; a model whose logits
are too soft would drive every variance to zero). An image that tends to outscore the
right one for other captions gains variance (its logits shrink towards 0); one that is
usually right keeps a small one. A search would add ``sigma^2`` of an item to the
epistemic ``Var[cos]`` of its pairs (docs/math.md section 15).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bayesretrieval.similarity import probit_log_probabilities

DEFAULT_STEPS = 1000
DEFAULT_BATCH = 256


@dataclass(frozen=True)
class AleatoricHead:
    """The fitted head (all float64).

    Attributes:
        center: ``(h,)`` mean activation of the fitting images.
        spread: ``(h,)`` their per-feature std (1 where it is 0).
        weight: ``(h,)`` ``w``.
        bias: ``b``.
        temperature: ``T``, the multiplier of the logit scale fitted with it (1: none).
    """

    center: torch.Tensor
    spread: torch.Tensor
    weight: torch.Tensor
    bias: float
    temperature: float = 1.0

    def __post_init__(self):
        for name in ("center", "spread", "weight"):
            object.__setattr__(self, name, torch.as_tensor(getattr(self, name), dtype=torch.float64))
        object.__setattr__(self, "bias", float(self.bias))
        object.__setattr__(self, "temperature", float(self.temperature))

    def variance(self, activations: torch.Tensor) -> torch.Tensor:
        """``sigma^2(a)`` of every row of ``activations`` ``(N, h)``: ``(N,)``."""
        return torch.exp(self._standardised(activations) @ self.weight + self.bias)

    def _standardised(self, activations: torch.Tensor) -> torch.Tensor:
        return (torch.as_tensor(activations, dtype=torch.float64) - self.center) / self.spread

    @classmethod
    def fit(cls, image_activations: torch.Tensor, image_means: torch.Tensor, text_means: torch.Tensor,
            logit_scale: float, steps: int = DEFAULT_STEPS, batch_size: int = DEFAULT_BATCH,
            weight_decay: float = 1e-2, seed: int = 0) -> "AleatoricHead":
        """Fit ``w``, ``b`` and ``T`` on matched pairs (row ``i`` of each argument belongs together) with Adam.

        Args:
            image_activations: ``(N, h)``.
            image_means: ``(N, D)`` image embeddings.
            text_means: ``(N, D)`` caption embeddings.
            logit_scale: ``s``.
            steps: optimisation steps, one random batch each.
            batch_size: pairs per batch (the softmax runs over a batch's images).
            weight_decay: L2 penalty on ``w`` (the standardised features are many and correlated).
            seed: seed of the batches.
        """
        activations = torch.as_tensor(image_activations, dtype=torch.float64)
        spread = activations.std(dim=0)
        head = cls(activations.mean(dim=0), torch.where(spread > 0, spread, torch.ones_like(spread)),
                   torch.zeros(activations.shape[1], dtype=torch.float64), math.log(1e-4))
        features = head._standardised(activations)
        cosines = F.normalize(torch.as_tensor(image_means, dtype=torch.float64), dim=1)
        texts = F.normalize(torch.as_tensor(text_means, dtype=torch.float64), dim=1)
        weight = head.weight.clone().requires_grad_(True)
        bias = torch.tensor(head.bias, dtype=torch.float64, requires_grad=True)
        log_temperature = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.Adam([weight, bias, log_temperature], lr=0.05)
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            rows = torch.randperm(len(features), generator=g)[:batch_size]
            variance = torch.exp(features[rows] @ weight + bias)
            scale = logit_scale * torch.exp(log_temperature)
            log_p = probit_log_probabilities(scale * texts[rows] @ cosines[rows].T, scale**2 * variance[None, :], dim=1)
            loss = -log_p.diagonal().mean() + weight_decay * weight.pow(2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return cls(head.center, head.spread, weight.detach(), float(bias.detach()),
                   float(torch.exp(log_temperature.detach())))

