"""Which images match a query: the world's ground-truth relevance.

A scene matches a :class:`~bayesretrieval.world.captions.Query` when its texture
matches (if the query names one) and the query's object constraints can be assigned
to *distinct* objects of the scene, each constraint satisfied by its object.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from bayesretrieval.world.captions import Query, parse_query
from bayesretrieval.world.scenes import Scene, attribute_codes
from bayesretrieval.world.vocab import ATTRIBUTES, Texture

_ANY = -1


def _query_codes(query: Query) -> np.ndarray:
    """``(m, 4)`` attribute indices of a query's constraints, ``-1`` for "any"."""
    codes = np.full((len(query.objects), 4), _ANY, dtype=np.int64)
    for row, obj in enumerate(query.objects):
        for col, (enum, value) in enumerate(
            zip(ATTRIBUTES, (obj.shape, obj.colour, obj.size, obj.position))
        ):
            if value is not None:
                codes[row, col] = list(enum).index(value)
    return codes


def _as_query(query: Query | str) -> Query:
    return parse_query(query) if isinstance(query, str) else query


def relevance_matrix(queries: Sequence[Query | str], scenes: Sequence[Scene]) -> np.ndarray:
    """Label every (query, image) pair.

    Args:
        queries: ``nq`` queries (a :class:`Query` or a text to parse).
        scenes: ``nb`` scene records.

    Returns:
        bool array ``(nq, nb)``; ``True`` where the scene matches the query.
    """
    max_objects = max((len(s.objects) for s in scenes), default=1)
    scene_codes = attribute_codes(scenes, max_objects)  # (nb, S, 4)
    textures = np.array([list(Texture).index(s.texture) for s in scenes], dtype=np.int64)
    relevant = np.zeros((len(queries), len(scenes)), dtype=bool)
    for row, query in enumerate(queries):
        query = _as_query(query)
        codes = _query_codes(query)  # (m, 4)
        m = len(codes)
        ok = np.ones(len(scenes), dtype=bool)
        if query.texture is not None:
            ok &= textures == list(Texture).index(query.texture)
        if m > max_objects:
            continue
        if m:
            # sat[c, b, s]: constraint c holds for object slot s of scene b.
            fits = (codes[:, None, None, :] == _ANY) | (
                codes[:, None, None, :] == scene_codes[None, :, :, :]
            )
            present = scene_codes[None, :, :, 0] >= 0
            sat = fits.all(axis=-1) & present
            assigned = np.zeros(len(scenes), dtype=bool)
            for slots in itertools.permutations(range(max_objects), m):
                assigned |= np.logical_and.reduce([sat[c, :, s] for c, s in enumerate(slots)])
            ok &= assigned
        relevant[row] = ok
    return relevant


def matches(query: Query | str, scene: Scene) -> bool:
    """Whether one scene matches one query; see :func:`relevance_matrix`."""
    return bool(relevance_matrix([query], [scene])[0, 0])
