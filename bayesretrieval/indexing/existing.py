"""The index already in INDEX_DIR: lock it, open it, and check it matches the command."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Iterator

from bayesretrieval.encoders import ModelIdentity
from bayesretrieval.indexing.plan import PreviousItems
from bayesretrieval.posterior import PosteriorPair
from bayesretrieval.posterior.identity import describe_model
from bayesretrieval.store import IndexReader, VarianceSpec
from bayesretrieval.store import format as fmt

logger = logging.getLogger(__name__)


class IndexBusyError(RuntimeError):
    """Another build holds the index directory's lock."""


class IndexMismatchError(ValueError):
    """The existing index was made with another model, posterior, format or layout."""


@contextlib.contextmanager
def index_lock(index_dir: str | Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``INDEX_DIR/.lock`` (released on exit or death).

    Raises:
        IndexBusyError: if another process holds it.
    """
    index_dir = Path(index_dir)
    index_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(index_dir / fmt.LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexBusyError(f"another build is running on {index_dir} (lock {fmt.LOCK_FILE})") from None
        yield
    finally:
        os.close(fd)


def previous_items(
    index_dir: str | Path,
    model: ModelIdentity,
    posterior: PosteriorPair,
    variance: VarianceSpec,
    source_kind: str,
    rebuild: bool,
) -> PreviousItems:
    """Open the published index, if any, and check it was made the same way.

    On a rebuild the check is skipped, and the previous ids are still reused per path
    when the old index can be read at all.

    Raises:
        IndexMismatchError: naming both sides, unless ``rebuild``.
    """
    manifest_file = Path(index_dir) / fmt.MANIFEST_FILE
    if not manifest_file.is_file():
        return PreviousItems.empty()
    try:
        reader = IndexReader.open(index_dir)
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as err:
        if rebuild:
            logger.info("rebuilding %s from scratch: existing index unreadable (%s)", index_dir, err)
            return PreviousItems.empty()
        raise IndexMismatchError(f"{index_dir}: {err}; pass --rebuild to replace it") from None
    if not rebuild:
        check_compatible(reader.manifest, model, posterior, variance, source_kind)
    return PreviousItems.from_reader(reader)


def check_compatible(
    manifest: fmt.Manifest, model: ModelIdentity, posterior: PosteriorPair, variance: VarianceSpec, source_kind: str
) -> None:
    """Raise :class:`IndexMismatchError` if the index differs in anything that changes results."""
    existing_model = ModelIdentity.from_dict(manifest.model)
    problems = []
    if not existing_model.matches(model):
        problems.append(f"model: index has {describe_model(existing_model)}, command uses {describe_model(model)}")
    fingerprint = manifest.posterior.get("fingerprint")
    if fingerprint != posterior.fingerprint:
        problems.append(
            f"posterior: index has {manifest.posterior.get('source')} ({str(fingerprint)[:12]}), "
            f"command uses {posterior.source} ({posterior.fingerprint[:12]})"
        )
    if manifest.variance_spec != variance:
        problems.append(f"variance columns: index has {manifest.variance}, command asks for {variance}")
    if manifest.source_kind != source_kind:
        problems.append(f"input: index was built from {manifest.source_kind}, command gives {source_kind}")
    if problems:
        raise IndexMismatchError(
            f"existing index at version {manifest.version} does not match: " + "; ".join(problems)
            + " (pass --rebuild to replace it)"
        )
