"""Shift families that make test images harder or unfamiliar, each with a severity 1-5.

Pixel corruptions change how every image looks (severity is the intensity, as in
ImageNet-C). The two held-out families change *what* is shown: a fraction
``severity / 5`` of the test images holds an object the training world never showed,
either a held-out colour-shape pair or a held-out shape (see ``splits``).
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

from bayesretrieval.options import MAX_SEVERITY, Shift

Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]


def _noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    std = (8.0, 16.0, 28.0, 44.0, 64.0)[severity - 1]
    noisy = image.astype(np.float32) + rng.normal(0.0, std, size=image.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    radius = (0.5, 1.0, 1.5, 2.0, 3.0)[severity - 1]
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))


def _occlusion(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    n_squares, side_frac = ((1, 0.25), (2, 0.25), (2, 0.33), (3, 0.35), (4, 0.38))[severity - 1]
    height, width = image.shape[:2]
    side = max(1, round(side_frac * min(height, width)))
    out = image.copy()
    for _ in range(n_squares):
        y, x = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
        out[y : y + side, x : x + side] = rng.integers(0, 256)
    return out


def _contrast(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    keep = (0.6, 0.4, 0.25, 0.15, 0.08)[severity - 1]
    pixels = image.astype(np.float32)
    mean = pixels.mean(axis=(0, 1), keepdims=True)
    return np.clip(np.rint(mean + keep * (pixels - mean)), 0, 255).astype(np.uint8)


def _jpeg(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    quality = (30, 18, 12, 8, 5)[severity - 1]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))


CORRUPTIONS: dict[Shift, Corruption] = {
    Shift.NOISE: _noise,
    Shift.BLUR: _blur,
    Shift.OCCLUSION: _occlusion,
    Shift.CONTRAST: _contrast,
    Shift.JPEG: _jpeg,
}


def check_severity(severity: int) -> int:
    """Validate a severity level (1 to 5) and return it."""
    valid = not isinstance(severity, bool) and int(severity) == severity
    if not valid or not 1 <= severity <= MAX_SEVERITY:
        raise ValueError(f"severity must be an integer in [1, {MAX_SEVERITY}], got {severity!r}")
    return int(severity)


def corrupt(
    images: np.ndarray, shift: Shift | str, severity: int, rng: np.random.Generator
) -> np.ndarray:
    """Apply a pixel corruption to every image.

    Args:
        images: uint8 array ``(N, H, W, 3)``.
        shift: a pixel shift (``Shift.is_pixel``).
        severity: 1 (mild) to 5 (severe).
        rng: random stream for the corruption's draws (noise, occluder places).

    Returns:
        uint8 array ``(N, H, W, 3)``, a new array.
    """
    shift = Shift(shift)
    if not shift.is_pixel:
        pixel = ", ".join(s.value for s in CORRUPTIONS)
        raise ValueError(
            f"shift {shift.value!r} is not a pixel corruption; expected one of {pixel}"
        )
    severity = check_severity(severity)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"images must be uint8 (N, H, W, 3), got {images.dtype} {tuple(images.shape)}"
        )
    if not len(images):
        return images.copy()
    return np.stack([CORRUPTIONS[shift](image, severity, rng) for image in images])
