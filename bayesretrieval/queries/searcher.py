"""The query engine: open an index directory, encode queries, search, calibrate.

Usage::

    searcher = Searcher.open("my_index")
    results = searcher.search(["a red circle", "a blue square"], k=10, score="lcb", kappa=1.0)
    results[["query", "rank", "path", "score", "cosine_mean", "cosine_std"]]
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from bayesretrieval.encoders import ClipEncoder, Encoded
from bayesretrieval.posterior import Modality, PosteriorPair, posterior_for_model
from bayesretrieval.queries.calibration import ProbitCalibration, load_calibration, save_calibration
from bayesretrieval.queries.candidates import DEFAULT_MAX_CANDIDATES, CandidateSearch, SearchOutcome
from bayesretrieval.queries.filters import ItemFilter, id_selector
from bayesretrieval.queries.scorers import ScoreName, make_scorer
from bayesretrieval.queries.shared import rescore_shared, shared_pool_size, uses_shared_projection
from bayesretrieval.queries.uncertainty import ModelCovariances, PairMoments, QuerySide
from bayesretrieval.similarity import DEFAULT_ESTIMATOR, CosineEstimator, best_match_probabilities
from bayesretrieval.store import CovarianceForm, IndexReader
from bayesretrieval.store.format import MANIFEST_FILE

if TYPE_CHECKING:
    from bayesretrieval.queries.sharded import ShardedSearcher

logger = logging.getLogger(__name__)

REFRESH_RETRY_S = 1.0
"""With ``auto_refresh``, how long a searcher waits before it retries a publication it failed to open."""
DEFAULT_WARNING_PERCENTILE = 99.0
"""Queries more uncertain than this percentile of the posterior's fitting inputs get a warning."""

RESULT_COLUMNS = ("query", "query_index", "rank", "item_id", "path", "score", "cosine_mean", "cosine_std",
                  "cosine_std_query", "cosine_std_item", "logit_mean", "logit_std", "probability",
                  "best_match_probability", "exact")
"""Columns of :meth:`Searcher.search`'s DataFrame (``probability`` is NaN without a calibration;
``best_match_probability`` is the probit softmax over the query's ``k`` results)."""


@dataclass
class Queries:
    """Encoded queries of one modality.

    Attributes:
        labels: ``nq`` labels for the result table (the texts, or ``"#i"``).
        means: ``(nq, D)`` unnormalised means.
        scales: ``(nq,)`` ``q_y``.
        modality: text or image.
        activations: ``(nq, h)`` float64 pre-projection activations (image queries use
            them with the index's stored ones, docs/math.md section 12), or ``None``.
        posterior_fingerprint: the fingerprint of the posterior ``scales`` came from, so
            queries encoded once can be searched on another index with the same posterior
            (:class:`~bayesretrieval.queries.sharded.ShardedSearcher`).
    """

    labels: list
    means: torch.Tensor
    scales: torch.Tensor
    modality: Modality
    activations: torch.Tensor | None = None
    posterior_fingerprint: str | None = None


@dataclass
class Snapshot:
    """One published version as a searcher uses it: its reader, posterior and search engines.

    A search takes the searcher's snapshot once and uses it throughout, so a concurrent
    :meth:`Searcher.refresh` never mixes two versions in one result.

    Attributes:
        reader: the open (leased) version.
        posterior: its posterior.
        engines: candidate searches per query modality, built on first use.
    """

    reader: IndexReader
    posterior: PosteriorPair
    engines: dict = field(default_factory=dict)

    @property
    def readers(self) -> list[IndexReader]:
        """The readers in shard order: the one reader, as shard 0.

        A :class:`~bayesretrieval.queries.sharded.ShardedSnapshot` has one per index
        directory, so callers read both alike.
        """
        return [self.reader]

    @property
    def version(self) -> str:
        """The version's name, as search results' ``attrs["version"]`` give it."""
        return self.reader.manifest.version


class Searcher:
    """Search one index directory with a CLIP encoder and the index's posterior.

    A searcher sees one published version, a consistent snapshot, however many builds
    publish meanwhile (its version stays on disk while it is open). :meth:`refresh`, or
    ``auto_refresh=True``, moves it to the newest version between searches.

    Args:
        reader: the opened index.
        encoder: the encoder the index was built with (``None``: only precomputed queries).
        index_dir: the index directory (where calibrations are stored).
        estimator: the cosine estimator (default ``second_order``).
        form: item covariance form; default: the richest the index holds.
        logit_scale: ``s``; default the encoder's (100 without an encoder).
        auto_refresh: before each search, check ``manifest.json`` (one ``stat``) and
            :meth:`refresh` when a build has published since (one thread refreshes, the
            others wait for it; a version that cannot be opened is logged, the searcher
            stays on its own, and tries again after :data:`REFRESH_RETRY_S`).
        query_warning_percentile: warn about a query whose embedding's relative variance
            is above this percentile of the posterior's fitting inputs of its modality
            (:func:`query_uncertainty`).
    """

    def __init__(self, reader: IndexReader, encoder: ClipEncoder | None = None, index_dir: str | Path | None = None,
                 estimator: CosineEstimator | str = DEFAULT_ESTIMATOR, form: CovarianceForm | str | None = None,
                 logit_scale: float | None = None, auto_refresh: bool = False,
                 query_warning_percentile: float = DEFAULT_WARNING_PERCENTILE):
        self.encoder = encoder
        self.index_dir = Path(index_dir) if index_dir is not None else reader.version_dir.parent.parent
        self.estimator = CosineEstimator(estimator)
        self.form = CovarianceForm(form) if form is not None else reader.manifest.variance_spec.form
        reader.extremes(self.form)  # raises for a form whose variance columns the index lacks
        self.logit_scale = float(logit_scale if logit_scale is not None
                                 else (encoder.logit_scale if encoder else 100.0))
        self.auto_refresh = auto_refresh
        if not 0 < query_warning_percentile <= 100:
            raise ValueError(f"query_warning_percentile must be in (0, 100], got {query_warning_percentile}")
        self.query_warning_percentile = float(query_warning_percentile)
        self._manifest_stamp = _manifest_stamp(self.index_dir)
        self._refresh_lock = threading.Lock()
        self._failed_refresh: tuple | None = None  # (manifest stamp, monotonic time) of the last failed refresh
        self._snapshot = Snapshot(reader, reader.posterior)

    @property
    def reader(self) -> IndexReader:
        """The version this searcher currently searches."""
        return self._snapshot.reader

    @property
    def posterior(self) -> PosteriorPair:
        """The posterior of the current version."""
        return self._snapshot.posterior

    @property
    def posterior_fingerprint(self) -> str | None:
        """The manifest's fingerprint of the current version's posterior."""
        return self.reader.manifest.posterior.get("fingerprint")

    @classmethod
    def open(cls, index_dir: str | Path | Sequence[str | Path], encoder: ClipEncoder | None = None,
             device: str = "cpu", in_memory: bool = False, torch_threads: int | None = None,
             **options) -> "Searcher | ShardedSearcher":
        """Open ``INDEX_DIR``: its manifest, posterior, FAISS index and encoder.

        Args:
            index_dir: the index directory, or a list of them: the shards of one collection,
                searched together by a :class:`~bayesretrieval.queries.sharded.ShardedSearcher`.
            encoder: an already loaded encoder (checked against the manifest); default:
                load the manifest's model.
            device: where to load the model.
            in_memory: load the stored arrays into RAM instead of memory-mapping them
                (``N * D * 4`` bytes of means; faster first searches, for users who have
                the memory).
            torch_threads: set torch's intra-op thread count for the whole process
                (``torch.set_num_threads``). The rerank's tensor products are small, and
                on a machine with few cores torch's threads contend with FAISS's OpenMP
                threads; 1 is fastest for search-only processes there. ``None`` leaves
                torch's setting alone (it is process-global: the library never changes
                it on its own).
            **options: ``estimator``, ``form``, ``logit_scale``, ``auto_refresh`` (see
                :class:`Searcher`).

        Raises:
            FileNotFoundError: if there is no index at ``index_dir``.
            ValueError: if the model or posterior does not match the manifest, or the stored
                posterior names other weights than the encoder's
                (:class:`~bayesretrieval.posterior.PosteriorMismatchError`).
        """
        if isinstance(index_dir, (list, tuple)):
            from bayesretrieval.queries.sharded import ShardedSearcher

            return ShardedSearcher.open(index_dir, encoder, device, in_memory, torch_threads, **options)
        if torch_threads is not None:
            if torch_threads < 1:
                raise ValueError(f"torch_threads must be at least 1, got {torch_threads}")
            torch.set_num_threads(int(torch_threads))
        reader = IndexReader.open(index_dir, mmap=not in_memory)
        try:
            if encoder is None:
                identity = reader.model
                encoder = ClipEncoder.from_pretrained(identity.model_name, identity.pretrained, device=device)
            _check_version(reader, encoder)
        except BaseException:
            reader.close()
            raise
        return cls(reader, encoder, index_dir, **options)

    def refresh(self) -> bool:
        """Move to the newest published version of the index directory.

        Searches already running finish on the version they started with; its lease is
        released once no search uses it. On any error the searcher keeps its version.

        Returns:
            Whether the version changed.

        Raises:
            ValueError: if the new version was built with another model, or lacks the
                covariance form this searcher uses.
        """
        stamp = _manifest_stamp(self.index_dir)
        reader = IndexReader.open(self.index_dir, mmap=self.reader.mmap)
        if reader.manifest.version == self.reader.manifest.version:
            reader.close()
            self._manifest_stamp = stamp
            return False
        try:
            if self.encoder is not None:
                _check_version(reader, self.encoder)
            reader.extremes(self.form)
            snapshot = Snapshot(reader, reader.posterior)
        except BaseException:
            reader.close()
            raise
        self._snapshot, self._manifest_stamp = snapshot, stamp
        return True

    def close(self) -> None:
        """Release the current version's lease (the searcher must not be used afterwards)."""
        self.reader.close()

    def __enter__(self) -> "Searcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def snapshot(self) -> Snapshot:
        """The version a search started now would use (refreshed first when ``auto_refresh`` and a build has published).

        Hold the returned snapshot to read several things from one version, as a search does.
        """
        if self.auto_refresh and _manifest_stamp(self.index_dir) != self._manifest_stamp:
            self._refresh_in_turn()
        return self._snapshot

    def _refresh_in_turn(self) -> None:
        """:meth:`refresh` for ``auto_refresh``: one thread at a time, errors logged, not raised.

        Threads that arrive during a refresh wait for it and then use its version. A
        version that cannot be opened (another model, a damaged file) leaves the searcher
        on its version, and is tried again after :data:`REFRESH_RETRY_S`.
        """
        with self._refresh_lock:
            stamp = _manifest_stamp(self.index_dir)
            failed = self._failed_refresh
            if stamp == self._manifest_stamp or (failed is not None and failed[0] == stamp
                                                 and time.monotonic() - failed[1] < REFRESH_RETRY_S):
                return
            try:
                self.refresh()
                self._failed_refresh = None
            except (OSError, ValueError) as err:
                if failed is None or failed[0] != stamp:
                    logger.warning("staying on index version %s: the newly published one cannot be opened (%s)",
                                   self.reader.manifest.version, err)
                self._failed_refresh = (stamp, time.monotonic())

    def engine(self, modality: Modality | str, snapshot: Snapshot | None = None) -> CandidateSearch:
        """The candidate search for queries of ``modality`` on ``snapshot`` (default: current; built once)."""
        snapshot = snapshot or self._snapshot
        modality = Modality(modality)
        if modality not in snapshot.engines:
            covs = ModelCovariances.from_posterior(snapshot.posterior, modality, self.estimator)
            snapshot.engines[modality] = CandidateSearch(snapshot.reader, covs, self.form, self.estimator)
        return snapshot.engines[modality]

    def encode(self, queries, modality: Modality | str | None = None, snapshot: Snapshot | None = None) -> Queries:
        """Encode texts or images, or take precomputed embeddings, as queries.

        Images are PIL images or a preprocessed ``(nq, 3, H, W)`` tensor; precomputed ones are
        :class:`~bayesretrieval.encoders.Encoded` (``modality`` says which tower). The query
        scales come from ``snapshot``'s posterior (default: the current version's).
        :class:`Queries` encoded by a searcher with the same posterior pass through as they are.

        Raises:
            ValueError: for no queries, an empty text, queries that need a model when
                the searcher has none, or :class:`Queries` encoded with another posterior.
        """
        snapshot = snapshot or self._snapshot
        if isinstance(queries, Queries):
            return _check_encoded(queries, snapshot)
        if isinstance(queries, Encoded):
            modality = Modality(modality or Modality.TEXT)
            labels = [f"#{i}" for i in range(len(queries.embeds))]
            return self._from_encoded(queries, modality, labels, snapshot)
        if isinstance(queries, (str, Image.Image)):
            queries = [queries]
        if not isinstance(queries, torch.Tensor):
            queries = list(queries)
        if len(queries) == 0:
            raise ValueError("no queries given")
        if self.encoder is None:
            raise ValueError("this searcher has no encoder; pass precomputed Encoded queries")
        if isinstance(queries, torch.Tensor):
            labels = [f"image #{i}" for i in range(len(queries))]
            return self._from_encoded(self.encoder.encode_images(queries), Modality.IMAGE, labels, snapshot)
        if all(isinstance(q, str) for q in queries):
            empty = [i for i, q in enumerate(queries) if not q.strip()]
            if empty:
                raise ValueError(f"query {empty[0]} is empty; every query needs some text")
            return self._from_encoded(self.encoder.encode_texts(queries), Modality.TEXT, queries, snapshot)
        pixels = torch.stack([self.encoder.preprocess(image) for image in queries])
        labels = [getattr(image, "filename", "") or f"image #{i}" for i, image in enumerate(queries)]
        return self._from_encoded(self.encoder.encode_images(pixels), Modality.IMAGE, labels, snapshot)

    @staticmethod
    def _from_encoded(encoded: Encoded, modality: Modality, labels: list, snapshot: Snapshot) -> Queries:
        posterior = snapshot.posterior.image if modality is Modality.IMAGE else snapshot.posterior.text
        if encoded.embeds.ndim != 2 or encoded.embeds.shape[1] != snapshot.reader.embed_dim:
            raise ValueError(f"query embeddings have shape {tuple(encoded.embeds.shape)}, "
                             f"index has dim {snapshot.reader.embed_dim}")
        if len(encoded.embeds) == 0:
            raise ValueError("no queries given")
        return Queries(labels, encoded.embeds.to(torch.float64), posterior.activation_scale(encoded.activations),
                       modality, encoded.activations.detach().to(torch.float64),
                       snapshot.reader.manifest.posterior.get("fingerprint"))

    def search(self, queries, k: int = 10, score: ScoreName | str = ScoreName.EXPECTED, kappa: float = 1.0,
               threshold: float | None = None, where: ItemFilter | None = None, modality: Modality | str | None = None,
               nprobe: int | None = None, candidates: int | None = None,
               max_candidates: int = DEFAULT_MAX_CANDIDATES) -> pd.DataFrame:
        """Search for one or many queries.

        Args:
            queries: a text, a list of texts, a PIL image or a list of them, a preprocessed image
                tensor ``(nq, 3, H, W)``, precomputed :class:`Encoded` queries, or
                :class:`Queries` from :meth:`encode`.
            k: results per query (``>= 1``); more than the collection returns all of it.
            score: ``expected``, ``lcb``, ``ucb``, ``probability`` or ``map``.
            kappa: multiplier of the std for ``lcb`` / ``ucb``.
            threshold: keep only results whose calibrated match probability is at least
                this (needs a calibration).
            where: restrict the search to a subset.
            modality: the modality of precomputed ``Encoded`` queries (default text).
            nprobe: IVF lists to probe.
            candidates: first-round candidate count.
            max_candidates: give up certifying beyond this many candidates.

        Returns:
            One row per (query, rank), columns :data:`RESULT_COLUMNS`. ``cosine_std`` splits
            by where the noise comes from (docs/math.md section 7): ``cosine_std_query`` is
            the std the query's noise alone contributes, ``cosine_std_item`` the item's, and
            the joint part is the remainder ``cosine_std^2 - cosine_std_query^2 -
            cosine_std_item^2`` (``>= 0`` up to rounding, 0 for ``delta``).
            ``best_match_probability`` is the chance the row is the query's match among its
            ``k`` results (:func:`~bayesretrieval.similarity.best_match_probabilities`, at
            the model's logit scale; computed before ``threshold`` drops rows).

            Image queries on an index that stores activations (``build-index
            --store-activations``; ``kfac`` form, ``second_order`` estimator) account for
            the projection both images share (docs/math.md section 12): the engine's
            best ``max(4 k, k + 32)`` candidates by the independent score are rescored
            with :func:`~bayesretrieval.similarity.shared_projection_cosine_moments`
            (:mod:`bayesretrieval.queries.shared`), so an indexed image searched for
            itself gets ``cosine_mean`` 1 and ``cosine_std`` 0. Their variance does not
            split into a query and an item part under correlation: ``cosine_std_query``
            and ``cosine_std_item`` are NaN; ``exact`` is False (the certificate bounds
            the independent scores) and ``attrs["shared_projection"]`` is True.

            ``attrs`` holds
            ``score``, ``exact`` (every query equals a brute-force rerank), ``certified``
            (every query's certificate held relative to what FAISS can return; differs
            from ``exact`` for IVF with fewer probes than lists), ``candidates`` (per
            query, the FAISS candidates its last round used), ``needed`` (per query, the
            fewest that certify it), ``version`` (the index version that answered),
            ``query_percentile`` and ``query_warning`` (per query, see
            :func:`query_uncertainty`), ``shared_projection`` (whether the two images'
            shared projection was accounted for, above), ``estimator`` and ``seconds``: where the time went
            (``queries``: encoding, query-side products and filter selection; ``faiss``;
            ``rerank``; ``table``).

        Raises:
            ValueError: for bad arguments (empty query, ``k <= 0``, unknown score, ...).
        """
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k <= 0:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if threshold is not None and not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be a probability in [0, 1], got {threshold}")
        start = time.perf_counter()
        snapshot = self.snapshot()
        encoded = self.encode(queries, modality, snapshot)
        warnings = query_uncertainty(encoded, snapshot.posterior, self.query_warning_percentile)
        wants_probability = threshold is not None or getattr(score, "value", score) == ScoreName.PROBABILITY.value
        calibration = self.calibration(encoded.modality, required=wants_probability, snapshot=snapshot)
        scorer = make_scorer(score, kappa, calibration)
        if threshold is not None and calibration is None:
            raise ValueError("threshold needs a calibration; run `bayesretrieval calibrate` on the index first")
        engine = self.engine(encoded.modality, snapshot)
        query = QuerySide.build(encoded.means, encoded.scales, engine.covs)
        selector, k_eff = None, min(int(k), len(snapshot.reader))
        if where is not None and not where.is_empty:
            allowed = where.select(snapshot.reader)
            selector, k_eff = id_selector(allowed), min(int(k), len(allowed))
        if k_eff == 0:
            nothing = SearchOutcome.empty(len(encoded.labels), 0)  # no eligible item: trivially exact
            nothing.certified[:] = nothing.exact[:] = True
            return _with_attrs(pd.DataFrame(columns=list(RESULT_COLUMNS)), score, nothing, self.estimator, {},
                               snapshot.reader.manifest.version, warnings)
        shared = uses_shared_projection(encoded.modality, encoded.activations, snapshot.reader, self.form,
                                        self.estimator)
        eligible = len(snapshot.reader) if selector is None else len(allowed)
        pool = min(shared_pool_size(k_eff), eligible) if shared else k_eff
        prepared = time.perf_counter()
        outcome = engine.search(query, scorer, pool, selector, nprobe, candidates, max_candidates)
        if shared:
            outcome = rescore_shared(outcome, snapshot.reader, snapshot.posterior.image, encoded.means,
                                     encoded.activations, scorer, k_eff)
        searched = time.perf_counter()
        frame = self._table(encoded, outcome, calibration, threshold, snapshot.reader)
        seconds = {"queries": prepared - start, **outcome.seconds, "table": time.perf_counter() - searched}
        return _with_attrs(frame, score, outcome, self.estimator, seconds, snapshot.reader.manifest.version, warnings,
                           shared)

    def _table(self, encoded: Queries, outcome: SearchOutcome, calibration, threshold,
               reader: IndexReader) -> pd.DataFrame:
        """The result rows, built column-wise."""
        qi, rank = np.nonzero(outcome.item_ids >= 0)
        pick = lambda a: a[qi, rank]  # noqa: E731
        mean, std = pick(outcome.mean), np.sqrt(pick(outcome.var))
        std_query, std_item = (np.sqrt(np.maximum(pick(part), 0.0)) for part in (outcome.var_query, outcome.var_item))
        probability = (calibration.probability(mean, pick(outcome.var)) if calibration is not None
                       else np.full(mean.shape, np.nan))
        ids = pick(outcome.item_ids)
        frame = pd.DataFrame({
            "query": np.asarray(encoded.labels, dtype=object)[qi], "query_index": qi, "rank": rank + 1,
            "item_id": ids, "path": reader.paths(ids), "score": pick(outcome.scores),
            "cosine_mean": mean, "cosine_std": std, "cosine_std_query": std_query, "cosine_std_item": std_item,
            "logit_mean": self.logit_scale * mean,
            "logit_std": self.logit_scale * std, "probability": probability,
            "best_match_probability": best_match_probabilities(qi, self.logit_scale * mean,
                                                               self.logit_scale**2 * pick(outcome.var)),
            "exact": outcome.exact[qi],
        })  # in RESULT_COLUMNS order: selecting them again costs a third of the table's time
        if threshold is not None:
            frame = frame[frame.probability >= threshold].reset_index(drop=True)
        return frame

    def calibration(self, modality: Modality | str = Modality.TEXT, required: bool = False,
                    snapshot: Snapshot | None = None) -> ProbitCalibration | None:
        """The stored probit link for queries of ``modality``, or ``None``.

        The link must have been fitted for ``snapshot``'s posterior (default: the current version's).

        Raises:
            ValueError: when ``required`` and the stored link was fitted for another
                posterior, estimator or covariance form.
        """
        try:
            return load_calibration(self.index_dir, Modality(modality).value, self._calibration_tags(snapshot))
        except ValueError:
            if required:
                raise
            return None

    def _calibration_tags(self, snapshot: Snapshot | None = None) -> dict:
        fingerprint = (snapshot or self._snapshot).reader.manifest.posterior.get("fingerprint")
        return {"posterior_fingerprint": fingerprint, "estimator": self.estimator.value, "form": self.form.value}

    def pair_moments(self, queries, item_ids: Sequence[int], modality: Modality | str | None = None) -> PairMoments:
        """Moments of given (query, item) pairs: ``queries[i]`` with ``item_ids[i]``.

        Repeated query texts are encoded once.

        Returns:
            :class:`PairMoments` with arrays of shape ``(n,)``.

        Raises:
            ValueError: if the counts differ or an item id is not in the index.
        """
        rows = None
        if isinstance(queries, (list, tuple)) and queries and all(isinstance(q, str) for q in queries):
            queries, rows = np.unique(np.asarray(queries, dtype=object).astype(str), return_inverse=True)
            queries = queries.tolist()
        snapshot = self.snapshot()
        encoded = self.encode(queries, modality, snapshot)
        ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        rows = np.arange(len(encoded.labels)) if rows is None else rows.reshape(-1)
        if len(ids) != len(rows):
            raise ValueError(f"{len(rows)} queries but {len(ids)} item ids")
        engine = self.engine(encoded.modality, snapshot)
        query = QuerySide.build(encoded.means, encoded.scales, engine.covs)
        return engine.pair_moments(query, rows, ids)

    def audit(self, k: int | None = 50, by: str | None = None) -> pd.DataFrame:
        """The ``k`` items the posterior is least sure of, most uncertain first (:func:`.audit.audit_index`)."""
        from bayesretrieval.queries.audit import audit_index

        return audit_index(self.snapshot().reader, k, self.form, by)

    def calibrate(self, queries, item_ids: Sequence[int], labels, modality: Modality | str | None = None,
                  save: bool = True) -> ProbitCalibration:
        """Fit the probit link on labelled pairs and (by default) store it in the index directory.

        Args:
            queries: ``n`` queries (anything :meth:`encode` takes), one per pair.
            item_ids: ``n`` item ids.
            labels: ``n`` 0/1 match labels.
            modality: modality of precomputed queries.
            save: write ``INDEX_DIR/calibration.json``.

        Returns:
            The fitted link.
        """
        moments = self.pair_moments(queries, item_ids, modality)
        link = ProbitCalibration().fit(moments.mean, moments.var, labels)
        if save:
            encoded_modality = Modality(modality or (Modality.IMAGE if _is_images(queries) else Modality.TEXT))
            tags = {**self._calibration_tags(), "pairs": int(moments.mean.numel()),
                    "positives": int(np.sum(np.asarray(labels, dtype=bool)))}
            save_calibration(self.index_dir, encoded_modality.value, link, tags)
        return link


def _check_encoded(queries: Queries, snapshot: Snapshot) -> Queries:
    """``queries`` if they were encoded with ``snapshot``'s posterior and fit its dimension.

    Raises:
        ValueError: naming the two fingerprints or the two dimensions.
    """
    fingerprint = snapshot.reader.manifest.posterior.get("fingerprint")
    if queries.posterior_fingerprint != fingerprint:
        raise ValueError(f"queries were encoded with posterior {str(queries.posterior_fingerprint)[:12]}, "
                         f"index {snapshot.reader.version_dir} has posterior {str(fingerprint)[:12]}")
    if queries.means.shape[1] != snapshot.reader.embed_dim:
        raise ValueError(f"queries have dim {queries.means.shape[1]}, index has dim {snapshot.reader.embed_dim}")
    return queries


def _is_images(queries) -> bool:
    """Whether ``queries`` are images (a pixel tensor or a list of PIL images), not texts or embeddings."""
    if isinstance(queries, torch.Tensor):
        return True
    return isinstance(queries, (list, tuple)) and bool(queries) and not isinstance(queries[0], str)


def query_uncertainty(queries: Queries, posterior: PosteriorPair,
                      percentile: float = DEFAULT_WARNING_PERCENTILE) -> dict:
    """How unusual each query's uncertainty is, against the posterior's fitting inputs.

    A query's relative variance ``q tr(Sigma) / |mu|^2`` is placed among the percentiles
    of the same quantity over the pairs the posterior was fitted on
    (:attr:`PosteriorPair.reference`); above ``percentile`` the query gets a warning: the
    model has seen few inputs like it (an unseen word, an unusual image), so its scores
    deserve less trust.

    Returns:
        ``query_percentile``: per query, its percentile (NaN without a reference), and
        ``query_warning``: per query, a sentence or ``None``.
    """
    side = posterior.image if queries.modality is Modality.IMAGE else posterior.text
    reference = (posterior.reference or {}).get(queries.modality.value)
    if reference is None:
        return {"query_percentile": [float("nan")] * len(queries.labels), "query_warning": [None] * len(queries.labels)}
    relative = side.relative_variance_from_scale(queries.scales, queries.means).numpy()
    found = np.interp(relative, np.asarray(reference), np.linspace(0, 100, len(reference)))
    limit = float(np.interp(percentile, np.linspace(0, 100, len(reference)), reference))
    what = "captions" if queries.modality is Modality.TEXT else "images"
    warnings = [None if value <= limit else
                f"query {label!r} is more uncertain than {pct:.1f}% of the {what} the posterior was fitted on "
                f"(relative variance {value:.3g}, the {percentile:g}th percentile is {limit:.3g}): trust its "
                "scores less" for label, value, pct in zip(queries.labels, relative, found)]
    return {"query_percentile": found.tolist(), "query_warning": warnings}


def _with_attrs(frame: pd.DataFrame, score, outcome: SearchOutcome, estimator, seconds, version,
                warnings: dict, shared: bool = False) -> pd.DataFrame:
    frame.attrs.update(**warnings, shared_projection=bool(shared))
    frame.attrs.update(score=ScoreName(score).value, version=version, exact=bool(np.all(outcome.exact)),
                       certified=bool(np.all(outcome.certified)), estimator=estimator.value,
                       candidates=outcome.candidates.tolist(), needed=outcome.needed.tolist(), seconds=seconds)
    return frame


def _check_version(reader: IndexReader, encoder: ClipEncoder) -> None:
    """Raise ``ValueError`` unless ``reader``'s version was built with ``encoder`` and its posterior is intact."""
    identity = reader.model
    if not encoder.identity.matches(identity):
        raise ValueError(f"index {reader.version_dir} was built with model {identity.to_dict()}, "
                         f"the encoder is {encoder.identity.to_dict()}")
    posterior = reader.posterior
    expected = reader.manifest.posterior.get("fingerprint")
    if posterior.fingerprint != expected:
        raise ValueError(f"index {reader.version_dir}: stored posterior fingerprint {posterior.fingerprint[:12]} "
                         f"differs from the manifest's {str(expected)[:12]}")
    posterior.check_encoder(encoder)
    if posterior.model is not None:
        posterior_for_model(posterior, encoder.identity)


def _manifest_stamp(index_dir: Path) -> tuple | None:
    """What changes when a build replaces ``manifest.json`` (inode, size, mtime), or ``None``."""
    try:
        info = os.stat(Path(index_dir) / MANIFEST_FILE)
    except OSError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns
