"""FAISS vectors, and stored means that they reproduce bit for bit.

FAISS holds ``x = fl32(mu / s)`` with ``s = sqrt(|mu|^2 + q tr Sigma_I)`` (MATH.md
section 4). The writer stores the means ``m`` for which ``fl32(s * x) == m`` exactly,
for every component (:func:`invertible_means`; at most one unit in the last place from
the encoder's ``mu``). An exact rerank can then read a candidate's mean from the FAISS
lists it has just scanned instead of from ``means.npy``: same bits, from memory the
search has just read rather than random rows of a large memory-mapped file. Which of the
two is cheaper depends on the machine; the engine times both
(:class:`bayesretrieval.queries.sources.CheaperSource`).
"""

from __future__ import annotations

import numpy as np

MIN_NORM = 1e-30
"""Floor on ``s``, so an all-zero item maps to the zero vector."""
MAX_ROUNDS = 8
"""Round trips :func:`invertible_means` tries before giving up (one suffices in practice)."""
CHUNK_ROWS = 1024
"""Rows per chunk of :func:`invertible_means`: its copies stay small (2 MiB at D = 512)
and the allocator reuses them (1M x 512 means: 8 s, against 11-13 s in chunks of 4,096
to 65,536 rows)."""


def expected_norm(scalars: np.ndarray, trace_image: float) -> np.ndarray:
    """``s = sqrt(|mu|^2 + q tr Sigma_I)`` per row of a ``(N, 6)`` scalars array."""
    scalars = np.asarray(scalars, np.float64)
    return np.sqrt(scalars[:, 1] + scalars[:, 0] * trace_image)


def faiss_vectors(means: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """``fl32(m / s)``: the vectors FAISS indexes, ``(N, D)`` float32, for norms ``s`` ``(N,)``."""
    return _scaled(means, norms, np.divide)


def means_from_vectors(vectors: np.ndarray, norms: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``fl32(s * x)``: the stored means back from FAISS vectors ``x`` ``(N, D)`` and norms ``s``.

    Args:
        vectors: ``(N, D)`` float32.
        norms: ``(N,)``.
        out: ``(N, D)`` float32 to write into; may be ``vectors`` itself (each element
            is read before it is written). Default: a new array.
    """
    return _scaled(vectors, norms, np.multiply, out)


def invertible_means(means: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """Float32 means next to ``means`` that :func:`means_from_vectors` gives back exactly.

    Round trips ``m -> fl32(s fl32(m / s))`` until nothing changes. Each round trip is
    monotone in ``m``, so a component's iterates move one way and stop at a fixed point;
    means that already are one (an unchanged item in a rebuild) come back unchanged. In
    practice one round trip suffices and moves about one component in ten by one unit in
    the last place.

    Args:
        means: ``(N, D)`` means.
        norms: ``(N,)`` their ``s`` (:func:`expected_norm`).

    Returns:
        ``(N, D)`` float32 means ``m`` with ``means_from_vectors(faiss_vectors(m, s), s) == m``.

    Raises:
        RuntimeError: if :data:`MAX_ROUNDS` round trips leave some row moving.
    """
    out = np.empty(np.shape(means), np.float32)
    for start in range(0, len(out), CHUNK_ROWS):
        part = slice(start, start + CHUNK_ROWS)
        out[part] = _fixed_point(np.array(means[part], dtype=np.float32), np.asarray(norms[part]))
    return out


def _fixed_point(means: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """:func:`invertible_means` of one chunk, in place in ``means``."""
    moving = np.arange(len(means))
    for _ in range(MAX_ROUNDS):
        rows = means[moving]
        vectors = faiss_vectors(rows, norms[moving])
        back = means_from_vectors(vectors, norms[moving], out=vectors)
        changed = np.any(back != rows, axis=1)
        if not changed.any():
            return means
        moving = moving[changed]
        means[moving] = back[changed]
    raise RuntimeError(f"{len(moving)} means found no float32 fixed point in {MAX_ROUNDS} round trips")


def _scaled(rows: np.ndarray, norms: np.ndarray, ufunc: np.ufunc, out: np.ndarray | None = None) -> np.ndarray:
    """``fl32(ufunc(rows, s))`` computed in float64, row ``i`` with ``s_i = max(norms_i, MIN_NORM)``; ``(N, D)`` float32.

    One float64 ufunc loop writing float32 (into ``out`` when given): numpy casts
    through small internal buffers, so no float64 copy of ``rows`` is ever made.
    """
    if out is None:
        out = np.empty(np.shape(rows), np.float32)
    scale = np.maximum(np.asarray(norms, np.float64), MIN_NORM)[:, None]
    ufunc(rows, scale, out=out, dtype=np.float64, casting="same_kind")
    return out
