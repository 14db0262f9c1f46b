"""The build-index job: walk, plan, decode + encode in resumable shards, publish a version.

Planning, assembling the new version and publishing it happen here, on the driver, for
every engine; an engine (:class:`~bayesretrieval.options.BuildEngine`) only turns the
plan's files into rows in the work shards: :func:`encode_locally` in this process, or
:func:`bayesretrieval.indexing.ray_engine.encode_with_ray` on a Ray cluster.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bayesretrieval.encoders import ClipEncoder
from bayesretrieval.indexing.assemble import concat_items, items_from_previous, items_from_results, skipped_table
from bayesretrieval.indexing.decode import DEFAULT_MAX_PIXELS
from bayesretrieval.indexing.encode import DecodeDataset, draft_size_for, encode_samples, image_loader
from bayesretrieval.indexing.existing import index_lock, previous_items
from bayesretrieval.indexing.plan import BuildPlan, PreviousItems, plan_build
from bayesretrieval.indexing.scalars import ScalarComputer
from bayesretrieval.indexing.sources import SourceFile, walk_images
from bayesretrieval.indexing.work import WorkFolder, result_schema
from bayesretrieval.options import BuildEngine, default_workers
from bayesretrieval.posterior import PosteriorPair, posterior_for_model
from bayesretrieval.posterior.identity import lastblock_for_model
from bayesretrieval.posterior.lastblock import LastBlockHead
from bayesretrieval.posterior.lastblock_posterior import LastBlockPosterior
from bayesretrieval.store import Manifest, VarianceSpec, VersionInfo, default_faiss_factory, write_version
from bayesretrieval.store.format import FORMAT_VERSION
from bayesretrieval.store.writer import empty_faiss_index


class EmptySourceError(ValueError):
    """The source folder holds no files to index."""


@dataclass
class BuildConfig:
    """Knobs of a build.

    Attributes:
        batch_size: images per encoder call.
        workers: decoding processes (``None``: :func:`default_workers`; 0: in-process).
        faiss_factory: FAISS factory string, ``None`` for a size-based default.
        variance: per-item covariance columns: ``"kfac"`` (none), ``"diag"`` or ``"lowrank:R"``.
        rebuild: re-encode everything and replace an index made with other settings.
        max_pixels: images with more pixels are skipped as ``too_large``.
        shard_batches: batches per durable shard (the work a crash can lose).
        force_posterior: use a posterior fitted for other weights, or one that does not
            say which (see :func:`~bayesretrieval.posterior.posterior_for_model`).
        allow_empty: publish an empty index when the source holds no images (by default
            that is an error: usually a wrong or unmounted folder, which would otherwise
            empty an existing index).
        store_activations: also store each image's pre-projection activation
            (``activations.npy``, ``h`` float32 per item: 3 KB for ViT-B-32), which image
            queries need to score near-duplicates right (docs/math.md section 12). Must
            match the existing index unless ``rebuild``.
        engine: where the files are decoded and encoded (:class:`BuildEngine`).
        ray_address: the Ray cluster to use with ``engine="ray"`` (``None``: the one this
            process is connected to, else a new local instance).
        ray_actors: encoder actors with ``engine="ray"`` (``None``: one per GPU of the
            cluster, or one on a cluster without GPUs).
    """

    batch_size: int = 64
    workers: int | None = None
    faiss_factory: str | None = None
    variance: VarianceSpec | str = "kfac"
    rebuild: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    shard_batches: int = 8
    force_posterior: bool = False
    allow_empty: bool = False
    store_activations: bool = False
    engine: BuildEngine | str = BuildEngine.LOCAL
    ray_address: str | None = None
    ray_actors: int | None = None

    def __post_init__(self):
        self.variance = VarianceSpec.parse(self.variance)
        self.engine = BuildEngine(self.engine)
        if self.ray_actors is not None and self.ray_actors < 1:
            raise ValueError(f"ray_actors must be at least 1, got {self.ray_actors}")
        for name in ("batch_size", "shard_batches", "max_pixels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")


@dataclass(frozen=True)
class BuildProgress:
    """Reported after every batch.

    Attributes:
        done: files of this build's work list finished (including resumed ones).
        total: files in this build's work list.
        skipped: of ``done``, how many were skipped.
    """

    done: int
    total: int
    skipped: int


@dataclass
class BuildReport:
    """What a build did.

    Attributes:
        manifest: the manifest of the index now current.
        published: whether a new version was published (``False`` when nothing changed).
        encoded: files this run decoded (and encoded, unless skipped).
        resumed: files taken from the shards of an interrupted earlier run.
        reused: unchanged items carried over from the previous version.
        removed: previous items whose files are gone.
        skipped: skipped inputs of the current index, by reason.
        seconds: wall time.
    """

    manifest: Manifest
    published: bool
    encoded: int
    resumed: int
    reused: int
    removed: int
    skipped: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def indexed(self) -> int:
        """Items in the current index."""
        return int(self.manifest.item_count)


def build_index(
    image_dir: str | Path,
    index_dir: str | Path,
    encoder: ClipEncoder,
    posterior: PosteriorPair,
    config: BuildConfig | None = None,
    on_progress: Callable[[BuildProgress], None] | None = None,
    lastblock: LastBlockPosterior | None = None,
) -> BuildReport:
    """Index the images under ``image_dir`` into ``index_dir`` (create or update).

    Unchanged files (same path, size and mtime) keep their rows and ids; new and changed
    files are encoded; deleted ones are dropped. Encoded batches go to durable shards in
    ``INDEX_DIR/work`` first, so a killed build resumes where it stopped, and the new
    version is published atomically (see :mod:`bayesretrieval.store`).

    Args:
        image_dir: folder of images (walked recursively).
        index_dir: the index directory (created if missing).
        encoder: the CLIP encoder.
        posterior: the posterior pair for the encoder's projections.
        config: build settings.
        on_progress: called after every batch.
        lastblock: a last-block posterior of the image tower (docs/math.md section 13):
            the variance columns (``config.variance`` ``diag`` or ``lowrank:R``) then hold
            each item's covariance under it; ``posterior`` still gives the text side and
            the scalars. Stored in the index and recorded in its manifest.

    Returns:
        The :class:`BuildReport`.

    Raises:
        IndexMismatchError: the existing index was made differently (unless ``rebuild``).
        IndexBusyError: another build holds the lock.
        EmptySourceError: ``image_dir`` holds no files to index (unless ``allow_empty``).
        PosteriorMismatchError: a posterior was fitted for other weights (unless forced).
        ValueError: a posterior does not fit the encoder, or ``lastblock`` comes with
            variance ``kfac``.
    """
    config = config or BuildConfig()
    started = time.perf_counter()
    image_dir, index_dir = Path(image_dir), Path(index_dir)
    posterior.check_encoder(encoder)
    posterior = posterior_for_model(posterior, encoder.identity, config.force_posterior)
    if lastblock is not None:
        lastblock.check_head(LastBlockHead(encoder, lastblock.scope))
        lastblock = lastblock_for_model(lastblock, encoder.identity, config.force_posterior)
    computer = ScalarComputer(posterior, config.variance, lastblock)
    if config.engine is BuildEngine.RAY:
        from bayesretrieval.indexing.ray_engine import check_ray_build

        check_ray_build(encoder)
    if config.faiss_factory:
        empty_faiss_index(config.faiss_factory, encoder.embed_dim)
    files, problems = walk_images(image_dir)
    if not files and not config.allow_empty:
        raise EmptySourceError(f"no image files under {image_dir}; pass --allow-empty (allow_empty=True) to "
                               "publish an empty index")
    with index_lock(index_dir):
        previous = previous_items(index_dir, encoder.identity, posterior, config.variance, "images", config.rebuild,
                                  config.store_activations, lastblock)
        plan = plan_build(files, previous, reuse_items=not config.rebuild)
        walk_skips = [{"path": p.path, "reason": p.reason, "detail": p.detail} for p in problems]
        work = WorkFolder(index_dir, _work_settings(encoder, posterior, config, lastblock))
        if not config.rebuild and _unchanged(previous, plan, walk_skips, config):
            work.clear()  # left by a build killed between publishing and cleaning up
            manifest = previous.manifest
            return BuildReport(manifest, False, 0, 0, len(plan.keep_positions), 0,
                               _count_reasons(previous.skipped), time.perf_counter() - started)
        activation_dim = posterior.image.in_features if config.store_activations else 0
        schema = result_schema(computer.embed_dim, config.variance, activation_dim)
        work.open()
        finished = _ShardResults.read(work, schema, keys_only=True)
        remaining = [f for f in plan.todo if not finished.has(f)]
        resumed = len(plan.todo) - len(remaining)
        job = EncodeJob(image_dir, remaining, encoder, computer, work, schema, config, len(plan.todo), resumed)
        ENGINES[config.engine](job, on_progress)
        items, encode_skips = _new_rows(_ShardResults.read(work, schema), plan, computer.embed_dim, config.variance,
                                        activation_dim)
        kept = items_from_previous(previous, plan.keep_positions) if len(plan.keep_positions) else None
        skip_rows = walk_skips + plan.kept_skips + encode_skips
        info = VersionInfo("images", str(image_dir.resolve()), encoder.identity.to_dict(), config.variance,
                           config.faiss_factory or _previous_factory(previous), plan.next_item_id, lastblock)
        manifest = write_version(index_dir, concat_items([p for p in (kept, items) if p is not None]),
                                 skipped_table(skip_rows), posterior, info)
        work.clear()
    return BuildReport(manifest, True, len(remaining), resumed, len(plan.keep_positions), plan.removed,
                       _count_reasons(skip_rows), time.perf_counter() - started)


def _unchanged(previous: PreviousItems, plan: BuildPlan, walk_skips: list, config: BuildConfig) -> bool:
    if previous.manifest is None or previous.damaged or plan.todo or plan.removed:
        return False
    if config.faiss_factory and config.faiss_factory != previous.manifest.faiss_factory:
        return False
    now = {(r["path"], r["reason"]) for r in walk_skips + plan.kept_skips}
    return now == {(r["path"], r["reason"]) for r in previous.skipped}


def _previous_factory(previous: PreviousItems) -> str | None:
    """Keep a factory chosen by the user across updates; a size-based default is re-chosen."""
    if previous.manifest is None:
        return None
    manifest = previous.manifest
    chosen = manifest.faiss_factory != default_faiss_factory(manifest.item_count)
    return manifest.faiss_factory if chosen else None


def _work_settings(encoder: ClipEncoder, posterior: PosteriorPair, config: BuildConfig,
                   lastblock: LastBlockPosterior | None) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "model": encoder.identity.to_dict(),
        "posterior": posterior.fingerprint,
        "lastblock": lastblock.fingerprint if lastblock else None,
        "variance": str(config.variance),
        "activations": bool(config.store_activations),
        "max_pixels": int(config.max_pixels),
        "preprocess": repr(encoder.preprocess),
    }


@dataclass
class _ShardResults:
    """The rows of the work shards, looked up by ``(path, file_size, mtime_ns)``."""

    table: pa.Table
    rows: dict

    @classmethod
    def read(cls, work: WorkFolder, schema: pa.Schema, keys_only: bool = False) -> "_ShardResults":
        table = work.read(schema, ["path", "file_size", "mtime_ns"] if keys_only else None)
        keys = zip(table.column("path").to_pylist(), table.column("file_size").to_pylist(),
                   table.column("mtime_ns").to_pylist())
        return cls(table, {key: i for i, key in enumerate(keys)})

    def has(self, source: SourceFile) -> bool:
        return _key(source) in self.rows


def _key(source: SourceFile) -> tuple:
    return source.path, source.file_size, source.mtime_ns


def _new_rows(results: _ShardResults, plan: BuildPlan, embed_dim: int, variance: VarianceSpec, activation_dim: int):
    rows = np.asarray([results.rows[_key(f)] for f in plan.todo], np.int64)
    picked = results.table.take(pa.array(rows, pa.int64()))
    ok = pc.is_null(picked.column("reason")).to_numpy(zero_copy_only=False)
    items = items_from_results(picked.filter(pa.array(ok)), plan.todo_ids[ok], embed_dim, variance, activation_dim)
    skips = picked.filter(pa.array(~ok)).select(["path", "reason", "detail", "file_size", "mtime_ns"])
    return items, skips.to_pylist()


@dataclass
class EncodeJob:
    """What an engine decodes and encodes into the work shards, and with what.

    Attributes:
        image_dir: the indexed folder.
        files: the files to decode and encode (the plan's, less those already in shards).
        encoder: the CLIP encoder (the Ray engine loads the same weights in its actors).
        computer: the posterior scalars and variance columns per item.
        work: the work folder the shards go to.
        schema: the shards' schema (:func:`~bayesretrieval.indexing.work.result_schema`).
        config: the build settings.
        total: files of the plan (for progress).
        done: of ``total``, those already in shards before the job.
    """

    image_dir: Path
    files: list
    encoder: ClipEncoder
    computer: ScalarComputer
    work: WorkFolder
    schema: pa.Schema
    config: BuildConfig
    total: int
    done: int


def encode_locally(job: EncodeJob, on_progress: Callable[[BuildProgress], None] | None) -> None:
    """Decode in loader processes and encode in this one, a shard every ``shard_batches`` batches."""
    config = job.config
    workers = default_workers() if config.workers is None else config.workers
    dataset = DecodeDataset(job.image_dir, job.files, job.encoder.preprocess, config.max_pixels,
                            draft_size_for(job.encoder))
    pending, done, skipped = [], job.done, 0
    for samples in image_loader(dataset, config.batch_size, workers if job.files else 0):
        pending.append(encode_samples(samples, job.encoder, job.computer, job.schema))
        done += len(samples)
        skipped += sum(s.pixels is None for s in samples)
        if len(pending) >= config.shard_batches:
            job.work.append(pa.concat_tables(pending))
            pending = []
        if on_progress is not None:
            on_progress(BuildProgress(done, job.total, skipped))
    if pending:
        job.work.append(pa.concat_tables(pending))


def encode_with_ray(job: EncodeJob, on_progress: Callable[[BuildProgress], None] | None) -> None:
    """:func:`bayesretrieval.indexing.ray_engine.encode_with_ray` (imports Ray only when used)."""
    from bayesretrieval.indexing import ray_engine

    ray_engine.encode_with_ray(job, on_progress)


ENGINES: dict[BuildEngine, Callable[[EncodeJob, Callable | None], None]] = {
    BuildEngine.LOCAL: encode_locally,
    BuildEngine.RAY: encode_with_ray,
}
"""Each engine's way to turn an :class:`EncodeJob` into work shards."""


def _count_reasons(rows: list) -> dict:
    return dict(sorted(Counter(r["reason"] for r in rows).items()))
