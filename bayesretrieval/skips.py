"""Why an input was left out: one vocabulary for building indexes and fitting posteriors.

The values are stored: index builds write them to the ``reason`` column of
``skipped.parquet``; posterior fitting reports them in its skip counts.
"""

from __future__ import annotations

from enum import Enum


class SkipReason(str, Enum):
    """Why an input was not indexed, or an image-caption pair not used for fitting."""

    MISSING = "missing"
    """A listed image file does not exist (a path in a pairs table)."""
    EMPTY_FILE = "empty_file"
    """The file has zero bytes."""
    NOT_AN_IMAGE = "not_an_image"
    """Pillow does not recognise the content (e.g. text with a ``.jpg`` name)."""
    TRUNCATED = "truncated"
    """The image data ends early (partial download or copy)."""
    CORRUPT = "corrupt"
    """The header is valid but the pixel data cannot be decoded."""
    TOO_LARGE = "too_large"
    """More pixels than the limit (a decompression bomb or a huge scan)."""
    UNREADABLE = "unreadable"
    """The file cannot be opened (permissions, I/O error); pair reading, which does not
    tell decoding failures apart, also gives it to an image Pillow cannot decode."""
    BROKEN_LINK = "broken_link"
    """A symlink whose target does not exist."""
    NOT_A_FILE = "not_a_file"
    """An image name that is not a regular file (FIFO, device)."""
    VANISHED = "vanished"
    """The file was deleted or replaced between the walk and decoding."""
    BAD_EMBEDDING = "bad_embedding"
    """Precomputed input: wrong length or non-finite values."""
    DUPLICATE_ID = "duplicate_id"
    """Precomputed input: an id or path that appears more than once."""
    NO_CAPTION = "no_caption"
    """A pair without a caption: an empty table cell, or no ``.txt`` beside a folder image."""
