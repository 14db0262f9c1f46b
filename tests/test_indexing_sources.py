"""The recursive walk: extensions, relative POSIX paths, symlinks followed once."""

import os

import pytest

from bayesretrieval.indexing.sources import walk_images


def test_walk_finds_images_recursively_and_follows_links_once(tmp_path):
    root = tmp_path / "images"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "x.PNG").write_bytes(b"1")
    (root / "top one.jpg").write_bytes(b"12")
    (root / "ignored.txt").write_text("no")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "linked.webp").write_bytes(b"123")
    os.symlink(outside, root / "link_dir")
    os.symlink(root, root / "a" / "loop")  # a cycle back to the root
    os.symlink(root / "top one.jpg", root / "alias.jpg")
    os.symlink(tmp_path / "missing.jpg", root / "broken.jpg")
    files, problems = walk_images(root)
    assert [f.path for f in files] == ["a/b/x.PNG", "alias.jpg", "link_dir/linked.webp", "top one.jpg"]
    assert [f.file_size for f in files] == [1, 2, 3, 2]
    assert all(f.mtime_ns > 0 for f in files)
    assert [(p.path, p.reason) for p in problems] == [("broken.jpg", "broken_link")]


def test_walk_of_missing_folder_names_it(tmp_path):
    with pytest.raises(NotADirectoryError, match="nope"):
        walk_images(tmp_path / "nope")
