"""Reader leases: a version stays on disk while a live reader has it open.

Each :class:`~bayesretrieval.store.IndexReader` opened on an index directory holds a
lease file ``INDEX_DIR/readers/<version>.<pid>.<token>.lease`` with an exclusive
``flock`` on it. The kernel drops the lock when the process dies, so a lease whose lock
can be taken is stale and is deleted. Garbage collection deletes only versions that are
neither current nor named by a live lease.

Opening and collecting are serialised by ``readers/.collect.lock``: a reader takes it
shared while it creates its lease and checks that its version still exists; the
collector takes it exclusive while it lists leases and deletes versions. So a version is
either seen as leased by the collector or seen as gone by the reader, never deleted
under a reader that believes it is pinned.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator

from bayesretrieval.store import format as fmt

logger = logging.getLogger(__name__)

READERS_DIR = "readers"
COLLECT_LOCK = ".collect.lock"
LEASE_SUFFIX = ".lease"


class VersionLease:
    """A held lease on one version of an index directory (release with :meth:`release`).

    Attributes:
        version: the version pinned.
        path: the lease file, or ``None`` where the index directory is read-only (then the
            version is not protected from collection; a warning says so).
    """

    def __init__(self, version: str, path: Path | None, fd: int | None):
        self.version, self.path, self._fd = version, path, fd

    @classmethod
    def acquire(cls, index_dir: Path, version: str) -> "VersionLease | None":
        """Pin ``version`` if its folder still exists; ``None`` when it was collected meanwhile."""
        folder = index_dir / READERS_DIR
        try:
            folder.mkdir(exist_ok=True)
            with collection_lock(index_dir, exclusive=False):
                if not (index_dir / fmt.VERSIONS_DIR / version).is_dir():
                    return None
                return cls._create(folder, version)
        except OSError as err:  # a read-only index: read it without a lease
            logger.warning("cannot pin version %s of %s (%s); a concurrent build may remove it", version,
                           index_dir, err)
            return cls(version, None, None) if (index_dir / fmt.VERSIONS_DIR / version).is_dir() else None

    @classmethod
    def _create(cls, folder: Path, version: str) -> "VersionLease":
        path = folder / f"{version}.{os.getpid()}.{secrets.token_hex(4)}{LEASE_SUFFIX}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, json.dumps({"version": version, "pid": os.getpid()}).encode())
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        return cls(version, path, fd)

    def release(self) -> None:
        """Delete the lease file and drop its lock (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)


@contextlib.contextmanager
def collection_lock(index_dir: Path, exclusive: bool) -> Iterator[None]:
    """Hold ``readers/.collect.lock`` (blocking): shared to pin a version, exclusive to collect."""
    fd = os.open(Path(index_dir) / READERS_DIR / COLLECT_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def live_versions(index_dir: Path) -> set[str]:
    """Versions named by live leases; stale lease files are deleted (call under the exclusive lock)."""
    folder = Path(index_dir) / READERS_DIR
    pinned = set()
    for path in folder.glob(f"*{LEASE_SUFFIX}") if folder.is_dir() else ():
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue  # released meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pinned.add(path.name.split(".", 1)[0])
        else:
            path.unlink(missing_ok=True)  # its holder died without releasing it
        finally:
            os.close(fd)
    return pinned


def collect_garbage(index_dir: str | Path, current: str) -> list[str]:
    """Delete every version folder (and leftover staging folder) that is not current or leased.

    Returns:
        The names deleted.
    """
    index_dir = Path(index_dir)
    versions = index_dir / fmt.VERSIONS_DIR
    if not versions.is_dir():
        return []
    (index_dir / READERS_DIR).mkdir(exist_ok=True)
    with collection_lock(index_dir, exclusive=True):
        keep = live_versions(index_dir) | {current}
        deleted = [entry.name for entry in versions.iterdir() if entry.name not in keep]
        for name in deleted:
            shutil.rmtree(versions / name, ignore_errors=True)
    return deleted
