"""Which images match a query: the world's ground-truth relevance.

A scene matches a :class:`~bayesretrieval.world.captions.Query` when its texture
matches (if the query names one) and the query's object constraints can be assigned
to *distinct* objects of the scene, each constraint satisfied by its object
(:func:`relevance_matrix`, the scene-only labels). A shifted image is relevant only
while the attributes the query names are still recognisable at its shift family and
severity (:func:`visible_relevance_matrix`, the rule in :data:`UNRECOGNISABLE_FROM`).
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from bayesretrieval.options import MAX_SEVERITY, Shift
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


# ---------------------------------------------------------------------------------------
# Relevance of shifted images: only what the image still shows counts.

VISIBLE_ATTRIBUTES = ("shape", "colour", "size", "position", "texture")
"""The attributes a query can name (``texture`` is the background's)."""

UNRECOGNISABLE_FROM: dict[Shift, dict[str, int]] = {
    Shift.NOISE: {"colour": 5, "shape": 5, "texture": 4},
    Shift.BLUR: {"shape": 4, "texture": 4},
    Shift.CONTRAST: {"colour": 4, "texture": 4, "shape": 5},
    Shift.OCCLUSION: {"shape": 4, "size": 4, "colour": 5, "position": 5},
    Shift.JPEG: {"colour": 5, "texture": 4},
    Shift.COMBINATION: {},
    Shift.NOVEL_SHAPE: {},
}
"""``{family: {attribute: lowest severity at which the attribute is no longer recognisable}}``.

An attribute missing from a family's entry stays recognisable at every severity. Images
are 64 px; objects have radius 6 px (small) or 12 px (large); backgrounds are a grey of
70-120 with a period-8 px pattern 30 grey levels brighter.

- ``noise`` (std 8, 16, 28, 44, 64 grey levels per pixel and channel): at std 44 the
  30-level background pattern is below the noise, so ``texture`` goes from 4; at std 64
  the per-pixel noise exceeds the distance between neighbouring hues and the outline of a
  small object, so ``colour`` and ``shape`` go from 5. Size and position (where the blob
  is, how big) survive any of these.
- ``blur`` (radius 0.5-3 px): radius 2 px rounds the corners of a 6 px object, so a
  diamond, square, hexagon and circle become one blob: ``shape`` goes from 4; the 4 px
  half-period of the background pattern is smoothed away at the same radius (``texture``
  from 4). Blur keeps mean colour, extent and place.
- ``contrast`` (keeps 60, 40, 25, 15, 8% of the contrast): at 15% a saturated colour
  differs from the grey mean by about 25 levels and the pattern by 4.5, so ``colour`` and
  ``texture`` go from 4; at 8% the object's outline is a few grey levels (``shape`` from
  5). The object still stands out as a region: size and position stay.
- ``occlusion`` (1-4 grey squares covering about 6-45% of the image): from 3 squares of
  35% side (severity 4) an object is often half covered, so its ``shape`` and ``size``
  can no longer be read; at severity 5 (about 45% covered) whole objects vanish, taking
  ``colour`` and ``position`` with them. The background stays visible around them.
- ``jpeg`` (quality 30-5): 8 px blocks at quality 8 and below flatten the period-8
  pattern (``texture`` from 4); at quality 5 chroma is quantised to a few levels, so
  hues merge (``colour`` from 5). Outlines, size and place survive.
- ``combination`` and ``novel_shape`` change the content, not the pixels: the image shows
  its scene exactly, so every attribute stays recognisable (whether the *model* knows a
  held-out shape or pair is what the shift tests, not what the image shows).
"""


def hidden_attributes(shift: Shift | str | None, severity: int | None) -> frozenset[str]:
    """The attributes an image of ``shift`` at ``severity`` no longer shows (empty when clean).

    Raises:
        ValueError: for an unknown family, or a shift without a severity in ``[1, MAX_SEVERITY]``.
    """
    if shift is None:
        return frozenset()
    shift = Shift(shift)
    if severity is None or not 1 <= int(severity) <= MAX_SEVERITY:
        raise ValueError(f"severity must be in [1, {MAX_SEVERITY}] for shift {shift.value!r}, got {severity!r}")
    return frozenset(a for a, start in UNRECOGNISABLE_FROM[shift].items() if severity >= start)


def named_attributes(query: Query | str) -> frozenset[str]:
    """The attributes a query names: object fields it constrains, and ``texture``."""
    query = _as_query(query)
    named = {name for obj in query.objects for name in ("shape", "colour", "size", "position")
             if getattr(obj, name) is not None}
    return frozenset(named | ({"texture"} if query.texture is not None else set()))


def visible_relevance_matrix(queries: Sequence[Query | str], scenes: Sequence[Scene],
                             shifts: Sequence[Shift | str | None], severities: Sequence[int | None]) -> np.ndarray:
    """Relevance that counts only what a shifted image still shows.

    A pair is relevant when the scene matches the query (:func:`relevance_matrix`) and no
    attribute the query names is hidden by the image's shift at its severity
    (:data:`UNRECOGNISABLE_FROM`). Hiding applies to the whole image, so it is a mask on
    top of the scene labels.

    Args:
        queries: ``nq`` queries.
        scenes: ``nb`` scenes.
        shifts: ``nb`` shift families, ``None`` for a clean image.
        severities: ``nb`` severities (``None`` for a clean image).

    Returns:
        bool ``(nq, nb)``, a subset of :func:`relevance_matrix`'s ``True`` entries.
    """
    if not len(scenes) == len(shifts) == len(severities):
        raise ValueError(f"{len(scenes)} scenes, {len(shifts)} shifts and {len(severities)} severities")
    queries = [_as_query(q) for q in queries]
    relevant = relevance_matrix(queries, scenes)
    hidden = [hidden_attributes(s, v) for s, v in zip(shifts, severities)]
    kinds = sorted(set(hidden), key=sorted)
    column_kind = np.array([kinds.index(h) for h in hidden], dtype=np.int64)
    for row, query in enumerate(queries):
        named = named_attributes(query)
        shown = np.array([not (named & kind) for kind in kinds], dtype=bool)
        relevant[row] &= shown[column_kind]
    return relevant
