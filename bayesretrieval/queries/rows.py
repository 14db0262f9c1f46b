"""The stored rows of an index version, gathered by item id for the rerank.

Each candidate needs its stored scalars (and, for per-item covariance forms, its variance
columns) and its mean. The mean has two sources that give the same bits, and each
gather reads from the one that has been cheaper on this machine
(:class:`~bayesretrieval.queries.sources.CheaperSource`).
"""

from __future__ import annotations

import numpy as np

from bayesretrieval.queries.sources import CheaperSource
from bayesretrieval.queries.uncertainty import Candidates, UncertaintyForm
from bayesretrieval.store import IdLookup
from bayesretrieval.store.reader import IndexedMeans

FROM_FAISS, FROM_FILE = "faiss_index", "means_npy"
"""The two sources of candidate means (:attr:`StoredRows.mean_sources`)."""


class StoredRows:
    """Random access to the stored rows by item id (memory-mapped arrays welcome).

    Args:
        ids: the id-to-row lookup.
        means: ``(N, D)`` float32.
        scalars: ``(N, 6)`` float64.
        variance_diag: ``(N, D)`` or ``None``.
        variance_lowrank: ``(N, r, D)`` or ``None``.
        indexed_means: where the FAISS index reproduces ``means`` exactly, the means
            from there; ``None``: read ``means``. With both, each gather reads from the
            one that has been cheaper on this machine (:class:`CheaperSource`).
    """

    def __init__(self, ids: IdLookup, means, scalars, variance_diag=None, variance_lowrank=None,
                 indexed_means: IndexedMeans | None = None):
        self.ids, self.means, self.scalars = ids, means, scalars
        self.variance_diag, self.variance_lowrank = variance_diag, variance_lowrank
        self.indexed_means = indexed_means
        self.fix_mean_source(None)

    def fix_mean_source(self, source: str | None) -> None:
        """Read candidate means from ``source`` only (:data:`FROM_FAISS` or :data:`FROM_FILE`), or from
        whichever is cheaper (``None``).

        Raises:
            ValueError: for an unknown source, or the FAISS index where it cannot reproduce the means.
        """
        available = [FROM_FAISS, FROM_FILE] if self.indexed_means is not None else [FROM_FILE]
        if source is not None and source not in available:
            raise ValueError(f"mean source {source!r} is not available here; expected one of {available}")
        self.mean_sources = CheaperSource(available if source is None else [source])

    def _rows(self, I: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row positions of the ids ``I`` flattened (``0`` for ``-1``) and which ids are real.

        Raises:
            ValueError: if an id is not stored (index and arrays disagree).
        """
        flat = I.reshape(-1)
        valid = flat >= 0
        rows = self.ids.positions(flat)
        if np.any(rows[valid] < 0):
            raise ValueError("FAISS returned ids missing from the stored arrays (corrupt index)")
        rows[~valid] = 0
        return rows, valid

    def gather_scalars(self, I: np.ndarray) -> np.ndarray:
        """Stored scalars ``(nq, kc, 6)`` of the ids ``I`` ``(nq, kc)``, ones where ``-1``."""
        return _take(self.scalars, *self._rows(I), 1.0, I.shape)

    def gather(self, I: np.ndarray, form: UncertaintyForm) -> Candidates:
        """Rows for ids ``I`` ``(nq, kc)`` (``-1`` allowed), as :class:`Candidates`.

        Raises:
            ValueError: if an id is not stored (index and arrays disagree).
        """
        rows, valid = self._rows(I)
        form = UncertaintyForm(form)
        take = lambda array, fill: None if array is None else _take(array, rows, valid, fill, I.shape)  # noqa: E731
        scalars = take(self.scalars, 1)
        return Candidates(
            I, self._means(rows, valid, scalars, I.shape), scalars,
            take(self.variance_diag, 0) if form is not UncertaintyForm.KFAC else None,
            take(self.variance_lowrank, 0) if form is UncertaintyForm.LOWRANK else None,
        )

    def _means(self, rows: np.ndarray, valid: np.ndarray, scalars: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Means of ``rows`` (zeros where not ``valid``) from whichever source has been cheaper.

        The index path rebuilds padding from row 0 and then zeroes it: one array written
        once, where rebuilding only the valid rows and scattering them would write two.
        """
        with self.mean_sources.timed(len(rows)) as source:
            if source == FROM_FILE:
                return _take(self.means, rows, valid, 0, shape)
            means = self.indexed_means(rows, scalars.reshape(len(rows), -1))
            means[~valid] = 0
            return means.reshape(*shape, -1)


def _take(array, rows: np.ndarray, valid: np.ndarray, fill: float, shape: tuple[int, ...]) -> np.ndarray:
    """``array[rows]`` with ``fill`` where not ``valid``, reshaped to ``shape + array.shape[1:]``."""
    out = np.asarray(array[rows])
    out[~valid] = fill
    return out.reshape(*shape, *out.shape[1:])
