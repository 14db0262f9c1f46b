"""Real-world files: each is indexed correctly or skipped with its reason, never fatal."""

import os

import numpy as np
import pytest
from conftest import make_bad_corpus, two_tone
from PIL import Image

from bayesretrieval.indexing import decode as decode_module
from bayesretrieval.indexing.decode import ImageSkipped, decode_image
from bayesretrieval.skips import SkipReason


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
    two_tone(300, 200).save(path)
    with pytest.raises(ImageSkipped, match="300x200 pixels, limit 10000") as err:
        decode_image(path, max_pixels=10_000)
    assert err.value.reason is SkipReason.TOO_LARGE


def test_permission_denied_is_a_skip(tmp_path, monkeypatch):
    """Tests run as root, where chmod 000 still reads: simulate the EACCES from open()."""
    path = tmp_path / "locked.jpg"
    two_tone(8, 8).save(path)

    def denied(file, mode="r", *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(decode_module, "open", denied, raising=False)
    with pytest.raises(ImageSkipped) as err:
        decode_image(path)
    assert err.value.reason is SkipReason.UNREADABLE and "Permission denied" in err.value.detail


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads chmod-000 files; covered by the simulated test")
def test_chmod_000_is_unreadable(tmp_path):
    path = tmp_path / "locked.jpg"
    two_tone(8, 8).save(path)
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
