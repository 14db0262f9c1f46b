"""The vectors FAISS indexes: item means scaled by their expected norm (docs/math.md section 4).

FAISS holds ``x = fl32(mu / s)`` with ``s = sqrt(|mu|^2 + q tr Sigma_I)``, so its inner
product with ``mu_y / sqrt(E|y|^2)`` is the expected cosine of the ``kfac`` form.
"""

from __future__ import annotations

import numpy as np

from bayesretrieval.store.format import ItemScalars

MIN_NORM = 1e-30
"""Floor on ``s``, so an all-zero item maps to the zero vector."""


def expected_norm(scalars: ItemScalars, trace_image: float) -> np.ndarray:
    """``s = sqrt(|mu|^2 + q tr Sigma_I)`` per item."""
    return np.sqrt(scalars.norm_sq + scalars.scale * trace_image)


def faiss_vectors(means: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """``fl32(mu / s)`` ``(N, D)`` for means ``(N, D)`` and norms ``s`` ``(N,)``.

    One float64 ufunc loop writing float32: numpy casts through small internal buffers,
    so no float64 copy of ``means`` is made.
    """
    out = np.empty(np.shape(means), np.float32)
    scale = np.maximum(np.asarray(norms, np.float64), MIN_NORM)[:, None]
    np.divide(means, scale, out=out, dtype=np.float64, casting="same_kind")
    return out
