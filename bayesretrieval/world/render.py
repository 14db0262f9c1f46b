"""Draw scenes as RGB images (numpy + PIL, supersampled twice for smooth edges).

Each shape is one outline function in :data:`OUTLINES`; the renderer draws it into a
mask and pastes the object's colour through the mask, so holes (the ring) show the
background pattern.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image, ImageDraw

from bayesretrieval.world.scenes import Scene
from bayesretrieval.world.vocab import (
    COLOUR_RGB,
    POSITION_CENTRE,
    SIZE_RADIUS,
    Shape,
    Texture,
)

SUPERSAMPLE = 2
JITTER_OFFSET = 0.04
"""Largest shift of an object's centre, in units of the image side."""
JITTER_SCALE = 0.1
"""Largest relative change of an object's radius."""
JITTER_ANGLE = 15.0
"""Largest rotation of an object, in degrees."""

Outline = Callable[[ImageDraw.ImageDraw, float, float, float, float], None]


def _polygon(n: int, start_deg: float, radii: Sequence[float] = (1.0,)) -> Callable:
    def draw(canvas: ImageDraw.ImageDraw, cx: float, cy: float, r: float, angle: float):
        points = []
        for k in range(n * len(radii)):
            theta = math.radians(start_deg + angle + k * 360.0 / (n * len(radii)))
            rk = r * radii[k % len(radii)]
            points.append((cx + rk * math.cos(theta), cy - rk * math.sin(theta)))
        canvas.polygon(points, fill=255)

    return draw


def _circle(canvas: ImageDraw.ImageDraw, cx: float, cy: float, r: float, angle: float):
    canvas.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)


def _ring(canvas: ImageDraw.ImageDraw, cx: float, cy: float, r: float, angle: float):
    _circle(canvas, cx, cy, r, angle)
    inner = 0.5 * r
    canvas.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)


def _cross(canvas: ImageDraw.ImageDraw, cx: float, cy: float, r: float, angle: float):
    half = 0.33
    corners = [(1, half), (half, half), (half, 1), (-half, 1), (-half, half), (-1, half)]
    corners += [(-x, -y) for x, y in corners]
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    points = [(cx + r * (x * cos - y * sin), cy - r * (x * sin + y * cos)) for x, y in corners]
    canvas.polygon(points, fill=255)


OUTLINES: dict[Shape, Outline] = {
    Shape.CIRCLE: _circle,
    Shape.SQUARE: _polygon(4, 45.0, (1.15,)),
    Shape.TRIANGLE: _polygon(3, 90.0, (1.15,)),
    Shape.DIAMOND: _polygon(4, 90.0, (1.1,)),
    Shape.CROSS: _cross,
    Shape.STAR: _polygon(5, 90.0, (1.2, 0.5)),
    Shape.HEXAGON: _polygon(6, 0.0),
    Shape.RING: _ring,
}


def _background(texture: Texture, side: int, rng: np.random.Generator) -> np.ndarray:
    grey = int(rng.integers(70, 121))
    period = 8 * SUPERSAMPLE
    phase_y, phase_x = rng.integers(period, size=2)
    yy, xx = np.mgrid[0:side, 0:side]
    yy, xx = yy + phase_y, xx + phase_x
    patterns = {
        Texture.PLAIN: np.zeros((side, side), dtype=bool),
        Texture.STRIPED: ((xx + yy) % period) < period // 2,
        Texture.DOTTED: ((xx % period) - period / 2) ** 2 + ((yy % period) - period / 2) ** 2
        < (period / 4) ** 2,
        Texture.CHECKERED: ((xx // (period // 2)) + (yy // (period // 2))) % 2 == 0,
    }
    level = np.where(patterns[texture], grey + 30, grey).astype(np.uint8)
    return np.repeat(level[:, :, None], 3, axis=2)


def render_scene(scene: Scene, image_size: int = 64) -> np.ndarray:
    """Draw one scene.

    Args:
        scene: the attribute record; its ``seed`` fixes the jitter.
        image_size: side of the square image in pixels.

    Returns:
        uint8 array ``(image_size, image_size, 3)``.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    rng = np.random.default_rng(scene.seed)
    side = image_size * SUPERSAMPLE
    canvas = Image.fromarray(_background(scene.texture, side, rng))
    for obj in scene.objects:
        dx, dy = rng.uniform(-JITTER_OFFSET, JITTER_OFFSET, size=2)
        scale = 1.0 + rng.uniform(-JITTER_SCALE, JITTER_SCALE)
        angle = rng.uniform(-JITTER_ANGLE, JITTER_ANGLE)
        fx, fy = POSITION_CENTRE[obj.position]
        mask = Image.new("L", (side, side), 0)
        OUTLINES[obj.shape](
            ImageDraw.Draw(mask),
            (fx + dx) * side,
            (fy + dy) * side,
            SIZE_RADIUS[obj.size] * scale * side,
            angle,
        )
        canvas.paste(COLOUR_RGB[obj.colour], mask=mask)
    return np.asarray(canvas.reduce(SUPERSAMPLE))


def render_scenes(scenes: Sequence[Scene], image_size: int = 64) -> np.ndarray:
    """Draw many scenes; returns uint8 ``(N, image_size, image_size, 3)``."""
    images = np.empty((len(scenes), image_size, image_size, 3), dtype=np.uint8)
    for i, scene in enumerate(scenes):
        images[i] = render_scene(scene, image_size)
    return images


def images_to_tensor(
    images: np.ndarray,
    mean: Sequence[float] = OPENAI_DATASET_MEAN,
    std: Sequence[float] = OPENAI_DATASET_STD,
) -> torch.Tensor:
    """Turn uint8 images into a normalised float batch, as open_clip's preprocess does.

    For images already at the model's resolution this equals applying the model's eval
    transform to each image as a PIL image (resize and crop are then the identity).

    Args:
        images: uint8 array ``(N, H, W, 3)``.
        mean: per-channel mean of the normalisation.
        std: per-channel standard deviation of the normalisation.

    Returns:
        float32 tensor ``(N, 3, H, W)``.
    """
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"images must be uint8 (N, H, W, 3), got {images.dtype} {tuple(images.shape)}"
        )
    batch = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (batch - mean_t) / std_t
