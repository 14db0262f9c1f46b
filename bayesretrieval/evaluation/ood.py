"""Non-Bayesian out-of-distribution scores of pre-projection activations: what a practitioner tries first.

Both are fitted on the activations ``a`` of a fitting set (the pairs the posterior was
fitted on) and score new activations, higher meaning "further from the fitting set":

- :class:`MahalanobisDistance`: ``(a - m)^T (C + r I)^-1 (a - m)`` with the fitting set's
  mean ``m`` and covariance ``C`` (centred, unlike the posterior's ``q = a^T A^-1 a``,
  whose ``A`` is an uncentred second moment plus the prior), ``r`` a small ridge;
- :class:`KnnDistance`: ``1 - cos`` to the ``k``-th nearest fitting activation after L2
  normalisation (Sun et al. 2022, "Out-of-distribution detection with deep nearest
  neighbors").
"""

from __future__ import annotations

import numpy as np
import torch


def _matrix(x, name: str, dim: int | None = None) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be (n, h), got shape {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has dim {x.shape[1]}, the fitting set has dim {dim}")
    return x


class _Fitted:
    def _check_fitted(self) -> None:
        if not hasattr(self, "dim_"):
            raise RuntimeError(f"this {type(self).__name__} is not fitted yet; call fit(activations) first")


class MahalanobisDistance(_Fitted):
    """Centred Mahalanobis distance (squared) to the fitting activations.

    Args:
        ridge: ``r`` relative to the mean eigenvalue: ``C + ridge * tr(C) / h * I``.
    """

    def __init__(self, ridge: float = 1e-3):
        if ridge <= 0:
            raise ValueError(f"ridge must be positive, got {ridge}")
        self.ridge = ridge

    def fit(self, activations) -> "MahalanobisDistance":
        """Learn ``mean_`` ``(h,)`` and ``precision_`` ``(h, h)`` from ``(n, h)`` activations (``n >= 2``)."""
        a = _matrix(activations, "activations")
        if a.shape[0] < 2:
            raise ValueError(f"need at least 2 fitting activations, got {a.shape[0]}")
        self.mean_ = a.mean(dim=0)
        centred = a - self.mean_
        cov = centred.T @ centred / (a.shape[0] - 1)
        h = cov.shape[0]
        cov += self.ridge * torch.trace(cov) / h * torch.eye(h, dtype=cov.dtype)
        self.precision_ = torch.linalg.inv(cov)
        self.dim_ = h
        return self

    def score(self, activations) -> np.ndarray:
        """``(n,)`` squared distances of ``(n, h)`` activations."""
        self._check_fitted()
        centred = _matrix(activations, "activations", self.dim_) - self.mean_
        return ((centred @ self.precision_) * centred).sum(dim=1).numpy()


class KnnDistance(_Fitted):
    """Cosine distance to the ``k``-th nearest fitting activation.

    Args:
        k: which neighbour (1 = the nearest).
    """

    def __init__(self, k: int = 10):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k

    def fit(self, activations) -> "KnnDistance":
        """Keep the L2-normalised fitting activations ``bank_`` ``(n, h)``, ``n >= k``."""
        a = _matrix(activations, "activations")
        if a.shape[0] < self.k:
            raise ValueError(f"need at least k={self.k} fitting activations, got {a.shape[0]}")
        self.bank_ = torch.nn.functional.normalize(a, dim=1)
        self.dim_ = a.shape[1]
        return self

    def score(self, activations, chunk_size: int = 1024) -> np.ndarray:
        """``(n,)`` distances ``1 - cos`` of ``(n, h)`` activations to their ``k``-th neighbour."""
        self._check_fitted()
        x = torch.nn.functional.normalize(_matrix(activations, "activations", self.dim_), dim=1)
        out = [1.0 - torch.topk(part @ self.bank_.T, self.k, dim=1).values[:, -1] for part in x.split(chunk_size)]
        return torch.cat(out).numpy() if out else np.zeros(0)
