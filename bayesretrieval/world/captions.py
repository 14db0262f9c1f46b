"""Captions from scene records, and attribute queries parsed from text.

A caption names every attribute of a scene (full description) in one of several
templates. A :class:`Query` is the attribute content of a text: one constraint per
object phrase (phrases are joined by "and"), each naming any subset of shape, colour,
size and position, plus an optional background texture. Because every vocabulary word
belongs to one vocabulary, parsing is a word-by-word lookup.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from enum import Enum
from typing import Sequence

import numpy as np

from bayesretrieval.world.scenes import Scene, WorldObject
from bayesretrieval.world.vocab import POSITION_PHRASE, Colour, Position, Shape, Size, Texture

OBJECT_TEMPLATES: tuple[str, ...] = (
    "{size} {colour} {shape} {where}",
    "{colour} {shape}, {size}, {where}",
    "{size} {colour} {shape} placed {where}",
)
"""How one object is described; ``where`` is the position's phrase ("on the left")."""

SCENE_TEMPLATES: tuple[str, ...] = (
    "a {objects}{background}",
    "a picture of a {objects}{background}",
    "there is a {objects}{background}",
    "an image showing a {objects}{background}",
)
"""How a scene is framed; two objects are joined by " and a "."""

BACKGROUND_TEMPLATE = " on a {texture} background"


@dataclass(frozen=True)
class ObjectQuery:
    """Constraint on one object; ``None`` means "any".

    Attributes:
        shape: required shape or None.
        colour: required colour or None.
        size: required size or None.
        position: required position or None.
    """

    shape: Shape | None = None
    colour: Colour | None = None
    size: Size | None = None
    position: Position | None = None

    def is_empty(self) -> bool:
        """Whether the constraint names no attribute."""
        return all(getattr(self, f.name) is None for f in fields(self))


@dataclass(frozen=True)
class Query:
    """The attribute content of a text query.

    Attributes:
        objects: one constraint per described object (each must match a distinct object).
        texture: required background texture or None.
    """

    objects: tuple[ObjectQuery, ...]
    texture: Texture | None = None


_FIELD_OF: dict[type[Enum], str] = {
    Shape: "shape",
    Colour: "colour",
    Size: "size",
    Position: "position",
}
_WORDS: dict[str, Enum] = {
    member.value: member for enum in (*_FIELD_OF, Texture) for member in enum
}


def describe_object(obj: WorldObject, template: str = OBJECT_TEMPLATES[0]) -> str:
    """Describe one object with a template from :data:`OBJECT_TEMPLATES`."""
    return template.format(
        size=obj.size.value,
        colour=obj.colour.value,
        shape=obj.shape.value,
        where=POSITION_PHRASE[obj.position],
    )


def caption(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """Describe every attribute of a scene.

    Args:
        scene: the record to describe.
        rng: picks the templates; ``None`` uses the first (canonical) templates.

    Returns:
        The caption, e.g. ``"a large red circle on the left on a striped background"``.
    """

    def pick(options: Sequence[str]) -> str:
        return options[0] if rng is None else options[rng.integers(len(options))]

    objects = " and a ".join(describe_object(o, pick(OBJECT_TEMPLATES)) for o in scene.objects)
    texture = scene.texture.value
    background = BACKGROUND_TEMPLATE.format(texture=texture)
    return pick(SCENE_TEMPLATES).format(objects=objects, background=background)


def full_query(scene: Scene) -> Query:
    """The query naming every attribute of ``scene`` (what its caption parses to)."""
    objects = tuple(ObjectQuery(o.shape, o.colour, o.size, o.position) for o in scene.objects)
    return Query(objects, scene.texture)


def parse_query(text: str) -> Query:
    """Read the attribute content of a text.

    Object phrases are separated by the word "and"; words outside the vocabularies
    are ignored; a texture word anywhere sets the background.

    Args:
        text: e.g. ``"a red circle and a small square at the top"``.

    Returns:
        The query.

    Raises:
        ValueError: if the text names no attribute, or one phrase names two values
            of the same attribute (e.g. "red blue circle").
    """
    texture: Texture | None = None
    objects = []
    for phrase in re.split(r"\band\b", text.lower()):
        found: dict[str, Enum] = {}
        for word in re.findall(r"[a-z]+", phrase):
            member = _WORDS.get(word)
            if member is None:
                continue
            if isinstance(member, Texture):
                if texture is not None and texture is not member:
                    raise ValueError(f"query {text!r} names two textures: {texture.value}, {word}")
                texture = member
                continue
            name = _FIELD_OF[type(member)]
            if name in found and found[name] is not member:
                raise ValueError(
                    f"query {text!r} names two {name}s in one phrase: {found[name].value}, {word}"
                )
            found[name] = member
        constraint = ObjectQuery(**found)
        if not constraint.is_empty():
            objects.append(constraint)
    if not objects and texture is None:
        raise ValueError(f"query {text!r} names no shape, colour, size, position or texture")
    return Query(tuple(objects), texture)


def query_text(query: Query) -> str:
    """Write a query as text that :func:`parse_query` reads back to the same query."""
    phrases = []
    for obj in query.objects:
        words = [v.value for v in (obj.size, obj.colour) if v is not None]
        words.append(obj.shape.value if obj.shape is not None else "object")
        if obj.position is not None:
            words.append(POSITION_PHRASE[obj.position])
        phrases.append(" ".join(words))
    text = "a " + " and a ".join(phrases) if phrases else "an image"
    if query.texture is not None:
        text += BACKGROUND_TEMPLATE.format(texture=query.texture.value)
    return text


def partial_query(
    scene: Scene, attributes: Sequence[str], include_texture: bool = False
) -> Query:
    """A query naming only some attributes of one of the scene's objects (the first).

    Args:
        scene: the scene the query is drawn from (it always matches).
        attributes: which of ``"shape"``, ``"colour"``, ``"size"``, ``"position"`` to keep.
        include_texture: also require the scene's background texture.

    Returns:
        The query, e.g. for ``("colour", "shape")``: "a red circle".
    """
    unknown = set(attributes) - set(_FIELD_OF.values())
    if unknown:
        raise ValueError(
            f"attributes must be among {sorted(_FIELD_OF.values())}, got {sorted(unknown)}"
        )
    obj = scene.objects[0]
    constraint = ObjectQuery(**{name: getattr(obj, name) for name in attributes})
    return Query((constraint,), scene.texture if include_texture else None)
