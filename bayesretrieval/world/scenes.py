"""Structured scene records and the seeded sampler that draws them.

A :class:`Scene` is the ground truth of one image: one or two objects with their
attributes, a background texture, and the seed of the renderer's small jitters (exact
offsets, rotation, background grey), so a scene always renders to the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from bayesretrieval.world.vocab import (
    ATTRIBUTES,
    TWO_OBJECT_LAYOUTS,
    Colour,
    Position,
    Shape,
    Size,
    Texture,
)


@dataclass(frozen=True)
class WorldObject:
    """One object of a scene.

    Attributes:
        shape: what it looks like.
        colour: its fill colour.
        size: small or large.
        position: where it sits.
    """

    shape: Shape
    colour: Colour
    size: Size
    position: Position


@dataclass(frozen=True)
class Scene:
    """The attribute record of one image.

    Attributes:
        objects: one or two objects; two objects sit on opposite sides.
        texture: the background pattern.
        seed: seed of the renderer's jitter (offsets, rotation, background grey).
    """

    objects: tuple[WorldObject, ...]
    texture: Texture
    seed: int


@dataclass(frozen=True)
class ObjectPool:
    """Which (shape, colour) pairs the sampler may draw.

    Attributes:
        pairs: the allowed (shape, colour) pairs, drawn uniformly.
    """

    pairs: tuple[tuple[Shape, Colour], ...]

    def __post_init__(self):
        if not self.pairs:
            raise ValueError("an object pool needs at least one (shape, colour) pair, got 0")

    @classmethod
    def full(cls) -> "ObjectPool":
        """Every shape with every colour."""
        return cls(tuple((s, c) for s in Shape for c in Colour))


@dataclass(frozen=True)
class SceneConfig:
    """Knobs of the scene distribution.

    Attributes:
        p_two_objects: probability that a scene holds two objects.
        p_textured: probability of a non-plain background (textures drawn uniformly).
    """

    p_two_objects: float = 0.25
    p_textured: float = 0.5

    def __post_init__(self):
        for name in ("p_two_objects", "p_textured"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")


def _draw_object(
    rng: np.random.Generator, pool: ObjectPool, position: Position
) -> WorldObject:
    shape, colour = pool.pairs[rng.integers(len(pool.pairs))]
    size = list(Size)[rng.integers(len(Size))]
    return WorldObject(shape, colour, size, position)


def sample_scene(
    rng: np.random.Generator,
    config: SceneConfig,
    pool: ObjectPool,
    required: ObjectPool | None = None,
) -> Scene:
    """Draw one scene.

    Args:
        rng: the random stream (advanced in place).
        config: the scene distribution.
        pool: the (shape, colour) pairs objects are drawn from.
        required: if given, the first object is drawn from this pool instead, so the
            scene is guaranteed to hold one such object (used by the held-out shifts).

    Returns:
        The scene.
    """
    if rng.random() < config.p_two_objects:
        layout = TWO_OBJECT_LAYOUTS[rng.integers(len(TWO_OBJECT_LAYOUTS))]
        positions = list(layout) if rng.random() < 0.5 else list(reversed(layout))
    else:
        positions = [list(Position)[rng.integers(len(Position))]]
    pools = [required or pool] + [pool] * (len(positions) - 1)
    objects = [_draw_object(rng, p, pos) for p, pos in zip(pools, positions)]
    order = rng.permutation(len(objects))
    if rng.random() < config.p_textured:
        textures = [t for t in Texture if t is not Texture.PLAIN]
        texture = textures[rng.integers(len(textures))]
    else:
        texture = Texture.PLAIN
    seed = int(rng.integers(2**31 - 1))
    return Scene(tuple(objects[i] for i in order), texture, seed)


def sample_scenes(
    n: int,
    rng: np.random.Generator,
    config: SceneConfig,
    pool: ObjectPool,
    required: ObjectPool | None = None,
) -> list[Scene]:
    """Draw ``n`` scenes; see :func:`sample_scene`."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [sample_scene(rng, config, pool, required) for _ in range(n)]


def attribute_codes(scenes: Sequence[Scene], max_objects: int = 2) -> np.ndarray:
    """Encode scenes as integer attribute arrays for vectorised matching.

    Args:
        scenes: ``nb`` scenes.
        max_objects: object slots per scene.

    Returns:
        int array ``(nb, max_objects, 4)`` holding the index of (shape, colour, size,
        position) in its vocabulary, and ``-2`` in the slots of absent objects.
    """
    codes = np.full((len(scenes), max_objects, 4), -2, dtype=np.int64)
    index = {e: i for enum in ATTRIBUTES for i, e in enumerate(enum)}
    for row, scene in enumerate(scenes):
        if len(scene.objects) > max_objects:
            raise ValueError(
                f"scene {row} has {len(scene.objects)} objects, max_objects is {max_objects}"
            )
        for slot, obj in enumerate(scene.objects):
            attrs = (obj.shape, obj.colour, obj.size, obj.position)
            codes[row, slot] = [index[a] for a in attrs]
    return codes
