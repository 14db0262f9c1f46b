"""The index already in INDEX_DIR: lock it, open it, and check it matches the command."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from bayesretrieval.encoders import ModelIdentity
from bayesretrieval.indexing.plan import PreviousItems
from bayesretrieval.posterior import PosteriorPair
from bayesretrieval.posterior.identity import describe_model
from bayesretrieval.store import IndexDamagedError, IndexReader, VarianceSpec
from bayesretrieval.store import format as fmt
from bayesretrieval.store.reader import current_version, damaged_files, read_manifest

if TYPE_CHECKING:
    from bayesretrieval.posterior.lastblock_posterior import LastBlockPosterior

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
    store_activations: bool = False,
    lastblock: LastBlockPosterior | None = None,
) -> PreviousItems:
    """Open the published version, if any, check it was made the same way, and check its files.

    Every file is checked against the manifest's sha256. A damaged or incomplete version
    is repaired by the build: what its intact files hold is reused
    (:meth:`PreviousItems.salvage`) and the rest is encoded again. On a rebuild the
    compatibility check is skipped, and the previous ids are still reused per path when
    the old index can be read at all.

    Raises:
        IndexMismatchError: naming both sides, unless ``rebuild``.
    """
    try:
        published = published_version(Path(index_dir))
    except ValueError as err:
        if rebuild:
            logger.info("rebuilding %s from scratch: existing index unreadable (%s)", index_dir, err)
            return PreviousItems.empty()
        raise IndexMismatchError(f"{index_dir}: {err}; pass --rebuild to replace it") from None
    if published is None:
        return PreviousItems.empty()
    version_dir, manifest, problem = published
    if not rebuild:
        check_compatible(manifest, model, posterior, variance, source_kind, store_activations, lastblock)
    damaged = damaged_files(version_dir, manifest)
    if problem:
        damaged = {**damaged, str(Path(index_dir) / fmt.MANIFEST_FILE): problem}
    if not damaged:
        return PreviousItems.from_reader(IndexReader(version_dir))
    logger.warning("index version %s is damaged (%s); repairing it from its intact files", version_dir,
                   ", ".join(f"{name}: {why}" for name, why in damaged.items()))
    return PreviousItems.salvage(version_dir, manifest, damaged)


def published_version(index_dir: Path) -> tuple[Path, fmt.Manifest, str | None] | None:
    """The version folder ``manifest.json`` names, its manifest, and what was wrong on the way.

    When ``manifest.json`` is damaged or names a folder that is gone or damaged, the
    newest version folder whose own manifest is readable (each version folder holds a
    copy) stands in, and the problem says why (the version must be published again).

    Returns:
        ``(folder, manifest, problem)`` (``problem`` ``None`` when all is well), or ``None``
        when there is no index (no ``manifest.json``) or no version survives.

    Raises:
        ValueError: for an index of another format version.
    """
    if not (index_dir / fmt.MANIFEST_FILE).exists():
        return None
    try:
        folder = index_dir / fmt.VERSIONS_DIR / current_version(index_dir)
        return folder, read_manifest(folder / fmt.MANIFEST_FILE), None
    except (FileNotFoundError, IndexDamagedError) as err:
        problem = str(err)
    for folder in sorted((index_dir / fmt.VERSIONS_DIR).glob("v*"), reverse=True):
        try:
            return folder, read_manifest(folder / fmt.MANIFEST_FILE), problem
        except (FileNotFoundError, IndexDamagedError):
            continue
    logger.warning("no readable version under %s: building the index from scratch", index_dir)
    return None


def check_compatible(
    manifest: fmt.Manifest,
    model: ModelIdentity,
    posterior: PosteriorPair,
    variance: VarianceSpec,
    source_kind: str,
    store_activations: bool = False,
    lastblock: LastBlockPosterior | None = None,
) -> None:
    """Raise :class:`IndexMismatchError` if the index differs in anything that changes results.

    Stored activations count both ways: adding them to an index without them needs every
    item encoded again (``--rebuild``), and an update that silently dropped them would
    change what image queries return (docs/math.md section 12). ``build-index`` re-run
    without ``--[no-]store-activations`` keeps what the index records, so only an explicit
    change is a mismatch.
    """
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
    recorded = manifest.lastblock.get("fingerprint")
    if recorded != (lastblock.fingerprint if lastblock else None):
        problems.append(f"last-block posterior: index has {_describe_lastblock(manifest.lastblock or None)}, "
                        f"command uses {_describe_lastblock(lastblock and lastblock.identity())}")
    if manifest.variance_spec != variance:
        problems.append(f"variance columns: index has {manifest.variance}, command asks for {variance}")
    if manifest.has_activations != bool(store_activations):
        problems.append(f"activations: index {'stores' if manifest.has_activations else 'does not store'} them, "
                        f"command asks {'for' if store_activations else 'without'} them")
    if manifest.source_kind != source_kind:
        problems.append(f"input: index was built from {manifest.source_kind}, command gives {source_kind}")
    if problems:
        raise IndexMismatchError(
            f"existing index at version {manifest.version} does not match: " + "; ".join(problems)
            + " (pass --rebuild to replace it)"
        )


def _describe_lastblock(identity: dict | None) -> str:
    if not identity:
        return "none"
    return f"{identity['source']} ({identity['scope']}, {identity['fingerprint'][:12]})"
