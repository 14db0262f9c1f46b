"""The index directory: an on-disk contract that other tools and later versions read.

Layout (``FORMAT_VERSION = 2``, or ``LASTBLOCK_FORMAT_VERSION = 3`` when a last-block posterior
gives the variance columns; other versions are refused with a hint to rebuild)::

    INDEX_DIR/
      manifest.json            points at the current version (replaced atomically)
      versions/<vNNNNNN>/      one immutable, self-contained version per publication
      work/                    resumable build state (shards); absent after a clean finish
      readers/                 one lease file per open reader, naming the version it pins
      .lock                    advisory lock held by a running build

``manifest.json`` is the current version's own ``manifest.json`` (so its ``version`` key
names the folder). It is replaced with write-temp + fsync + ``os.replace`` after the
version folder is complete and fsync'd, so a reader always sees a complete version.
After publishing, every version that is neither current nor pinned by a live reader's
lease is deleted (:mod:`bayesretrieval.store.leases`): a reader keeps its version for
as long as it is open, however many builds publish meanwhile.

A version folder holds:

- ``manifest.json``: :class:`~bayesretrieval.store.format.Manifest`: ``format_version``,
  ``library_version``, ``version``, ``created_at``, ``source_kind`` (``images`` or
  ``embeddings``), ``source_root``, ``model`` (open_clip name, pretrained tag or checkpoint
  path, checkpoint sha256), ``posterior`` (source, fingerprint, ``n``/``lambda`` per
  modality), ``embed_dim``, ``faiss_factory``, ``faiss_metric`` (``inner_product``),
  ``item_count``, ``skipped_count``, ``next_item_id`` (ids are never reused), ``variance``
  (``kfac``, ``diag`` or ``lowrank:R``: which per-item covariance columns are stored),
  ``traces`` (``trace_image`` = tr Sigma_I, ``trace_text`` = tr Sigma_T), ``extremes`` (the
  search certificate's collection extremes per covariance form, see
  :mod:`bayesretrieval.store.extremes`), ``files`` (sha256 per file, checked by
  ``bayesretrieval verify``), ``file_sizes`` (bytes per file, checked on every open) and
  ``activation_dim`` (``h`` when ``activations.npy`` is stored, else 0; absent, read as 0,
  in manifests written before it existed) and ``lastblock`` (scope, source, fingerprint,
  ``n``, ``lambda``, pairs and model of the last-block posterior the variance columns were
  computed with; empty, or absent in older manifests, when there is none).
- ``items.parquet``: one row per item, sorted by ``item_id``: ``item_id`` int64 (explicit,
  stable per path across rebuilds), ``path`` (POSIX, relative to the indexed folder; for
  precomputed input the given path or the id as text), ``file_size``, ``mtime_ns``,
  ``width``, ``height`` (null when unknown), ``embedding`` (fixed_size_list<float32>[D],
  the unnormalised mean ``mu = a @ P`` exactly as the encoder gave it), the
  per-item scalars of docs/math.md section 4, computed from the encoder's ``mu``:
  ``scale`` (q = a^T A^-1 a), ``norm_sq`` (|mu|^2), ``quad_image`` (mu^T Sigma_I mu),
  ``quad_text`` (mu^T Sigma_T mu), ``quad_image_diag`` and ``quad_text_diag`` (the same
  with diagonal Sigmas, for the ``published`` estimator), all float64; optional
  ``variance_diag`` (fixed_size_list<float32>[D]) and ``variance_lowrank``
  (fixed_size_list<float32>[r*D], row-major r x D). When present these columns are a
  complete, alternative description of the item's embedding covariance,
  ``L^T L + diag(variance_diag)`` with ``L`` the ``r x D`` factor (``variance_diag`` is all
  zeros when only a factor was given); they are never added to ``q Sigma_I``. For images
  built with ``--variance diag`` they hold ``q diag(Sigma_I)``; with ``lowrank:R``, ``L`` is
  ``sqrt(q)`` times the top-R eigenpairs ``sqrt(lambda_j) v_j`` of Sigma_I and
  ``variance_diag`` the diagonal remainder. Precomputed embeddings from another
  probabilistic model carry their own, with ``scale`` 0 unless the input gave ``scale`` or
  ``activation``. With ``build-index --store-activations`` the last column is
  ``activation`` (fixed_size_list<float32>[h]): the image tower's pre-projection
  activation ``a``, whose ``a^T A^-1 a`` is ``scale``; image queries use it for the
  cross-covariance of two images through the shared projection (docs/math.md section 12).
  The manifest JSON minus ``files`` is in the Parquet schema metadata under
  ``bayesretrieval.manifest``.
- Random-access arrays, same row order (sorted ids), memory-mappable: ``item_ids.npy``
  (int64 (N,)), ``means.npy`` (float32 (N, D)), ``scalars.npy`` (float64 (N, 6), column
  order :data:`SCALAR_COLUMNS`), ``path_offsets.npy`` (int64 (N+1,)) + ``paths.utf8``
  (concatenated UTF-8 paths), and when present ``variance_diag.npy`` (float32 (N, D)),
  ``variance_lowrank.npy`` (float32 (N, r, D)) and ``activations.npy`` (float32 (N, h),
  ``h * 4`` bytes per item: 3 KB for ViT-B-32; only with ``--store-activations``).
- ``index.faiss``: ``faiss.index_factory(D, "IDMap2," + faiss_factory, METRIC_INNER_PRODUCT)``
  over ``x = fl32(mu / s)``, ``s = sqrt(|mu|^2 + q tr Sigma_I)``, with ids = ``item_id``,
  so FAISS's raw top-k is the ranking by expected cosine to an expected-norm-scaled query.
  The rerank reads candidate means from ``means.npy``, never from FAISS.
- ``posterior/``: the :class:`~bayesretrieval.posterior.PosteriorPair` in the project format.
- ``lastblock/`` (with a last-block posterior only): the
  :class:`~bayesretrieval.posterior.lastblock_posterior.LastBlockPosterior` (safetensors + JSON).
- ``skipped.parquet``: ``path``, ``reason`` (a
  :class:`~bayesretrieval.skips.SkipReason` value), ``detail``, ``file_size``,
  ``mtime_ns``.

Read with :class:`IndexReader`; write with :func:`write_version`.
"""

from bayesretrieval.store.format import (
    FORMAT_VERSION,
    SCALAR_COLUMNS,
    CovarianceForm,
    ItemScalars,
    Manifest,
    VarianceSpec,
)
from bayesretrieval.store.reader import IdLookup, IndexDamagedError, IndexReader, ItemRows
from bayesretrieval.store.vectors import expected_norm
from bayesretrieval.store.writer import (
    ItemArrays,
    ItemMetadata,
    VersionInfo,
    build_faiss_index,
    default_faiss_factory,
    write_version,
)

__all__ = [
    "FORMAT_VERSION",
    "SCALAR_COLUMNS",
    "CovarianceForm",
    "IdLookup",
    "IndexDamagedError",
    "IndexReader",
    "ItemArrays",
    "ItemMetadata",
    "ItemRows",
    "ItemScalars",
    "Manifest",
    "VarianceSpec",
    "VersionInfo",
    "build_faiss_index",
    "default_faiss_factory",
    "expected_norm",
    "write_version",
]
