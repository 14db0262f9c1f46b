"""Real-world files: each is indexed correctly or skipped with its reason, never fatal."""

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bayesretrieval.indexing import decode as decode_module
from bayesretrieval.indexing.decode import ImageSkipped, decode_image
from bayesretrieval.skips import SkipReason

RED, BLUE = (220, 20, 20), (20, 20, 220)


def _two_tone(width: int, height: int) -> Image.Image:
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


def make_bad_corpus(folder: Path) -> dict:
    """Write a folder of awkward files; return ``{path: expected}``.

    ``expected`` is a ``SkipReason`` for files that must be skipped, or a ``(width,
    height, check)`` triple for files that must be indexed, ``check(rgb_array)`` asserting
    on the decoded pixels.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "nested" / "deeper").mkdir(parents=True)
    expected = {}
    photo = _two_tone(48, 32)

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


def _assert_close(got, want, tol=8):
    assert np.all(np.abs(np.asarray(got, float) - np.asarray(want, float)) <= tol), (got, want)


def check_outcome(name: str, outcome, image_or_reason) -> None:
    """Assert one file's outcome: the skip reason, or the upright size and pixels."""
    if isinstance(outcome, SkipReason):
        assert image_or_reason == outcome, name
        return
    width, height, check = outcome
    assert isinstance(image_or_reason, Image.Image), (name, image_or_reason)
    assert image_or_reason.mode == "RGB" and image_or_reason.size == (width, height), name
    check(np.asarray(image_or_reason))


def test_every_awkward_file_decodes_or_gives_its_reason(tmp_path):
    expected = make_bad_corpus(tmp_path)
    for name, outcome in expected.items():
        try:
            result = decode_image(tmp_path / name, max_pixels=50_000_000)
        except ImageSkipped as skip:
            result = skip.reason
        check_outcome(name, outcome, result)


def test_max_pixels_is_checked_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    _two_tone(300, 200).save(path)
    with pytest.raises(ImageSkipped, match="300x200 pixels, limit 10000") as err:
        decode_image(path, max_pixels=10_000)
    assert err.value.reason is SkipReason.TOO_LARGE


def test_permission_denied_is_a_skip(tmp_path, monkeypatch):
    """Tests run as root, where chmod 000 still reads: simulate the EACCES from open()."""
    path = tmp_path / "locked.jpg"
    _two_tone(8, 8).save(path)

    def denied(file, mode="r", *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(decode_module, "open", denied, raising=False)
    with pytest.raises(ImageSkipped) as err:
        decode_image(path)
    assert err.value.reason is SkipReason.UNREADABLE and "Permission denied" in err.value.detail


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads chmod-000 files; covered by the simulated test")
def test_chmod_000_is_unreadable(tmp_path):
    path = tmp_path / "locked.jpg"
    _two_tone(8, 8).save(path)
    path.chmod(0)
    try:
        with pytest.raises(ImageSkipped) as err:
            decode_image(path)
        assert err.value.reason is SkipReason.UNREADABLE
    finally:
        path.chmod(0o644)


def test_vanished_file(tmp_path):
    with pytest.raises(ImageSkipped) as err:
        decode_image(tmp_path / "gone.jpg")
    assert err.value.reason is SkipReason.VANISHED


def test_skip_reason_values_are_stable():
    """The values are written to ``skipped.parquet`` and read back by later updates."""
    assert {reason.value for reason in SkipReason} == {
        "missing", "empty_file", "not_an_image", "truncated", "corrupt", "too_large", "unreadable",
        "broken_link", "not_a_file", "vanished", "bad_embedding", "duplicate_id", "no_caption",
    }
