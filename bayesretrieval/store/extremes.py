"""Collection-wide extremes of the per-item ratios the search certificate needs.

They are computed when a version is written and kept in its manifest (``extremes``, one
entry per covariance form the version's columns support), so opening an index does not
scan its arrays (docs/math.md section 8).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from bayesretrieval.store.format import CovarianceForm, ItemScalars

CHUNK_ROWS = 262_144
"""Rows scanned at a time, so memory-mapped arrays are never read whole."""


@dataclass(frozen=True)
class CollectionExtremes:
    """Extremes over the collection of the per-item ratios the bounds need.

    With ``r_I^2 = |mu|^2 + q tr Sigma_I`` (FAISS's normaliser), ``t`` the item's covariance
    trace (``q tr Sigma_I`` for ``kfac``, ``tr S_i`` for the per-item forms) and
    ``r_S^2 = |mu|^2 + t``:

    Attributes:
        noise_ratio_max: ``max t / r_S^2`` (how much of ``E|x|^2`` is noise).
        plain_noise_ratio_max: ``max t / |mu|^2``.
        mean_factor_min: ``min r_I / r_S``; ``E[cos] = f * (r_I / r_S)``.
        mean_factor_max: ``max r_I / r_S``.
        map_factor_min: ``min r_I / |mu|``; ``cos(mu_x, mu_y) = f * (r_I / |mu|) * (r_y / |mu_y|)``.
        map_factor_max: ``max r_I / |mu|``.
    """

    noise_ratio_max: float
    plain_noise_ratio_max: float
    mean_factor_min: float
    mean_factor_max: float
    map_factor_min: float
    map_factor_max: float

    @classmethod
    def compute(cls, scalars, trace_image: float, item_trace: np.ndarray | None = None) -> "CollectionExtremes":
        """Scan the stored scalars in chunks (``O(N)``).

        Args:
            scalars: ``(N, 6)`` stored scalars (memory-mapped is fine).
            trace_image: ``tr Sigma_I``.
            item_trace: ``(N,)`` per-item covariance traces ``tr S_i`` for the per-item
                forms (:func:`item_covariance_traces`); ``None`` for ``kfac``.

        Returns:
            The extremes; an empty collection gives all-zero ratios and unit factors.
        """
        if len(scalars) == 0:
            return cls(0.0, 0.0, 1.0, 1.0, 1.0, 1.0)
        low, high = np.full(4, np.inf), np.full(4, -np.inf)  # running extremes of the four ratios
        for start in range(0, len(scalars), CHUNK_ROWS):
            rows = slice(start, start + CHUNK_ROWS)
            item = ItemScalars.from_table(scalars[rows])
            norm_sq = np.maximum(item.norm_sq, 1e-300)
            faiss_sq = norm_sq + item.scale * trace_image
            trace = item.scale * trace_image if item_trace is None else item_trace[rows]
            own_sq = norm_sq + trace
            ratios = np.stack([trace / own_sq, trace / norm_sq, np.sqrt(faiss_sq / own_sq),
                               np.sqrt(faiss_sq / norm_sq)], axis=1)
            low, high = np.minimum(low, ratios.min(0)), np.maximum(high, ratios.max(0))
        return cls(
            noise_ratio_max=float(high[0]), plain_noise_ratio_max=float(high[1]),
            mean_factor_min=float(low[2]), mean_factor_max=float(high[2]),
            map_factor_min=float(low[3]), map_factor_max=float(high[3]),
        )

    def to_dict(self) -> dict:
        """The extremes as a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "CollectionExtremes":
        """Read back :meth:`to_dict`."""
        return cls(**{key: float(values[key]) for key in cls.__dataclass_fields__})


def item_covariance_traces(variance_diag=None, variance_lowrank=None) -> dict[CovarianceForm, np.ndarray]:
    """Per-item covariance traces ``(N,)`` of each per-item form the arrays support, in one chunked pass.

    ``diag``: ``sum d_i``; ``lowrank``: ``sum d_i + |L_i|_F^2``. Empty without ``variance_diag``.
    """
    if variance_diag is None:
        return {}
    diag, lowrank = np.empty(len(variance_diag)), np.empty(len(variance_diag))
    for start in range(0, len(variance_diag), CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        diag[rows] = np.asarray(variance_diag[rows], dtype=np.float64).sum(1)
        if variance_lowrank is not None:
            lowrank[rows] = diag[rows] + np.square(np.asarray(variance_lowrank[rows], dtype=np.float64)).sum((1, 2))
    traces = {CovarianceForm.DIAG: diag}
    if variance_lowrank is not None:
        traces[CovarianceForm.LOWRANK] = lowrank
    return traces


def extremes_by_form(scalars, trace_image: float, variance_diag=None, variance_lowrank=None) -> dict[str, dict]:
    """The extremes for ``kfac`` and every per-item form the variance columns support, keyed by form name."""
    forms = {CovarianceForm.KFAC: CollectionExtremes.compute(scalars, trace_image)}
    for form, trace in item_covariance_traces(variance_diag, variance_lowrank).items():
        forms[form] = CollectionExtremes.compute(scalars, trace_image, trace)
    return {form.value: extremes.to_dict() for form, extremes in forms.items()}
