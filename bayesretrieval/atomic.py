"""Durable file writes: a crash leaves the old file or the new one, never a torn one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Replace ``path`` durably: ``write`` fills a temp file in the same folder, then fsync,
    rename and fsync of the folder, so a crash leaves the old file or the new one.

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
    """fsync a file or folder by path (makes a rename in a folder durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
