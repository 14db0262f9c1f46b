"""Names, schema and manifest of the index directory (the on-disk contract).

See :mod:`bayesretrieval.store` for the full description of the layout.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field
from enum import Enum

import numpy as np
import pyarrow as pa

FORMAT_VERSION = 2
LASTBLOCK_FORMAT_VERSION = 3
"""Written instead of :data:`FORMAT_VERSION` when the variance columns come from a last-block
posterior: a library that reads only version 2 would update such an index with the
projection posterior's covariances and drop the record, so it must refuse it instead."""
READ_FORMAT_VERSIONS = (FORMAT_VERSION, LASTBLOCK_FORMAT_VERSION)
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
ACTIVATIONS_FILE = "activations.npy"
FAISS_FILE = "index.faiss"
POSTERIOR_DIR = "posterior"
LASTBLOCK_DIR = "lastblock"
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


@dataclass(frozen=True)
class ItemScalars:
    """The per-item scalars of docs/math.md section 4, by name.

    Each attribute has the shape of the rows read (``(N,)`` for a whole table); numpy
    arrays, or torch tensors where the cosine moments are computed.

    Attributes:
        scale: ``q = a^T A^-1 a``.
        norm_sq: ``|mu|^2``.
        quad_image: ``mu^T Sigma_I mu``.
        quad_text: ``mu^T Sigma_T mu``.
        quad_image_diag: ``mu^T diag(Sigma_I) mu``.
        quad_text_diag: ``mu^T diag(Sigma_T) mu``.
    """

    scale: np.ndarray
    norm_sq: np.ndarray
    quad_image: np.ndarray
    quad_text: np.ndarray
    quad_image_diag: np.ndarray
    quad_text_diag: np.ndarray

    @classmethod
    def from_table(cls, table) -> "ItemScalars":
        """Name the columns of a ``(..., 6)`` array in :data:`SCALAR_COLUMNS` order (as ``scalars.npy`` holds them).

        Raises:
            ValueError: if the last axis does not have one entry per scalar.
        """
        table = np.asarray(table, dtype=np.float64)
        if table.shape[-1:] != (len(SCALAR_COLUMNS),):
            raise ValueError(f"scalars have shape {table.shape}, expected (..., {len(SCALAR_COLUMNS)})")
        return cls(*np.moveaxis(table, -1, 0))

    def quad(self, modality: str, diagonal: bool = False) -> np.ndarray:
        """``mu^T Sigma mu`` with ``Sigma`` the output covariance of ``modality`` (``"image"`` or ``"text"``)."""
        return getattr(self, f"quad_{modality}" + ("_diag" if diagonal else ""))


class CovarianceForm(str, Enum):
    """How an item's embedding covariance is described (docs/math.md section 4)."""

    KFAC = "kfac"
    """``q_i Sigma_I`` from the stored per-item scalars; no extra columns."""
    DIAG = "diag"
    """A per-item diagonal ``diag(d_i)``: the ``variance_diag`` column, ``(D,)``."""
    LOWRANK = "lowrank"
    """A per-item ``L_i^T L_i + diag(d_i)``: ``variance_lowrank`` ``L`` (``r x D``) and ``variance_diag``."""


@dataclass(frozen=True)
class VarianceSpec:
    """The per-item covariance columns requested for (or found in) an index.

    Attributes:
        form: the richest covariance form the columns describe.
        rank: ``r`` for :attr:`CovarianceForm.LOWRANK`, else 0.
    """

    form: CovarianceForm = CovarianceForm.KFAC
    rank: int = 0

    @classmethod
    def parse(cls, text: "str | VarianceSpec | None") -> "VarianceSpec":
        """Parse ``"kfac"``, ``"diag"`` or ``"lowrank:R"``.

        Raises:
            ValueError: for any other string or a non-positive rank.
        """
        if isinstance(text, VarianceSpec):
            return text
        if text is None:
            return cls()
        name, _, rank = str(text).partition(":")
        try:
            form = CovarianceForm(name)
        except ValueError:
            raise ValueError(f"variance must be one of kfac, diag, lowrank:R; got {text!r}") from None
        if form is CovarianceForm.LOWRANK:
            if not rank.isdigit() or int(rank) < 1:
                raise ValueError(f"variance lowrank needs a positive rank (lowrank:R), got {text!r}")
            return cls(form, int(rank))
        if rank:
            raise ValueError(f"variance {name!r} takes no rank, got {text!r}")
        return cls(form, 0)

    def __str__(self) -> str:
        return f"lowrank:{self.rank}" if self.form is CovarianceForm.LOWRANK else self.form.value

    @property
    def has_diag(self) -> bool:
        """Whether ``variance_diag`` is present."""
        return self.form is not CovarianceForm.KFAC

    @property
    def has_lowrank(self) -> bool:
        """Whether ``variance_lowrank`` is present."""
        return self.form is CovarianceForm.LOWRANK


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
        item_count: rows in ``items.parquet``.
        skipped_count: rows in ``skipped.parquet``.
        next_item_id: the next id to hand out (ids are never reused).
        variance: ``str(VarianceSpec)`` of the optional variance columns.
        traces: ``trace_image`` (``tr Sigma_I``) and ``trace_text`` (``tr Sigma_T``).
        extremes: the search certificate's collection extremes per covariance form
            (:func:`bayesretrieval.store.extremes.extremes_by_form`).
        files: sha256 per file of the version folder (relative POSIX paths).
        file_sizes: size in bytes per file of the version folder (checked on every open;
            empty in manifests written before sizes were recorded).
        activation_dim: ``h`` when the version stores each item's pre-projection activation
            (``activations.npy``, ``build-index --store-activations``), else 0 (and 0 in
            manifests written before activations could be stored).
        lastblock: :meth:`LastBlockPosterior.identity` of the last-block posterior the
            variance columns were computed with (stored in ``lastblock/``), else empty.
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
    item_count: int
    skipped_count: int
    next_item_id: int
    variance: str
    traces: dict
    extremes: dict
    files: dict = field(default_factory=dict)
    file_sizes: dict = field(default_factory=dict)
    activation_dim: int = 0
    lastblock: dict = field(default_factory=dict)

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
        if found not in READ_FORMAT_VERSIONS:
            raise ValueError(
                f"index format version {found}, this library reads version {FORMAT_VERSION} "
                f"(and {LASTBLOCK_FORMAT_VERSION} with a last-block posterior); "
                "rebuild the index with `bayesretrieval build-index SRC INDEX --rebuild`"
            )
        names = cls.__dataclass_fields__
        optional = {name for name, f in names.items() if f.default is not MISSING or f.default_factory is not MISSING}
        missing = sorted(set(names) - set(data) - optional)
        if missing:
            raise ValueError(f"manifest lacks fields {missing}")
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def variance_spec(self) -> VarianceSpec:
        """The parsed :attr:`variance`."""
        return VarianceSpec.parse(self.variance)

    @property
    def has_activations(self) -> bool:
        """Whether the version stores the items' pre-projection activations."""
        return self.activation_dim > 0


def items_schema(embed_dim: int, variance: VarianceSpec, activation_dim: int = 0) -> pa.Schema:
    """The Arrow schema of ``items.parquet`` for dimension ``D``, variance columns and activations.

    ``activation_dim`` ``h > 0`` adds the ``activation`` column (fixed_size_list<float32>[h]).
    """
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
    if activation_dim:
        fields.append(pa.field("activation", pa.list_(pa.float32(), activation_dim)))
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
