"""A world: scenes, their images and captions, and which images are shifted.

Random streams are keyed by what they make, so worlds that should be comparable are:
the clean test world and every shifted test world with the same seed share their base
scenes (pixel shifts corrupt exactly those images; held-out shifts replace a nested
subset of them, growing with severity), and the training and test parts never share
a stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pandas as pd

from bayesretrieval.options import Part
from bayesretrieval.world.captions import caption
from bayesretrieval.world.render import render_scenes
from bayesretrieval.world.scenes import ObjectPool, Scene, SceneConfig, WorldObject, sample_scenes
from bayesretrieval.world.shifts import MAX_SEVERITY, Shift, check_severity, corrupt
from bayesretrieval.world.splits import DEFAULT_SPLIT, WorldSplit
from bayesretrieval.world.vocab import Colour, Position, Shape, Size, Texture

WORLD_VERSION = 1
"""Bump when rendering, captions or sampling change (trained models then retrain)."""
MAX_OBJECTS = 2
OBJECT_COLUMNS = ("shape", "colour", "size", "position")


_STREAMS = {"scenes": 0, "shift": 1, "batches": 2}


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *key]))


def caption_rng(scene: Scene) -> np.random.Generator:
    """The random stream that picks a scene's caption templates."""
    return _rng(scene.seed, 1)


@dataclass
class World:
    """Images with their ground truth.

    Attributes:
        scenes: ``N`` attribute records.
        images: uint8 array ``(N, H, W, 3)``.
        captions: ``N`` full captions.
        shifted: bool array ``(N,)``; ``True`` for images the shift changed.
        part: train or test.
        seed: the world's seed.
        split: what the training world holds out.
        shift: the shift family or None for a clean world.
        severity: 1-5 for a shifted world, 0 for a clean one.
    """

    scenes: list[Scene]
    images: np.ndarray
    captions: list[str]
    shifted: np.ndarray
    part: Part
    seed: int
    split: WorldSplit = field(default=DEFAULT_SPLIT)
    shift: Shift | None = None
    severity: int = 0

    def __len__(self) -> int:
        return len(self.scenes)

    def table(self) -> pd.DataFrame:
        """One row per image: ``item_id``, caption, attributes, texture, shifted flag."""
        return scenes_table(self.scenes, self.captions, self.shifted)


def make_world(
    n: int,
    seed: int = 0,
    part: Part | str = Part.TEST,
    shift: Shift | str | None = None,
    severity: int = 0,
    split: WorldSplit = DEFAULT_SPLIT,
    config: SceneConfig = SceneConfig(),
    image_size: int = 64,
) -> World:
    """Generate a world.

    Args:
        n: number of images.
        seed: the world's seed.
        part: ``"train"`` or ``"test"``; shifted worlds must be test worlds.
        shift: a :class:`Shift` family, or None for a clean world.
        severity: 1-5 with a shift, 0 without.
        split: what training holds out.
        config: the scene distribution.
        image_size: image side in pixels.

    Returns:
        The world.
    """
    part = Part(part)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if shift is None:
        if severity != 0:
            raise ValueError(f"a clean world has severity 0, got {severity}")
    else:
        shift = Shift(shift)
        severity = check_severity(severity)
        if part is not Part.TEST:
            raise ValueError(f"shifted worlds are test worlds, got part {part.value!r}")
    part_key = list(Part).index(part)
    scenes = sample_scenes(n, _rng(seed, _STREAMS["scenes"], part_key), config, split.train_pool())
    shifted = np.zeros(n, dtype=bool)
    if shift is not None and not shift.is_pixel:
        scenes, shifted = _replace_held_out(scenes, seed, shift, severity, split, config)
    images = render_scenes(scenes, image_size)
    if shift is not None and shift.is_pixel:
        shift_rng = _rng(seed, _STREAMS["shift"], list(Shift).index(shift), severity)
        images = corrupt(images, shift, severity, shift_rng)
        shifted[:] = True
    captions = [caption(s, caption_rng(s)) for s in scenes]
    return World(scenes, images, captions, shifted, part, seed, split, shift, severity)


def _replace_held_out(
    scenes: list[Scene],
    seed: int,
    shift: Shift,
    severity: int,
    split: WorldSplit,
    config: SceneConfig,
) -> tuple[list[Scene], np.ndarray]:
    pools: dict[Shift, ObjectPool] = {
        Shift.COMBINATION: split.held_out_pair_pool(),
        Shift.NOVEL_SHAPE: split.novel_shape_pool(),
    }
    n = len(scenes)
    rng = _rng(seed, _STREAMS["shift"], list(Shift).index(shift))
    order = rng.permutation(n)
    replacements = sample_scenes(n, rng, config, split.train_pool(), required=pools[shift])
    shifted = np.zeros(n, dtype=bool)
    shifted[order[: round(n * severity / MAX_SEVERITY)]] = True
    out = [replacements[i] if shifted[i] else scene for i, scene in enumerate(scenes)]
    return out, shifted


def iter_batches(
    batch_size: int,
    seed: int = 0,
    split: WorldSplit = DEFAULT_SPLIT,
    config: SceneConfig = SceneConfig(),
    image_size: int = 64,
) -> Iterator[tuple[np.ndarray, list[str]]]:
    """Endless fresh training batches drawn in memory (no two batches share a stream).

    Args:
        batch_size: images per batch.
        seed: seed of the stream; the same seed yields the same batches.
        split: what training holds out.
        config: the scene distribution.
        image_size: image side in pixels.

    Yields:
        ``(images, captions)``: uint8 ``(batch_size, H, W, 3)`` and ``batch_size``
        captions with randomly chosen templates.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = _rng(seed, _STREAMS["batches"])
    pool = split.train_pool()
    while True:
        scenes = sample_scenes(batch_size, rng, config, pool)
        yield render_scenes(scenes, image_size), [caption(s, rng) for s in scenes]


def scenes_table(scenes: list[Scene], captions: list[str], shifted: np.ndarray) -> pd.DataFrame:
    """Flatten scenes into a table: ``obj{k}_{attribute}`` columns, None for absent objects."""
    rows = []
    for item_id, (scene, text, flag) in enumerate(zip(scenes, captions, shifted)):
        row = {
            "item_id": item_id,
            "caption": text,
            "n_objects": len(scene.objects),
            "texture": scene.texture.value,
            "scene_seed": scene.seed,
            "shifted": bool(flag),
        }
        for k in range(MAX_OBJECTS):
            obj = scene.objects[k] if k < len(scene.objects) else None
            for name in OBJECT_COLUMNS:
                row[f"obj{k}_{name}"] = getattr(obj, name).value if obj else None
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.astype({"item_id": "int64", "n_objects": "int64", "scene_seed": "int64"})


def scenes_from_table(frame: pd.DataFrame) -> list[Scene]:
    """Rebuild scene records from :func:`scenes_table` output (row order kept)."""
    enums = {"shape": Shape, "colour": Colour, "size": Size, "position": Position}
    scenes = []
    for row in frame.itertuples(index=False):
        record = row._asdict()
        objects = tuple(
            WorldObject(**{name: enums[name](record[f"obj{k}_{name}"]) for name in OBJECT_COLUMNS})
            for k in range(int(record["n_objects"]))
        )
        scenes.append(Scene(objects, Texture(record["texture"]), int(record["scene_seed"])))
    return scenes
