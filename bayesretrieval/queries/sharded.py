"""Search several index directories (the shards of one collection) as one.

Each shard's :class:`~bayesretrieval.queries.searcher.Searcher` returns its own certified
top ``k``; the best ``k`` over every shard's top ``k`` is the top ``k`` of the union, because
an item outside its shard's top ``k`` has ``k`` better items in that shard alone. A
(query, item) score depends on the query, the item's stored row and the posterior only,
never on the rest of the collection, so with one model and one posterior the merged
results equal one index built over all the shards' items.

Usage::

    searcher = Searcher.open(["index-2023", "index-2024"])
    results = searcher.search("a dog on a beach", k=10, score="lcb")
    results[["rank", "shard", "item_id", "path", "score"]]
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from bayesretrieval.encoders import ClipEncoder
from bayesretrieval.options import AuditScore
from bayesretrieval.posterior import Modality
from bayesretrieval.queries.audit import audit_shards
from bayesretrieval.queries.calibration import ProbitCalibration
from bayesretrieval.queries.filters import ItemFilter
from bayesretrieval.queries.scorers import ScoreName
from bayesretrieval.queries.searcher import RESULT_COLUMNS, Searcher, Snapshot
from bayesretrieval.similarity import CosineEstimator, best_match_probabilities
from bayesretrieval.store import CovarianceForm, IndexReader

SHARDED_RESULT_COLUMNS = (*RESULT_COLUMNS[:4], "shard", *RESULT_COLUMNS[4:])
"""Columns of :meth:`ShardedSearcher.search`: :data:`RESULT_COLUMNS` plus ``shard``, the
position of the row's index directory in :attr:`ShardedSearcher.index_dirs` (item ids
are unique within a shard only; ``(shard, item_id)`` names an item)."""


@dataclass(frozen=True)
class ShardedSnapshot:
    """Every shard's :class:`~bayesretrieval.queries.searcher.Snapshot`, taken together.

    Read several things through one sharded snapshot and each shard answers from one
    version, as a :class:`~bayesretrieval.queries.searcher.Snapshot` does for one index.

    Attributes:
        shards: one snapshot per shard, in shard order.
    """

    shards: tuple[Snapshot, ...]

    @property
    def readers(self) -> list[IndexReader]:
        """Each shard's reader, in shard order (``readers[shard]`` holds the items of ``shard``)."""
        return [snapshot.reader for snapshot in self.shards]

    @property
    def version(self) -> list[str]:
        """Each shard's version, as sharded search results' ``attrs["version"]`` list them."""
        return [snapshot.version for snapshot in self.shards]


class ShardedSearcher:
    """Search several index directories built with one model and one posterior.

    Args:
        searchers: one searcher per shard, all with the same model, posterior, estimator
            and covariance form. The sharded searcher owns them (:meth:`close` closes them).

    Raises:
        ValueError: for no shards, or shards that differ in model, posterior, estimator or form.
    """

    def __init__(self, searchers: Sequence[Searcher]):
        self.searchers = list(searchers)
        if not self.searchers:
            raise ValueError("no index directories given")
        first = self.searchers[0]
        for other in self.searchers[1:]:
            _check_same_collection(first, other)

    @classmethod
    def open(cls, index_dirs: Sequence[str | Path], encoder: ClipEncoder | None = None, device: str = "cpu",
             in_memory: bool = False, torch_threads: int | None = None, **options) -> "ShardedSearcher":
        """Open every shard with one encoder (loaded once, from the first shard's manifest).

        Args:
            index_dirs: the shards' index directories.
            encoder: an already loaded encoder; default: the first shard's model.
            device: where to load the model.
            in_memory: load each shard's arrays into RAM (:meth:`Searcher.open`).
            torch_threads: torch's intra-op thread count for the process (:meth:`Searcher.open`).
            **options: ``estimator``, ``form``, ``logit_scale``, ``auto_refresh`` for every shard.

        Raises:
            ValueError: for no directories, a shard built with another model, or shards
                with different posteriors (naming both directories).
        """
        if not index_dirs:
            raise ValueError("no index directories given")
        searchers: list[Searcher] = []
        try:
            for index_dir in index_dirs:
                searchers.append(Searcher.open(index_dir, encoder, device, in_memory, torch_threads, **options))
                encoder = searchers[0].encoder
            return cls(searchers)
        except BaseException:
            for searcher in searchers:
                searcher.close()
            raise

    @property
    def index_dirs(self) -> list[Path]:
        """The shards' index directories, in shard order."""
        return [searcher.index_dir for searcher in self.searchers]

    @property
    def encoder(self) -> ClipEncoder | None:
        """The encoder every shard shares."""
        return self.searchers[0].encoder

    @property
    def estimator(self) -> CosineEstimator:
        """The cosine estimator every shard uses."""
        return self.searchers[0].estimator

    @property
    def form(self) -> CovarianceForm:
        """The item covariance form every shard uses."""
        return self.searchers[0].form

    def __len__(self) -> int:
        return sum(len(searcher.reader) for searcher in self.searchers)

    def snapshot(self) -> ShardedSnapshot:
        """Every shard's :meth:`Searcher.snapshot` (each refreshed first when ``auto_refresh`` and it has published)."""
        return ShardedSnapshot(tuple(searcher.snapshot() for searcher in self.searchers))

    def refresh(self) -> bool:
        """:meth:`Searcher.refresh` every shard.

        Returns:
            Whether any shard's version changed.

        Raises:
            ValueError: as :meth:`Searcher.refresh`; shards refreshed before the failing one stay refreshed.
        """
        changed = [searcher.refresh() for searcher in self.searchers]
        return any(changed)

    def close(self) -> None:
        """Release every shard's lease."""
        for searcher in self.searchers:
            searcher.close()

    def __enter__(self) -> "ShardedSearcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def search(self, queries, k: int = 10, score: ScoreName | str = ScoreName.EXPECTED, kappa: float = 1.0,
               threshold: float | None = None, where: ItemFilter | None = None, modality=None,
               **engine_options) -> pd.DataFrame:
        """Search every shard and keep each query's best ``k`` over all of them.

        The queries are encoded once. Arguments are those of :meth:`Searcher.search`
        (``engine_options``: ``nprobe``, ``candidates``, ``max_candidates``, per shard);
        ``threshold`` applies to the merged top ``k``, as on one index.

        Returns:
            One row per (query, rank), columns :data:`SHARDED_RESULT_COLUMNS`; ties go to
            the smaller ``(shard, item_id)``. ``attrs`` as :meth:`Searcher.search`, merged:
            ``exact`` and ``certified`` hold when they hold on every shard, ``candidates``
            and ``needed`` are per query sums over the shards, ``seconds`` sums each part
            and adds the ``merge``; ``version`` lists each shard's version and ``shards``
            the index directories.

        Raises:
            ValueError: for bad arguments (as :meth:`Searcher.search`), an ``item_ids``
                filter (item ids are per shard), or a probability score or threshold
                while the shards' calibrations differ.
        """
        if where is not None and where.item_ids is not None:
            raise ValueError("an item_ids filter is ambiguous across shards (ids are per shard); "
                             "filter by path or by a Parquet predicate")
        if threshold is not None and not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be a probability in [0, 1], got {threshold}")
        encoded = self.searchers[0].encode(queries, modality)
        if threshold is not None or ScoreName(score) is ScoreName.PROBABILITY:
            self._check_same_calibration(encoded.modality)
        frames = [searcher.search(encoded, k, score, kappa, None, where, **engine_options)
                  for searcher in self.searchers]
        start = time.perf_counter()
        merged = merge_shard_results(frames, k, threshold)
        merged.attrs["seconds"]["merge"] = time.perf_counter() - start
        merged.attrs["shards"] = [str(path) for path in self.index_dirs]
        return merged

    def _check_same_calibration(self, modality) -> None:
        """Raise ``ValueError`` unless every shard holds the same calibration for ``modality``."""
        if self.calibration(modality, required=True) is None:
            raise ValueError("a probability score or threshold needs a calibration; run `bayesretrieval calibrate` "
                             f"on {self.index_dirs[0]} first")

    def calibration(self, modality: Modality | str = Modality.TEXT, required: bool = False) -> ProbitCalibration | None:
        """The probit link for queries of ``modality`` when every shard stores that one, else ``None``.

        Raises:
            ValueError: when ``required`` and a shard's link was fitted for another posterior,
                estimator or form (:meth:`Searcher.calibration`), or the shards hold different
                links (one probability needs one link).
        """
        links = [searcher.calibration(modality, required=required) for searcher in self.searchers]
        stored = [link and link.to_dict() for link in links]
        differs = next((shard for shard, params in enumerate(stored) if params != stored[0]), None)
        if differs is None:
            return links[0]
        if required:
            raise ValueError(f"shard {self.index_dirs[differs]} has calibration {stored[differs]}, shard "
                             f"{self.index_dirs[0]} has {stored[0]}: a probability needs one link on every shard")
        return None

    def audit(self, k: int | None = 50, by: AuditScore | str | None = None) -> pd.DataFrame:
        """The ``k`` items the posterior is least sure of over every shard, most uncertain first.

        Returns:
            :func:`~bayesretrieval.queries.audit.audit_shards`' table (``shard`` names each
            row's index directory, ``percentile`` counts the whole collection).
        """
        return audit_shards(self.snapshot().readers, k, self.form, by)


def merge_shard_results(frames: Sequence[pd.DataFrame], k: int, threshold: float | None = None) -> pd.DataFrame:
    """Each query's best ``k`` rows over the shards' results, re-ranked.

    Args:
        frames: one :meth:`Searcher.search` result per shard, for the same queries.
        k: results per query.
        threshold: keep only merged rows whose ``probability`` is at least this.

    Returns:
        The merged rows, columns :data:`SHARDED_RESULT_COLUMNS`, ``exact`` per query
        over every shard, and the merged ``attrs`` (see :meth:`ShardedSearcher.search`).
    """
    rows = [frame.assign(shard=shard) for shard, frame in enumerate(frames) if len(frame)]
    merged = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=list(SHARDED_RESULT_COLUMNS))
    merged = merged.sort_values(["query_index", "score", "shard", "item_id"], ascending=[True, False, True, True],
                                kind="stable")
    merged = merged.groupby("query_index", sort=False).head(k).reset_index(drop=True)
    merged["rank"] = merged.groupby("query_index").cumcount() + 1
    merged["best_match_probability"] = best_match_probabilities(
        merged.query_index.to_numpy(), merged.logit_mean.to_numpy(np.float64),
        np.square(merged.logit_std.to_numpy(np.float64)))
    exact = _query_exact(frames)
    merged["exact"] = exact[merged.query_index.to_numpy(np.int64)]
    if threshold is not None:
        merged = merged[merged.probability >= threshold].reset_index(drop=True)
    merged = merged[list(SHARDED_RESULT_COLUMNS)]
    merged.attrs.update(_merged_attrs([frame.attrs for frame in frames], exact))
    return merged


def _query_exact(frames: Sequence[pd.DataFrame]) -> np.ndarray:
    """``(nq,)`` whether each query's top ``k`` is exact on every shard."""
    nq = len(frames[0].attrs["candidates"])
    exact = np.ones(nq, bool)
    for frame in frames:
        if len(frame):
            per_query = frame.groupby("query_index").exact.all()
            exact[per_query.index.to_numpy(np.int64)] &= per_query.to_numpy(bool)
    return exact


def _merged_attrs(shard_attrs: Sequence[dict], exact: np.ndarray) -> dict:
    """The shards' result ``attrs`` as one search's (see :meth:`ShardedSearcher.search`)."""
    first = shard_attrs[0]
    seconds: dict = {}
    for attrs in shard_attrs:
        for part, value in attrs["seconds"].items():
            seconds[part] = seconds.get(part, 0.0) + value
    return {
        "score": first["score"], "estimator": first["estimator"],
        "exact": bool(exact.all()), "certified": all(attrs["certified"] for attrs in shard_attrs),
        "candidates": np.sum([attrs["candidates"] for attrs in shard_attrs], axis=0).tolist(),
        "needed": np.sum([attrs["needed"] for attrs in shard_attrs], axis=0).tolist(),
        "version": [attrs["version"] for attrs in shard_attrs],
        "query_percentile": first["query_percentile"], "query_warning": first["query_warning"],
        "shared_projection": any(attrs["shared_projection"] for attrs in shard_attrs),
        "seconds": seconds,
    }


def _check_same_collection(first: Searcher, other: Searcher) -> None:
    """Raise ``ValueError`` unless ``other`` scores items exactly as ``first`` does."""
    pairs = {
        "model": (first.reader.model.to_dict(), other.reader.model.to_dict()),
        "posterior": (first.posterior_fingerprint, other.posterior_fingerprint),
        "last-block posterior": (first.reader.manifest.lastblock.get("fingerprint"),
                                 other.reader.manifest.lastblock.get("fingerprint")),
        "estimator": (first.estimator.value, other.estimator.value),
        "covariance form": (first.form.value, other.form.value),
        "embedding dim": (first.reader.embed_dim, other.reader.embed_dim),
    }
    for what, (want, got) in pairs.items():
        if want != got:
            raise ValueError(f"shard {other.index_dir} has {what} {got}, shard {first.index_dir} has {want}: "
                             "shards must share one model and posterior")
