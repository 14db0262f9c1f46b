"""Shared fixtures and helpers: offline, deterministic, small.

Test modules import the helpers with ``from conftest import ...``.
"""

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from reference import random_spd

from bayesretrieval.encoders import ClipEncoder, Encoded, ModelIdentity, register_model_configs
from bayesretrieval.indexing.scalars import ScalarComputer
from bayesretrieval.options import TINY_MODEL
from bayesretrieval.posterior import KroneckerPosterior, PosteriorPair
from bayesretrieval.skips import SkipReason
from bayesretrieval.store import ItemArrays, VarianceSpec, VersionInfo, write_version
from bayesretrieval.store.format import SKIPPED_SCHEMA

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_HESSIANS = PROJECT_ROOT.parent / "shared" / "bayesvlm-hessians" / "ViT-B-32-laion2B-s34B-b79K"


@pytest.fixture(scope="session")
def bayesvlm_dir() -> Path:
    """BayesVLM's published ViT-B-32 factors from ../shared (skipped when absent)."""
    if not (SHARED_HESSIANS / "prior_precision_analytic.json").is_file():
        pytest.skip(f"BayesVLM factors not found at {SHARED_HESSIANS}")
    return SHARED_HESSIANS


def random_posterior(embed_dim: int, image_width: int, text_width: int | None = None, seed: int = 0,
                     model: ModelIdentity | None = None) -> PosteriorPair:
    """A small random Kronecker posterior pair (random SPD factors), claimed to be fitted for ``model``."""
    g = torch.Generator().manual_seed(seed)
    text_width = text_width or image_width
    image = KroneckerPosterior.from_factors(random_spd(image_width, g), random_spd(embed_dim, g), 10.0, 5.0, "image")
    text = KroneckerPosterior.from_factors(random_spd(text_width, g), random_spd(embed_dim, g), 10.0, 5.0, "text")
    return PosteriorPair(image, text, source="random-test", model=model)


def write_images(folder: Path, names, seed: int = 0) -> None:
    """Random-noise images (sizes 70-99 x 60-89, format from each name's extension) under ``folder``."""
    rng = np.random.default_rng(seed)
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        size = (70 + rng.integers(0, 30), 60 + rng.integers(0, 30))
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def save_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A fixed random bayes-tiny checkpoint, so separate processes share weights."""
    register_model_configs()
    torch.manual_seed(seed)
    torch.save(open_clip.create_model(TINY_MODEL).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A module's tiny checkpoint on disk (servers in other processes load the same weights)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="module")
def encoder(checkpoint) -> ClipEncoder:
    """The tiny model of :func:`checkpoint` (a module needing another model defines its own ``encoder``)."""
    return ClipEncoder.from_pretrained(TINY_MODEL, checkpoint)


@pytest.fixture(scope="module")
def posterior(encoder) -> PosteriorPair:
    """A random posterior for :func:`encoder`'s 64-dimensional projections, naming its weights."""
    return random_posterior(64, 64, model=encoder.identity)


RED, BLUE = (220, 20, 20), (20, 20, 220)


def two_tone(width: int, height: int) -> Image.Image:
    """Top half red, bottom half blue (so orientation is checkable)."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[: height // 2], pixels[height // 2 :] = RED, BLUE
    return Image.fromarray(pixels)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming ``width x height`` pixels with a tiny (invalid) data stream."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _assert_close(got, want, tol=8):
    assert np.all(np.abs(np.asarray(got, float) - np.asarray(want, float)) <= tol), (got, want)


def make_bad_corpus(folder: Path) -> dict:
    """Write a folder of awkward files; return ``{path: expected}``.

    ``expected`` is a ``SkipReason`` for files that must be skipped, or a ``(width,
    height, check)`` triple for files that must be indexed, ``check(rgb_array)`` asserting
    on the decoded pixels.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "nested" / "deeper").mkdir(parents=True)
    expected = {}
    photo = two_tone(48, 32)

    def put(name: str, data: bytes, outcome):
        (folder / name).write_bytes(data)
        expected[name] = outcome

    def is_two_tone(rgb):
        top, bottom = rgb[: rgb.shape[0] // 4].mean((0, 1)), rgb[-rgb.shape[0] // 4 :].mean((0, 1))
        assert top[0] > 150 and top[2] < 90 and bottom[2] > 150 and bottom[0] < 90, (top, bottom)

    put("plain.jpg", _encoded(photo, "JPEG", quality=95), (48, 32, is_two_tone))
    put("UPPER CASE.JPEG", _encoded(photo, "JPEG", quality=95), (48, 32, is_two_tone))
    put("nested/deeper/näme with spaces 日本.png", _encoded(photo, "PNG"), (48, 32, is_two_tone))
    put("zero.jpg", b"", SkipReason.EMPTY_FILE)
    full_jpeg, full_png = _encoded(photo, "JPEG"), _encoded(Image.fromarray(
        np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "PNG")
    put("truncated.jpg", full_jpeg[: len(full_jpeg) // 2], SkipReason.TRUNCATED)
    put("truncated.png", full_png[: len(full_png) // 2], SkipReason.TRUNCATED)
    put("notes.jpg", b"this is a text file, not a picture\n" * 10, SkipReason.NOT_AN_IMAGE)
    put("bomb.png", _png_header_only(60_000, 60_000), SkipReason.TOO_LARGE)
    put("cmyk.jpg", _encoded(photo.convert("CMYK"), "JPEG", quality=95), (48, 32, is_two_tone))
    ramp = (np.linspace(0, 65535, 32 * 48).reshape(32, 48)).astype(np.uint16)

    def is_ramp(rgb):
        assert rgb[0, 0, 0] < 10 and rgb[-1, -1, 0] > 245 and 100 < rgb.mean() < 155, rgb.mean()

    put("sixteen_bit.png", _encoded(Image.fromarray(ramp), "PNG"), (48, 32, is_ramp))
    put("grey.png", _encoded(photo.convert("L"), "PNG"),
        (48, 32, lambda rgb: np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])))
    palette = photo.convert("P", palette=Image.ADAPTIVE, colors=4)
    blue_index = palette.getpixel((0, 31))
    put("palette_transparent.png", _encoded(palette, "PNG", transparency=blue_index),
        (48, 32, lambda rgb: (_assert_close(rgb[-1, -1], (255, 255, 255)), _assert_close(rgb[0, 0], RED))))
    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)]
    put("animated.gif", _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0),
        (16, 16, lambda rgb: _assert_close(rgb.mean((0, 1)), RED, 12)))
    # Stored sideways (48 high, 32 wide) with EXIF orientation 6 (rotate 90 cw to display).
    exif = Image.Exif()
    exif[0x0112] = 6
    put("exif_rotated.jpg", _encoded(photo.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif),
        (48, 32, lambda rgb: is_two_tone(rgb[:, ::-1])))
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    put("alpha.png", _encoded(rgba, "PNG"), (48, 32, lambda rgb: _assert_close(rgb[0, 0], (238, 138, 138), 3)))
    (folder / "readme.txt").write_text("not an image extension: ignored")
    return expected


SEARCH_DIM, SEARCH_IMAGE_WIDTH, SEARCH_TEXT_WIDTH = 16, 8, 6
"""Shapes of :func:`clustered_index`'s posterior: embedding dim, image and text activation widths."""
SEARCH_MODEL = {"model_name": "bayes-tiny", "pretrained": None, "checkpoint_sha256": None}


def _search_posterior(seed: int = 0) -> PosteriorPair:
    """A random posterior of :data:`SEARCH_DIM` outputs."""
    g = torch.Generator().manual_seed(seed)
    image = KroneckerPosterior.from_factors(random_spd(SEARCH_IMAGE_WIDTH, g), random_spd(SEARCH_DIM, g), 10.0, 5.0,
                                            "image")
    text = KroneckerPosterior.from_factors(random_spd(SEARCH_TEXT_WIDTH, g), random_spd(SEARCH_DIM, g), 10.0, 5.0,
                                           "text")
    return PosteriorPair(image, text, source="search-test")


def clustered_index(path, n=10_000, variance="kfac", factory="Flat", seed=0, duplicates=200):
    """A written index: clustered means, per-item noise from 0.2x to 1x, exact duplicate rows."""
    rng = np.random.default_rng(seed)
    posterior = _search_posterior(seed)
    centres = rng.normal(size=(40, SEARCH_DIM))
    means = (centres[rng.integers(0, 40, n)] + 0.6 * rng.normal(size=(n, SEARCH_DIM))).astype(np.float32)
    activations = rng.normal(size=(n, SEARCH_IMAGE_WIDTH)) * rng.uniform(0.2, 1.0, (n, 1))
    means[-duplicates:], activations[-duplicates:] = means[:duplicates], activations[:duplicates]
    spec = VarianceSpec.parse(variance)
    rows = ScalarComputer(posterior, spec).from_activations(torch.from_numpy(means).double(),
                                                            torch.from_numpy(activations))
    ids = rng.permutation(np.arange(5, 5 + 3 * n, 3))[:n].astype(np.int64)
    folders = np.where(np.arange(n) % 3 == 0, "cats", "dogs")
    items = ItemArrays(ids, [f"{f}/img_{i:05d}.png" for f, i in zip(folders, ids)], np.arange(n) + 100,
                       np.full(n, 1, np.int64), (32 + np.arange(n) % 5 * 16).astype(np.int32),
                       np.full(n, 64, np.int32), means, rows.scalars, rows.variance_diag, rows.variance_lowrank)
    info = VersionInfo("images", str(path), SEARCH_MODEL, spec, factory, int(ids.max()) + 1)
    write_version(path, items, SKIPPED_SCHEMA.empty_table(), posterior, info)
    return path


def random_queries(nq=6, seed=1, modality="text"):
    """``nq`` precomputed queries (embeddings and activations) of ``modality`` for :func:`clustered_index`."""
    rng = np.random.default_rng(seed)
    width = SEARCH_TEXT_WIDTH if modality == "text" else SEARCH_IMAGE_WIDTH
    embeds = torch.from_numpy(rng.normal(size=(nq, SEARCH_DIM)) * 1.5)
    return Encoded(embeds, torch.from_numpy(rng.normal(size=(nq, width)) * 0.7))
