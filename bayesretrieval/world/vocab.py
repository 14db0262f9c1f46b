"""The small world's fixed vocabularies: shape, colour, size, position, background.

Every member's value is the word used in captions and queries, and every word belongs
to exactly one vocabulary, so a query can be parsed word by word (see ``captions``).
"""

from __future__ import annotations

from enum import Enum


class Shape(str, Enum):
    """What an object looks like; drawn by ``render`` from a registry of outlines."""

    CIRCLE = "circle"
    """A filled disc."""
    SQUARE = "square"
    """A filled axis-aligned square (rotated slightly by the renderer's jitter)."""
    TRIANGLE = "triangle"
    """A filled triangle pointing up."""
    DIAMOND = "diamond"
    """A square standing on one corner."""
    CROSS = "cross"
    """A plus sign made of two bars."""
    STAR = "star"
    """A five-pointed star."""
    HEXAGON = "hexagon"
    """A filled regular hexagon."""
    RING = "ring"
    """A disc with a hole showing the background."""


class Colour(str, Enum):
    """The fill colour of an object; :data:`COLOUR_RGB` holds its RGB value."""

    RED = "red"
    """(220, 40, 40)"""
    ORANGE = "orange"
    """(245, 140, 20)"""
    YELLOW = "yellow"
    """(240, 225, 40)"""
    GREEN = "green"
    """(40, 170, 60)"""
    CYAN = "cyan"
    """(40, 210, 225)"""
    BLUE = "blue"
    """(40, 70, 225)"""
    PURPLE = "purple"
    """(145, 50, 205)"""
    PINK = "pink"
    """(250, 130, 200)"""


class Size(str, Enum):
    """How big an object is; :data:`SIZE_RADIUS` holds its radius in units of the image side."""

    SMALL = "small"
    """Radius about 1/10 of the image side."""
    LARGE = "large"
    """Radius about 1/5 of the image side."""


class Position(str, Enum):
    """Where an object sits; :data:`POSITION_CENTRE` holds its centre in image units."""

    LEFT = "left"
    """Centre at (1/4, 1/2)."""
    RIGHT = "right"
    """Centre at (3/4, 1/2)."""
    TOP = "top"
    """Centre at (1/2, 1/4)."""
    BOTTOM = "bottom"
    """Centre at (1/2, 3/4)."""
    CENTER = "center"
    """Centre at (1/2, 1/2)."""


class Texture(str, Enum):
    """The background pattern, drawn in a grey slightly lighter than the background."""

    PLAIN = "plain"
    """A flat grey background."""
    STRIPED = "striped"
    """Diagonal stripes."""
    DOTTED = "dotted"
    """A grid of dots."""
    CHECKERED = "checkered"
    """A checkerboard."""


COLOUR_RGB: dict[Colour, tuple[int, int, int]] = {
    Colour.RED: (220, 40, 40),
    Colour.ORANGE: (245, 140, 20),
    Colour.YELLOW: (240, 225, 40),
    Colour.GREEN: (40, 170, 60),
    Colour.CYAN: (40, 210, 225),
    Colour.BLUE: (40, 70, 225),
    Colour.PURPLE: (145, 50, 205),
    Colour.PINK: (250, 130, 200),
}

SIZE_RADIUS: dict[Size, float] = {Size.SMALL: 0.10, Size.LARGE: 0.19}

POSITION_CENTRE: dict[Position, tuple[float, float]] = {
    Position.LEFT: (0.25, 0.5),
    Position.RIGHT: (0.75, 0.5),
    Position.TOP: (0.5, 0.25),
    Position.BOTTOM: (0.5, 0.75),
    Position.CENTER: (0.5, 0.5),
}

POSITION_PHRASE: dict[Position, str] = {
    Position.LEFT: "on the left",
    Position.RIGHT: "on the right",
    Position.TOP: "at the top",
    Position.BOTTOM: "at the bottom",
    Position.CENTER: "in the center",
}

TWO_OBJECT_LAYOUTS: tuple[tuple[Position, Position], ...] = (
    (Position.LEFT, Position.RIGHT),
    (Position.TOP, Position.BOTTOM),
)
"""Position pairs for two-object scenes: opposite sides, so large objects never overlap."""

ATTRIBUTES: tuple[type[Enum], ...] = (Shape, Colour, Size, Position)
"""The per-object vocabularies, in the order used by attribute arrays."""
