"""Finding the images to index: a recursive walk that follows symlinks once."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".dib", ".tif", ".tiff",
     ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".jp2", ".j2k", ".avif", ".heic"}
)
"""File extensions treated as images (compared case-insensitively)."""


@dataclass(frozen=True)
class SourceFile:
    """One image file found by the walk.

    Attributes:
        path: POSIX path relative to the walked root (through symlinks as found).
        file_size: size in bytes (of the link target).
        mtime_ns: modification time in nanoseconds (of the link target).
    """

    path: str
    file_size: int
    mtime_ns: int


@dataclass(frozen=True)
class WalkProblem:
    """A file with an image extension that the walk could not stat (e.g. a broken link).

    Attributes:
        path: POSIX path relative to the root.
        reason: a :class:`~bayesretrieval.skips.SkipReason` value.
        detail: the error text.
    """

    path: str
    reason: str
    detail: str


def is_image_name(name: str) -> bool:
    """Whether a file name has one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def walk_images(root: str | Path) -> tuple[list[SourceFile], list[WalkProblem]]:
    """List the image files under ``root``, recursively, sorted by path.

    Directory symlinks are followed, but every real directory is entered once (by device
    and inode), so symlink loops end. File symlinks are listed under their own path.

    Args:
        root: the image folder.

    Returns:
        ``(files, problems)``, both sorted by path.

    Raises:
        NotADirectoryError: if ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"image folder not found or not a folder: {root}")
    files, problems, seen = [], [], set()
    stack = [(root, "")]
    while stack:
        folder, prefix = stack.pop()
        try:
            info = folder.stat()
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            problems.append(WalkProblem(prefix.rstrip("/") or ".", "unreadable", str(err)))
            continue
        for entry in entries:
            relative = prefix + entry.name
            _visit(entry, relative, stack, files, problems)
    files.sort(key=lambda f: f.path)
    problems.sort(key=lambda p: p.path)
    return files, problems


def _visit(entry: os.DirEntry, relative: str, stack: list, files: list, problems: list) -> None:
    try:
        if entry.is_dir(follow_symlinks=True):
            stack.append((Path(entry.path), relative + "/"))
            return
    except OSError:
        pass
    if not is_image_name(entry.name):
        return
    try:
        info = entry.stat(follow_symlinks=True)
    except FileNotFoundError as err:
        problems.append(WalkProblem(relative, "broken_link", str(err)))
        return
    except OSError as err:
        problems.append(WalkProblem(relative, "unreadable", str(err)))
        return
    if not entry.is_file(follow_symlinks=True):
        problems.append(WalkProblem(relative, "not_a_file", "not a regular file"))
        return
    files.append(SourceFile(relative, int(info.st_size), int(info.st_mtime_ns)))
