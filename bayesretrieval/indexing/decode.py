"""Robust image decoding: every file either becomes an upright RGB image or a skip reason."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from bayesretrieval.options import DEFAULT_MAX_PIXELS
from bayesretrieval.skips import SkipReason

RETRIED_REASONS = frozenset({SkipReason.UNREADABLE, SkipReason.VANISHED, SkipReason.TOO_LARGE})
"""Skips an update tries again even when the file's size and mtime did not change
(permissions and limits change without touching the file)."""


class ImageSkipped(Exception):
    """Raised by :func:`decode_image` with the reason the file cannot be indexed.

    Attributes:
        reason: a :class:`SkipReason`.
        detail: the underlying error text.
    """

    def __init__(self, reason: SkipReason, detail: str = ""):
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


def decode_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Open an image file and return it upright, in RGB, fully loaded.

    Handles greyscale, CMYK, 16-bit, palette and alpha images (alpha is composited on
    white), animated files (first frame) and EXIF orientation.

    Args:
        path: the file.
        max_pixels: refuse images with more pixels (checked from the header, before decoding).
        draft_size: if given, let JPEG decoding downscale by a power of two while staying
            at least this size on the short side (much faster for large photos).

    Returns:
        A loaded RGB image.

    Raises:
        ImageSkipped: with the :class:`SkipReason`.
    """
    try:
        handle = open(path, "rb")
    except FileNotFoundError as err:
        raise ImageSkipped(SkipReason.VANISHED, str(err)) from None
    except OSError as err:
        raise ImageSkipped(SkipReason.UNREADABLE, str(err)) from None
    with handle:
        return _decode_open_file(handle, max_pixels, draft_size)


def _decode_open_file(handle, max_pixels: int, draft_size: int | None) -> Image.Image:
    if not handle.read(1):
        raise ImageSkipped(SkipReason.EMPTY_FILE, "zero bytes")
    handle.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            image = Image.open(handle)
        except Image.DecompressionBombError as err:
            raise ImageSkipped(SkipReason.TOO_LARGE, str(err)) from None
        except UnidentifiedImageError as err:
            raise ImageSkipped(SkipReason.NOT_AN_IMAGE, str(err)) from None
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageSkipped(_damage_reason(err), str(err)) from None
        width, height = image.size
        if width * height > max_pixels:
            raise ImageSkipped(SkipReason.TOO_LARGE, f"{width}x{height} pixels, limit {max_pixels}")
        if draft_size and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        try:
            image.seek(0)
            image.load()
        except OSError as err:
            raise ImageSkipped(_damage_reason(err), str(err)) from None
        except (SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
            raise ImageSkipped(SkipReason.CORRUPT, f"{type(err).__name__}: {err}") from None
        return _to_rgb(ImageOps.exif_transpose(image))


def _damage_reason(err: Exception) -> SkipReason:
    """``truncated`` when Pillow says the data ended early, else ``corrupt``."""
    return SkipReason.TRUNCATED if "truncat" in str(err).lower() else SkipReason.CORRUPT


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any mode to 8-bit RGB: scale high bit depths, composite alpha on white."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
