"""Fit the Kronecker Laplace posterior of an open_clip model on image-caption pairs.

Pipeline (docs/math.md section 2): decode pairs, encode both towers (activations and
unnormalised embeddings in one pass), regroup the stream into chunks of exactly ``C``
pairs, add each chunk's ``a a^T`` and InfoNCE Gauss-Newton sums, then choose ``lambda``
by type-II maximum likelihood (or take it as given) and build the posterior.

The last ``N mod C`` pairs are dropped: a smaller final chunk would be a softmax over
fewer classes and bias ``B``. :attr:`PosteriorFitter.num_dropped_` reports them.

Encoding and curvature can run as separate steps: :func:`encode_pairs` (or ``fit`` with
``encoded_out``) writes an "encoded pairs" Parquet file (columns ``image_activation``,
``image_embed``, ``text_activation``, ``text_embed``, one row per pair, plus JSON schema
metadata under ``bayesretrieval.encoded``), and :meth:`PosteriorFitter.fit_encoded`
fits from it without the model.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from bayesretrieval.encoders import ClipEncoder, ModelIdentity
from bayesretrieval.options import DEFAULT_CHUNK_SIZE
from bayesretrieval.posterior.curvature import DEFAULT_SOURCE_BATCH, ChunkCurvature
from bayesretrieval.posterior.io import PosteriorPair, _pair_values, save_bayesvlm_directory
from bayesretrieval.posterior.kronecker import KroneckerPosterior, Modality
from bayesretrieval.posterior.pairs import PairReader
from bayesretrieval.posterior.prior import FactorSpectrum, PriorObjective, optimize_prior_precision
from bayesretrieval.skips import SkipReason

ENCODED_FORMAT_VERSION = 1
ENCODED_METADATA_KEY = b"bayesretrieval.encoded"
ENCODED_COLUMNS = ("image_activation", "image_embed", "text_activation", "text_embed")
REFERENCE_PAIRS = 4096
"""Fitting pairs kept (uniformly, seeded) to describe the posterior's typical relative variance."""


@dataclass
class EncodedPairs:
    """Aligned activations ``(N, h)`` and unnormalised embeddings ``(N, D)`` of both towers."""

    image_activations: torch.Tensor
    image_embeds: torch.Tensor
    text_activations: torch.Tensor
    text_embeds: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The four tensors in :data:`ENCODED_COLUMNS` order."""
        return (self.image_activations, self.image_embeds, self.text_activations, self.text_embeds)

    def __len__(self) -> int:
        return int(self.image_embeds.shape[0])

    @classmethod
    def concat(cls, parts: list["EncodedPairs"]) -> "EncodedPairs":
        """Stack parts row-wise."""
        return cls(*(torch.cat(column) for column in zip(*(p.tensors() for p in parts))))

    def split(self, index: int) -> tuple["EncodedPairs", "EncodedPairs"]:
        """Return rows ``[:index]`` and ``[index:]``."""
        head, tail = zip(*((t[:index], t[index:]) for t in self.tensors()))
        return EncodedPairs(*head), EncodedPairs(*tail)

    def take(self, rows: torch.Tensor) -> "EncodedPairs":
        """Return the rows at ``rows``."""
        return EncodedPairs(*(t[rows] for t in self.tensors()))


class ReferenceSample:
    """A uniform sample of at most ``size`` pairs from a stream of unknown length.

    Each pair gets a seeded random key and the ``size`` smallest keys are kept, so the
    sample does not depend on how the stream is cut into parts.

    Args:
        size: pairs kept.
        seed: seed of the keys.
    """

    def __init__(self, size: int = REFERENCE_PAIRS, seed: int = 0):
        self.size = size
        self._generator = torch.Generator().manual_seed(seed)
        self._keys = torch.empty(0)
        self._pairs: EncodedPairs | None = None

    def watch(self, stream: Iterable[EncodedPairs]) -> Iterator[EncodedPairs]:
        """Pass ``stream`` through, sampling it on the way."""
        for part in stream:
            keys = torch.cat([self._keys, torch.rand(len(part), generator=self._generator)])
            pairs = part if self._pairs is None else EncodedPairs.concat([self._pairs, part])
            if len(keys) > self.size:
                kept = torch.topk(keys, self.size, largest=False).indices
                keys, pairs = keys[kept], pairs.take(kept)
            self._keys, self._pairs = keys, pairs
            yield part

    def percentiles(self, posteriors: Sequence[KroneckerPosterior]) -> dict | None:
        """Per modality, the 0th-100th percentiles of the sample's relative variance (``None`` if empty)."""
        if self._pairs is None or len(self._pairs) == 0:
            return None
        return reference_percentiles(self._pairs, posteriors)


def reference_percentiles(pairs: EncodedPairs, posteriors: Sequence[KroneckerPosterior]) -> dict:
    """Per modality, the 0th-100th percentiles of the pairs' relative variance, and the pair count.

    The query warning's reference (:attr:`PosteriorPair.reference`): where a query's
    relative variance falls among typical pairs of the data the posterior describes.
    """
    sides = {Modality.IMAGE: (pairs.image_embeds, pairs.image_activations),
             Modality.TEXT: (pairs.text_embeds, pairs.text_activations)}
    levels = torch.linspace(0, 1, 101, dtype=torch.float64)
    reference = {p.modality.value: torch.quantile(p.relative_variance(*sides[p.modality]), levels).tolist()
                 for p in posteriors}
    return {**reference, "pairs": len(pairs)}


@dataclass(frozen=True)
class EncodedMetadata:
    """What fitting needs from the model, stored with encoded pairs.

    Attributes:
        model: the encoder's identity.
        logit_scale: ``s = exp(logit_scale)``.
        image_projection_sq_norm: ``|P_I|^2`` (Frobenius), the image ``|theta|^2``.
        text_projection_sq_norm: ``|P_T|^2``, the text ``|theta|^2``.
        source: name of the pairs' file or folder.
    """

    model: ModelIdentity
    logit_scale: float
    image_projection_sq_norm: float
    text_projection_sq_norm: float
    source: str

    @classmethod
    def from_encoder(cls, encoder: ClipEncoder, source: str) -> "EncodedMetadata":
        """Read the scale and projection norms off an encoder."""
        norms = [float(p.double().pow(2).sum()) for p in (encoder.image_projection, encoder.text_projection)]
        return cls(encoder.identity, encoder.logit_scale, *norms, source)

    def theta_sq_norm(self, modality: Modality) -> float:
        """``|theta|^2`` of one tower's projection."""
        return getattr(self, f"{Modality(modality).value}_projection_sq_norm")

    def to_json(self) -> bytes:
        """JSON for the Parquet schema metadata."""
        data = {**self.__dict__, "model": self.model.to_dict(), "format_version": ENCODED_FORMAT_VERSION}
        return json.dumps(data).encode()

    @classmethod
    def from_json(cls, raw: bytes, path: Path) -> "EncodedMetadata":
        """Parse :meth:`to_json` output, checking the format version."""
        data = json.loads(raw)
        if data.get("format_version") != ENCODED_FORMAT_VERSION:
            raise ValueError(
                f"{path}: encoded-pairs format version {data.get('format_version')}, this "
                f"library reads version {ENCODED_FORMAT_VERSION}"
            )
        data.pop("format_version")
        return cls(**{**data, "model": ModelIdentity.from_dict(data["model"])})


def iter_encoded(
    encoder: ClipEncoder, reader: PairReader, batch_size: int = 64, num_workers: int = 2
) -> Iterator[EncodedPairs]:
    """Decode and encode pairs batch by batch (both towers, one forward pass each)."""
    for batch in reader.iter_batches(encoder.preprocess, batch_size, num_workers):
        image = encoder.encode_image_batch(batch.images)
        text = encoder.encode_text_batch(encoder.tokenize(batch.captions))
        yield EncodedPairs(image.activations, image.embeds, text.activations, text.embeds)


def _fixed_size_lists(matrix: torch.Tensor) -> pa.FixedSizeListArray:
    values = matrix.detach().to("cpu", torch.float32).contiguous().numpy()
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def _to_matrix(column: pa.Array) -> torch.Tensor:
    values = column.flatten().to_numpy(zero_copy_only=False)
    return torch.from_numpy(values.reshape(-1, column.type.list_size).copy())


@contextlib.contextmanager
def _staged_file(path: Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it to ``path`` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temp)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _tee_to_parquet(stream: Iterable[EncodedPairs], path: Path, metadata: EncodedMetadata) -> Iterator[EncodedPairs]:
    """Yield ``stream`` unchanged while writing it to ``path`` (closed when exhausted)."""
    iterator = iter(stream)
    first = next(iterator, None)
    if first is None:
        return
    schema = pa.schema(
        [pa.field(name, pa.list_(pa.float32(), int(t.shape[1]))) for name, t in zip(ENCODED_COLUMNS, first.tensors())],
        metadata={ENCODED_METADATA_KEY: metadata.to_json()},
    )
    with pq.ParquetWriter(path, schema) as writer:
        for part in itertools.chain([first], iterator):
            writer.write_table(pa.Table.from_arrays([_fixed_size_lists(t) for t in part.tensors()], schema=schema))
            yield part


def read_encoded(path: str | Path, rows_per_batch: int = 4096) -> tuple[EncodedMetadata, int, Iterator[EncodedPairs]]:
    """Open an encoded-pairs file: ``(metadata, num_rows, batches of rows_per_batch rows)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoded pairs not found: {path}")
    parquet = pq.ParquetFile(path)
    schema = parquet.schema_arrow
    missing = [name for name in ENCODED_COLUMNS if name not in schema.names]
    if missing or ENCODED_METADATA_KEY not in (schema.metadata or {}):
        raise ValueError(
            f"{path}: not an encoded-pairs file: expected columns {list(ENCODED_COLUMNS)} and "
            f"{ENCODED_METADATA_KEY.decode()} metadata, missing {missing or 'the metadata'}"
        )
    metadata = EncodedMetadata.from_json(schema.metadata[ENCODED_METADATA_KEY], path)
    batches = (
        EncodedPairs(*(_to_matrix(batch.column(name)) for name in ENCODED_COLUMNS))
        for batch in parquet.iter_batches(batch_size=rows_per_batch, columns=list(ENCODED_COLUMNS))
    )
    return metadata, int(parquet.metadata.num_rows), batches


def is_encoded_pairs(path: str | Path) -> bool:
    """Whether ``path`` is an encoded-pairs Parquet file (:func:`encode_pairs`), not a pairs table or folder."""
    path = Path(path)
    if not path.is_file() or path.suffix.lower() != ".parquet":
        return False
    return ENCODED_METADATA_KEY in (pq.read_schema(path).metadata or {})


def load_pairs(pairs: PairReader | str | Path, encoder: ClipEncoder | None = None, batch_size: int = 64,
               num_workers: int = 2) -> tuple[EncodedMetadata, EncodedPairs]:
    """All pairs of an encoded-pairs file, or of a pairs table or folder encoded with ``encoder``, in memory.

    For held-out pairs (thousands), not for fitting sets: everything is held at once.

    Raises:
        ValueError: if pairs need encoding and no encoder is given, or no pair is readable.
    """
    if not isinstance(pairs, PairReader) and is_encoded_pairs(pairs):
        metadata, _, batches = read_encoded(pairs)
        parts = list(batches)
        name = str(pairs)
    else:
        if encoder is None:
            raise ValueError(f"{pairs}: image-caption pairs need an encoder (or pass an encoded-pairs file)")
        reader = _as_reader(pairs)
        metadata = EncodedMetadata.from_encoder(encoder, reader.name)
        parts = list(iter_encoded(encoder, reader, batch_size, num_workers))
        name = f"{reader.path} ({_skip_note(reader)})"
    if sum(len(p) for p in parts) == 0:
        raise ValueError(f"{name}: no readable pairs")
    return metadata, EncodedPairs.concat(parts)


class FitSettings:
    """What every posterior fitter is configured with: chunks, prior, curvature batches, decoding, progress.

    The arguments are documented on :class:`PosteriorFitter` and
    :class:`~bayesretrieval.posterior.lastblock_fit.LastBlockFitter`.
    """

    def __init__(
        self,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        pseudo_data_count: float | tuple[float, float] = 1.0,
        prior_precision: float | tuple[float, float] | None = None,
        objective: PriorObjective | str = PriorObjective.KRONECKER,
        source_batch: int = DEFAULT_SOURCE_BATCH,
        batch_size: int = 64,
        num_workers: int = 2,
        progress_bar: bool = False,
    ):
        self.chunk_size = chunk_size
        self.pseudo_data_count = pseudo_data_count
        self.prior_precision = prior_precision
        self.objective = objective
        self.source_batch = source_batch
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.progress_bar = progress_bar

    def _check_chunk_size(self) -> None:
        if self.chunk_size < 2:
            raise ValueError(f"chunk_size must be at least 2, got {self.chunk_size}")


class PosteriorFitter(FitSettings):
    """Estimate the Kronecker Laplace posterior of both projections (docs/math.md section 2).

    Follows scikit-learn's fit contract: hyper-parameters here, :meth:`fit` or
    :meth:`fit_encoded` returns ``self``, learned attributes end in ``_``.

    Args:
        chunk_size: ``C``, pairs per InfoNCE chunk (the classes of each softmax).
        pseudo_data_count: ``n``; one number or an ``(image, text)`` pair.
        prior_precision: ``lambda``; one number, a pair, or ``None`` to choose it by
            type-II maximum likelihood with ``objective``.
        objective: a :class:`PriorObjective` or its name.
        source_batch: sources per sub-batch of the curvature step.
        batch_size: pairs decoded and encoded per batch.
        num_workers: image-decoding threads.
        progress_bar: show a tqdm bar with ETA (off by default; commands turn it on).

    Attributes:
        posterior_: the fitted :class:`PosteriorPair`.
        prior_precision_: ``(lambda_image, lambda_text)`` used.
        num_pairs_: ``N``, pairs that entered the factors.
        num_dropped_: pairs after the last full chunk, left out.
        skip_counts_: skipped inputs per reason (empty when fitting from encoded pairs).
        metadata_: the :class:`EncodedMetadata` (model identity, scale, norms).
    """

    def _validate(self) -> tuple[tuple, tuple, PriorObjective]:
        self._check_chunk_size()
        counts = _pair_values(self.pseudo_data_count, "pseudo_data_count")
        lambdas = _pair_values(self.prior_precision, "prior_precision")
        for name, values in (("pseudo_data_count", counts), ("prior_precision", lambdas)):
            if any(v is not None and not v > 0 for v in values):
                raise ValueError(f"{name} must be positive, got {values}")
        return counts, lambdas, PriorObjective(self.objective)

    def _check_enough(self, available: int, what: str) -> None:
        if available < self.chunk_size:
            raise ValueError(
                f"{available} {what}, fewer than one chunk: chunk_size={self.chunk_size} needs "
                f"at least {self.chunk_size} pairs (lower chunk_size or add pairs)"
            )

    def fit(
        self, encoder: ClipEncoder, pairs: PairReader | str | Path, encoded_out: str | Path | None = None
    ) -> "PosteriorFitter":
        """Decode, encode and fit on image-caption pairs.

        Args:
            encoder: the open_clip model to fit the posterior for.
            pairs: a :class:`PairReader` or a path it accepts.
            encoded_out: also write the encoded pairs here (Parquet), for :meth:`fit_encoded`.

        Returns:
            ``self``.
        """
        self._validate()
        reader = _as_reader(pairs)
        total = len(reader)
        self._check_enough(total, "candidate pairs")
        staging = contextlib.nullcontext() if encoded_out is None else _staged_file(Path(encoded_out))
        with (
            staging as staged,
            tqdm(total=total, unit="pair", desc="fit posterior", disable=not self.progress_bar) as bar,
        ):
            metadata, stream = _encoded_stream(encoder, reader, staged, bar, self.batch_size, self.num_workers)
            self._fit_stream(stream, metadata, lambda: f"readable pairs ({_skip_note(reader)})")
        self.skip_counts_ = reader.skip_counts()
        return self

    def fit_encoded(self, path: str | Path) -> "PosteriorFitter":
        """Fit from an encoded-pairs Parquet file (:func:`encode_pairs`); returns ``self``."""
        self._validate()
        metadata, num_rows, batches = read_encoded(path)
        self._check_enough(num_rows, "encoded pairs")
        with tqdm(total=num_rows, unit="pair", desc="fit posterior", disable=not self.progress_bar) as bar:
            self._fit_stream(_count_progress(batches, bar), metadata, lambda: "encoded pairs")
        self.skip_counts_ = {}
        return self

    def _fit_stream(self, stream: Iterable[EncodedPairs], metadata: EncodedMetadata, what: Callable[[], str]) -> None:
        counts, lambdas, objective = self._validate()
        curvature = ChunkCurvature(metadata.logit_scale, self.chunk_size, self.source_batch)
        sample = ReferenceSample()
        self.num_dropped_ = _add_chunks(sample.watch(stream), curvature)
        self._check_enough(curvature.num_pairs + self.num_dropped_, what())
        posteriors = []
        for modality, n, lam in zip(Modality, counts, lambdas):
            A, B = curvature.factors(modality)
            if lam is None:
                spectrum = FactorSpectrum.from_factors(A, B, metadata.theta_sq_norm(modality))
                lam = optimize_prior_precision(spectrum, n, objective)
            posteriors.append(KroneckerPosterior.from_factors(A, B, n, lam, modality))
        self.metadata_ = metadata
        self.num_pairs_ = curvature.num_pairs
        self.prior_precision_ = tuple(p.prior_precision for p in posteriors)
        source = f"fitted:{metadata.source};N={curvature.num_pairs};C={self.chunk_size}"
        self.posterior_ = PosteriorPair(*posteriors, source=source, model=metadata.model,
                                        reference=sample.percentiles(posteriors))

    def save(self, directory: str | Path, bayesvlm_directory: str | Path | None = None) -> Path:
        """Write the posterior in the project format, and optionally BayesVLM's layout.

        Each directory is published atomically (temp dir, then rename).

        Raises:
            ValueError: if neither fit method has run.
        """
        if not hasattr(self, "posterior_"):
            raise ValueError("this PosteriorFitter is not fitted yet; call fit or fit_encoded first")
        if bayesvlm_directory is not None:
            save_bayesvlm_directory(self.posterior_, bayesvlm_directory)
        return self.posterior_.save(directory)


def _skip_note(reader: PairReader) -> str:
    skips = reader.skip_counts()
    counts = ", ".join(f"{n} {reason}" for reason, n in skips.items())
    root = f"; relative paths start at {reader.image_root}" if SkipReason.MISSING.value in skips else ""
    return f"skipped {counts}{root}" if counts else "nothing skipped"


def _as_reader(pairs: PairReader | str | Path) -> PairReader:
    return pairs if isinstance(pairs, PairReader) else PairReader(Path(pairs))


def _encoded_stream(encoder, reader, staged, bar, batch_size, num_workers):
    """Return the encoder's metadata and its encoded pairs, teed to ``staged`` if given."""
    metadata = EncodedMetadata.from_encoder(encoder, reader.name)
    stream = iter_encoded(encoder, reader, batch_size, num_workers)
    if staged is not None:
        stream = _tee_to_parquet(stream, staged, metadata)
    return metadata, _count_progress(stream, bar, reader)


def _count_progress(stream: Iterable[EncodedPairs], bar, reader: PairReader | None = None):
    """Advance ``bar`` by the pairs encoded plus those the reader skipped meanwhile."""
    skipped = 0
    for part in stream:
        now_skipped = len(reader.skipped) if reader is not None else 0
        bar.update(len(part) + now_skipped - skipped)
        skipped = now_skipped
        yield part
    bar.update((len(reader.skipped) if reader is not None else 0) - skipped)


def _add_chunks(stream: Iterable[EncodedPairs], curvature: ChunkCurvature) -> int:
    """Regroup ``stream`` into chunks of ``curvature.chunk_size``; return the remainder size."""
    buffer: list[EncodedPairs] = []
    buffered = 0
    for part in stream:
        buffer.append(part)
        buffered += len(part)
        while buffered >= curvature.chunk_size:
            chunk, rest = EncodedPairs.concat(buffer).split(curvature.chunk_size)
            curvature.add_chunk(*chunk.tensors())
            buffer, buffered = [rest], len(rest)
    return buffered


def fit_posterior(
    encoder: ClipEncoder, pairs: PairReader | str | Path, chunk_size: int = DEFAULT_CHUNK_SIZE, **options
) -> PosteriorPair:
    """Fit and return the posterior; ``options`` are :class:`PosteriorFitter` arguments."""
    return PosteriorFitter(chunk_size, **options).fit(encoder, pairs).posterior_


def encode_pairs(
    encoder: ClipEncoder,
    pairs: PairReader | str | Path,
    path: str | Path,
    batch_size: int = 64,
    num_workers: int = 2,
    progress_bar: bool = False,
) -> PairReader:
    """Encode pairs to an encoded-pairs Parquet file (atomic), for fitting later.

    Returns:
        The reader, whose :meth:`PairReader.skip_counts` tells what was skipped.
    """
    reader = _as_reader(pairs)
    total = len(reader)
    with (
        _staged_file(Path(path)) as staged,
        tqdm(total=total, unit="pair", desc="encode pairs", disable=not progress_bar) as bar,
    ):
        encoded = sum(len(p) for p in _encoded_stream(encoder, reader, staged, bar, batch_size, num_workers)[1])
        if encoded == 0:
            raise ValueError(f"{reader.path}: no readable pairs ({_skip_note(reader)})")
    return reader
