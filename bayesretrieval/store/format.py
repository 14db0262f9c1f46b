"""Names, schema and manifest of the index directory (the on-disk contract).

See :mod:`bayesretrieval.store` for the full description of the layout.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import Enum

import pyarrow as pa

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
VERSIONS_DIR = "versions"
WORK_DIR = "work"
LOCK_FILE = ".lock"

ITEMS_FILE = "items.parquet"
ITEM_IDS_FILE = "item_ids.npy"
MEANS_FILE = "means.npy"
SCALARS_FILE = "scalars.npy"
PATH_OFFSETS_FILE = "path_offsets.npy"
PATHS_FILE = "paths.utf8"
VARIANCE_DIAG_FILE = "variance_diag.npy"
VARIANCE_LOWRANK_FILE = "variance_lowrank.npy"
FAISS_FILE = "index.faiss"
POSTERIOR_DIR = "posterior"
SKIPPED_FILE = "skipped.parquet"

PARQUET_METADATA_KEY = b"bayesretrieval.manifest"

SCALAR_COLUMNS = (
    "scale",
    "norm_sq",
    "quad_image",
    "quad_text",
    "quad_image_diag",
    "quad_text_diag",
)
"""Column order of ``scalars.npy`` and of the scalar columns of ``items.parquet``."""

FAISS_METRIC = "inner_product"
FAISS_VECTORS = "expected_norm_scaled_invertible"
"""FAISS holds ``x = fl32(mu / s)``, ``s = sqrt(|mu|^2 + q tr Sigma_I)`` (MATH.md section 4),
and ``means.npy`` holds exactly ``fl32(s x)`` (:mod:`bayesretrieval.store.vectors`)."""
FAISS_VECTORS_APPROXIMATE = "expected_norm_scaled"
"""Versions written before the means were made invertible: FAISS holds ``fl32(mu / s)`` only."""


class VarianceKind(str, Enum):
    """Which optional per-item variance columns an index carries."""

    NONE = "none"
    """Only the KFAC scalars (enough for the Kronecker posterior, MATH.md section 4)."""
    DIAG = "diag"
    """``variance_diag``: the per-item diagonal of the embedding covariance, ``(D,)``."""
    LOWRANK = "lowrank"
    """``variance_lowrank`` ``L`` (``r x D``) plus ``variance_diag`` ``d``: ``Cov = L^T L + diag(d)``."""


@dataclass(frozen=True)
class VarianceSpec:
    """The optional variance columns requested for (or found in) an index.

    Attributes:
        kind: which columns.
        rank: ``r`` for :attr:`VarianceKind.LOWRANK`, else 0.
    """

    kind: VarianceKind = VarianceKind.NONE
    rank: int = 0

    @classmethod
    def parse(cls, text: "str | VarianceSpec | None") -> "VarianceSpec":
        """Parse ``"none"``, ``"diag"`` or ``"lowrank:R"``.

        Raises:
            ValueError: for any other string or a non-positive rank.
        """
        if isinstance(text, VarianceSpec):
            return text
        if text is None:
            return cls()
        name, _, rank = str(text).partition(":")
        try:
            kind = VarianceKind(name)
        except ValueError:
            raise ValueError(
                f"variance must be one of none, diag, lowrank:R; got {text!r}"
            ) from None
        if kind is VarianceKind.LOWRANK:
            if not rank.isdigit() or int(rank) < 1:
                raise ValueError(f"variance lowrank needs a positive rank (lowrank:R), got {text!r}")
            return cls(kind, int(rank))
        if rank:
            raise ValueError(f"variance {name!r} takes no rank, got {text!r}")
        return cls(kind, 0)

    def __str__(self) -> str:
        return f"lowrank:{self.rank}" if self.kind is VarianceKind.LOWRANK else self.kind.value

    @property
    def has_diag(self) -> bool:
        """Whether ``variance_diag`` is present."""
        return self.kind is not VarianceKind.NONE

    @property
    def has_lowrank(self) -> bool:
        """Whether ``variance_lowrank`` is present."""
        return self.kind is VarianceKind.LOWRANK


@dataclass(frozen=True)
class Manifest:
    """The content of ``manifest.json`` (and of the Parquet schema metadata).

    Attributes:
        format_version: layout version; readers refuse other versions.
        library_version: ``bayesretrieval.__version__`` that wrote it.
        version: name of the version folder under ``versions/``.
        created_at: ISO-8601 UTC time of publication.
        source_kind: ``"images"`` or ``"embeddings"`` (precomputed Parquet input).
        source_root: absolute path of the indexed folder or embeddings file (informational).
        model: :meth:`ModelIdentity.to_dict` of the encoder.
        posterior: :meth:`PosteriorPair.identity` (source, fingerprint, n, lambda per modality).
        embed_dim: ``D``.
        faiss_factory: the factory string after ``IDMap2,`` (e.g. ``"Flat"``).
        faiss_metric: always ``"inner_product"``.
        faiss_vectors: :data:`FAISS_VECTORS` (:data:`FAISS_VECTORS_APPROXIMATE` in older
            versions, whose means the FAISS vectors do not reproduce exactly).
        item_count: rows in ``items.parquet``.
        skipped_count: rows in ``skipped.parquet``.
        next_item_id: the next id to hand out (ids are never reused).
        variance: ``str(VarianceSpec)`` of the optional variance columns.
        traces: ``trace_image`` (``tr Sigma_I``) and ``trace_text`` (``tr Sigma_T``).
        stats: collection extremes for bounds: ``max_<scalar>`` for every scalar column,
            ``min_expected_norm`` (``min sqrt(|mu|^2 + q tr Sigma_I)``) and
            ``max_variance_trace`` (largest trace of the optional per-item covariance,
            0 without variance columns); ``None`` values for an empty index;
            ``ratio_extremes``: the search certificate's extremes per covariance form
            (:func:`bayesretrieval.store.extremes.extremes_by_form`).
        files: sha256 per file of the version folder (relative POSIX paths).
    """

    format_version: int
    library_version: str
    version: str
    created_at: str
    source_kind: str
    source_root: str
    model: dict
    posterior: dict
    embed_dim: int
    faiss_factory: str
    faiss_metric: str
    faiss_vectors: str
    item_count: int
    skipped_count: int
    next_item_id: int
    variance: str
    traces: dict
    stats: dict
    files: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Return a JSON-ready dict."""
        return asdict(self)

    def to_json(self) -> str:
        """Return the JSON text written to ``manifest.json``."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        """Build from a dict, refusing other format versions.

        Raises:
            ValueError: naming the found and the supported format version.
        """
        found = data.get("format_version")
        if found != FORMAT_VERSION:
            raise ValueError(
                f"index format version {found}, this library reads version {FORMAT_VERSION}"
            )
        names = cls.__dataclass_fields__
        missing = sorted(set(names) - set(data) - {"files"})
        if missing:
            raise ValueError(f"manifest lacks fields {missing}")
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def variance_spec(self) -> VarianceSpec:
        """The parsed :attr:`variance`."""
        return VarianceSpec.parse(self.variance)


def items_schema(embed_dim: int, variance: VarianceSpec) -> pa.Schema:
    """The Arrow schema of ``items.parquet`` for dimension ``D`` and variance columns."""
    fields = [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("file_size", pa.int64()),
        pa.field("mtime_ns", pa.int64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("embedding", pa.list_(pa.float32(), embed_dim), nullable=False),
    ]
    fields += [pa.field(name, pa.float64(), nullable=False) for name in SCALAR_COLUMNS]
    if variance.has_diag:
        fields.append(pa.field("variance_diag", pa.list_(pa.float32(), embed_dim)))
    if variance.has_lowrank:
        fields.append(pa.field("variance_lowrank", pa.list_(pa.float32(), variance.rank * embed_dim)))
    return pa.schema(fields)


SKIPPED_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
        pa.field("file_size", pa.int64()),
        pa.field("mtime_ns", pa.int64()),
    ]
)
"""Schema of ``skipped.parquet``: one row per input that was not indexed."""
