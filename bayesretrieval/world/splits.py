"""What the training world leaves out: held-out colour-shape pairs and held-out shapes.

The split is part of the world's identity: a model trained on the training world of a
split has never seen its held-out pairs and shapes, which the ``combination`` and
``novel_shape`` test worlds then show.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bayesretrieval.world.scenes import ObjectPool
from bayesretrieval.world.vocab import Colour, Shape


@dataclass(frozen=True)
class WorldSplit:
    """The content held out of the training world.

    Attributes:
        held_out_shapes: shapes that never appear in training (the novel concept).
        held_out_pairs: (shape, colour) pairs that never appear in training, although
            the shape and the colour each appear with other partners.
    """

    held_out_shapes: tuple[Shape, ...]
    held_out_pairs: tuple[tuple[Shape, Colour], ...]

    def __post_init__(self):
        seen = {s for s, _ in self.held_out_pairs} & set(self.held_out_shapes)
        if seen:
            raise ValueError(
                f"held-out pairs must use training shapes, got held-out shape(s) "
                f"{sorted(s.value for s in seen)} in a pair"
            )
        training_shapes = [s for s in Shape if s not in self.held_out_shapes]
        if not training_shapes:
            raise ValueError(f"at least one shape must stay in training, got {len(Shape)} held out")
        for colour in Colour:
            partners = [s for s in training_shapes if (s, colour) not in self.held_out_pairs]
            if not partners:
                raise ValueError(f"colour {colour.value!r} has no training shape left")

    def train_pool(self) -> ObjectPool:
        """The pairs the training world (and the clean test world) draws from."""
        return ObjectPool(
            tuple(
                (s, c)
                for s in Shape
                for c in Colour
                if s not in self.held_out_shapes and (s, c) not in self.held_out_pairs
            )
        )

    def held_out_pair_pool(self) -> ObjectPool:
        """The held-out pairs (the ``combination`` shift)."""
        return ObjectPool(self.held_out_pairs)

    def novel_shape_pool(self) -> ObjectPool:
        """The held-out shapes with every colour (the ``novel_shape`` shift)."""
        return ObjectPool(tuple((s, c) for s in self.held_out_shapes for c in Colour))

    def to_dict(self) -> dict:
        """Return a JSON-ready dict."""
        return {
            "held_out_shapes": [s.value for s in self.held_out_shapes],
            "held_out_pairs": [[s.value, c.value] for s, c in self.held_out_pairs],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "WorldSplit":
        """Build from :meth:`to_dict` output."""
        return cls(
            tuple(Shape(s) for s in data["held_out_shapes"]),
            tuple((Shape(s), Colour(c)) for s, c in data["held_out_pairs"]),
        )


def make_split(
    seed: int = 0,
    held_out_shapes: tuple[Shape | str, ...] = (Shape.STAR,),
    n_held_out_pairs: int = 8,
) -> WorldSplit:
    """Choose held-out pairs at random, each colour at most once, shapes spread evenly.

    Args:
        seed: picks the pairs.
        held_out_shapes: shapes left out of training entirely.
        n_held_out_pairs: how many colour-shape pairs to leave out (at most one per
            colour).

    Returns:
        The split.
    """
    shapes_out = tuple(Shape(s) for s in held_out_shapes)
    if not 0 <= n_held_out_pairs <= len(Colour):
        raise ValueError(f"n_held_out_pairs must be in [0, {len(Colour)}], got {n_held_out_pairs}")
    rng = np.random.default_rng(seed)
    shapes = [s for s in Shape if s not in shapes_out]
    colours = [list(Colour)[i] for i in rng.permutation(len(Colour))]
    shapes = [shapes[i] for i in rng.permutation(len(shapes))]
    pairs = tuple((shapes[i % len(shapes)], colours[i]) for i in range(n_held_out_pairs))
    return WorldSplit(shapes_out, pairs)


DEFAULT_SPLIT = make_split()
"""The split every trained model of :mod:`bayesretrieval.training` uses."""
