"""Durable folder publication: a crash or a failing writer leaves the old folder or the new one."""

import os
import stat

import pytest

from bayesretrieval.atomic import publish_directory


def _write_files(contents: dict):
    def write(staging):
        for name, text in contents.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_text(text)
        return sorted(contents)
    return write


def _siblings(folder):
    return sorted(p.name for p in folder.parent.iterdir())


def test_publish_creates_a_readable_folder_and_returns_what_write_returned(tmp_path):
    mask = os.umask(0o022)
    try:
        result = publish_directory(tmp_path / "out", _write_files({"a.txt": "1", "sub/b.txt": "2"}))
    finally:
        os.umask(mask)
    assert result == ["a.txt", "sub/b.txt"]
    assert (tmp_path / "out" / "sub" / "b.txt").read_text() == "2"
    for path in [tmp_path / "out", *(tmp_path / "out").rglob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path
    assert _siblings(tmp_path / "out") == ["out"]


def test_publish_replaces_an_existing_folder_whole(tmp_path):
    publish_directory(tmp_path / "out", _write_files({"old.txt": "old"}))
    publish_directory(tmp_path / "out", _write_files({"new.txt": "new"}))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["new.txt"]
    assert _siblings(tmp_path / "out") == ["out"]


def test_a_failing_writer_leaves_the_old_folder_and_no_staging(tmp_path):
    publish_directory(tmp_path / "out", _write_files({"keep.txt": "kept"}))

    def fail(staging):
        (staging / "partial.txt").write_text("torn")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        publish_directory(tmp_path / "out", fail)
    assert (tmp_path / "out" / "keep.txt").read_text() == "kept"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]
    assert _siblings(tmp_path / "out") == ["out"]
