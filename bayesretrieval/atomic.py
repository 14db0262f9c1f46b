"""Durable file writes: a crash leaves the old file or the new one, never a torn one."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, TypeVar

Result = TypeVar("Result")


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Replace ``path`` durably, so a crash leaves the old file or the new one.

    ``write`` fills a temp file in the same folder, then fsync, rename and fsync of the folder.

    Args:
        path: the file to replace.
        write: called with the temp file opened for binary writing.
    """
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(temp, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` atomically (see :func:`write_atomic`)."""
    write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


def current_umask() -> int:
    """The process umask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_path(path: Path) -> None:
    """Fsync a file or folder by path (makes a rename in a folder durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_directory(target: Path, write: Callable[[Path], Result]) -> Result:
    """Replace the folder ``target`` durably: a crash leaves the old folder or the new one.

    ``write`` fills a hidden staging folder beside ``target``; the staging tree then gets
    the umask's permissions (temp folders are created 0700), is fsync'd, and is renamed
    to ``target``. An existing ``target`` is moved aside first and deleted afterwards.

    Args:
        target: the folder to create or replace.
        write: called with the staging folder.

    Returns:
        What ``write`` returned.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        result = write(staging)
        _make_readable(staging)
        _fsync_tree(staging)
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, retired / "old")
            os.replace(staging, target)
            shutil.rmtree(retired)
        else:
            os.replace(staging, target)
        fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result


def _make_readable(root: Path) -> None:
    mask = current_umask()
    for path in [root, *root.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):
        fsync_path(path)
    fsync_path(root)
