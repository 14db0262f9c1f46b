"""Fit the last-block Laplace posterior on image-caption pairs (docs/math.md section 13).

The likelihood, the chunking and the prior are the projection posterior's (section 2):
pairs are grouped into chunks of exactly ``C``, the image embedding ``g_i`` of each pair
meets the InfoNCE softmax over the chunk's ``C`` captions, and ``H_i`` is its Gauss-Newton
Hessian with respect to ``g_i`` (:func:`~bayesretrieval.posterior.curvature.infonce_ggn`).
For a covered layer with input ``a~_i`` and output Jacobian ``J_i = dg_i/ds`` the exact
GGN block of that layer is ``sum_i (a~_i a~_i^T) kron (J_i^T H_i J_i)``; KFAC replaces the
sum of Kronecker products by the product of sums, with the project's ``1/sqrt(N)`` scaling:

    A = (1/sqrt(N)) sum_i a~_i a~_i^T,     B = (1/sqrt(N)) sum_i J_i^T H_i J_i

For the projection ``J_i = I`` and these are the projection posterior's factors. ``lambda``
is one for all layers, chosen by the summed Laplace evidence of the blocks (or given).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from bayesretrieval.encoders import ClipEncoder
from bayesretrieval.options import PriorObjective
from bayesretrieval.posterior.curvature import infonce_ggn
from bayesretrieval.posterior.fit import FitSettings
from bayesretrieval.posterior.lastblock import BlockScope, HeadInputs, LastBlockHead
from bayesretrieval.posterior.lastblock_posterior import LastBlockPosterior
from bayesretrieval.posterior.pairs import PairReader
from bayesretrieval.posterior.prior import FactorSpectrum, optimize_prior_precision

DEFAULT_SOURCE_BATCH = 64
"""Images per Jacobian batch while fitting (memory ``O(batch D (w + 4w))``)."""


def chunk_curvature(head: LastBlockHead, inputs: HeadInputs, targets: torch.Tensor, logit_scale: float,
                    source_batch: int = DEFAULT_SOURCE_BATCH) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per covered layer, ``(sum a~ a~^T, sum J^T H J)`` over the sources of one chunk, float64.

    Args:
        head: the last block's head.
        inputs: the class tokens' start for the chunk's images (the sources), ``N`` rows.
        targets: the chunk's text embeddings (the classes), ``(C, D)``.
        logit_scale: ``s``.
        source_batch: sources per Jacobian batch.

    Returns:
        ``{layer: (outer (in, in), ggn (out, out))}``, unscaled sums.
    """
    sums: dict[str, list[torch.Tensor]] = {}
    for part in inputs.split(source_batch):
        linearisation = head.linearise(part)
        hessians = infonce_ggn(linearisation.embeds, targets.to(linearisation.embeds.dtype), logit_scale)
        for name in head.scope.layers:
            layer_input = linearisation.inputs[name].to(torch.float64)
            jacobian = linearisation.jacobians[name]
            ggn = torch.einsum("bdo,bde,bep->op", jacobian, hessians, jacobian).to(torch.float64)
            outer = layer_input.T @ layer_input
            if name in sums:
                sums[name][0] += outer
                sums[name][1] += ggn
            else:
                sums[name] = [outer, ggn]
    return {name: (outer, ggn) for name, (outer, ggn) in sums.items()}


def kfac_factors(sums: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 num_pairs: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``A = (1/sqrt(N)) sum a~ a~^T`` and ``B = (1/sqrt(N)) sum J^T H J`` per layer, symmetrised."""
    scale = num_pairs**-0.5
    return {name: (scale * (outer + outer.T) / 2, scale * (ggn + ggn.T) / 2) for name, (outer, ggn) in sums.items()}


class LastBlockFitter(FitSettings):
    """Estimate the last-block posterior (docs/math.md section 13), scikit-learn style.

    Args:
        scope: which layers (a :class:`BlockScope` or its name).
        settings: :class:`~bayesretrieval.posterior.fit.FitSettings` arguments, here:
            ``chunk_size`` (``C``, pairs per InfoNCE chunk), ``pseudo_data_count`` (``n``),
            ``prior_precision`` (``lambda``, or ``None`` to maximise the summed evidence with
            ``objective``, a :class:`PriorObjective` or its name), ``source_batch`` (images
            per Jacobian batch), ``batch_size`` and ``num_workers`` (decoding, :meth:`fit`
            only), ``progress_bar``.

    Attributes:
        posterior_: the fitted :class:`LastBlockPosterior`.
        prior_precision_: ``lambda`` used.
        num_pairs_: ``N``, pairs that entered the factors.
        num_dropped_: pairs after the last full chunk, left out.
    """

    def __init__(self, scope: BlockScope | str = BlockScope.MLP, **settings):
        super().__init__(**settings)
        self.scope = scope

    def _validate(self) -> None:
        BlockScope(self.scope)
        PriorObjective(self.objective)
        self._check_chunk_size()
        if not self.pseudo_data_count > 0 or not (self.prior_precision is None or self.prior_precision > 0):
            raise ValueError(f"pseudo_data_count and prior_precision must be positive, got "
                             f"{self.pseudo_data_count} and {self.prior_precision}")

    def fit(self, encoder: ClipEncoder, pairs: PairReader | str | Path) -> "LastBlockFitter":
        """Decode image-caption pairs (a :class:`PairReader` or a path it accepts) and fit; returns ``self``."""
        reader = pairs if isinstance(pairs, PairReader) else PairReader(Path(pairs))
        batches = ((b.images, b.captions) for b in reader.iter_batches(encoder.preprocess, self.batch_size,
                                                                        self.num_workers))
        return self.fit_batches(encoder, batches, source=f"fitted:{reader.name}")

    def fit_batches(self, encoder: ClipEncoder, batches: Iterable[tuple[torch.Tensor, Sequence[str]]],
                    source: str = "batches") -> "LastBlockFitter":
        """Fit on ``(preprocessed images (b, 3, H, W), captions)`` batches; returns ``self``.

        Raises:
            ValueError: if fewer than ``chunk_size`` pairs arrive.
        """
        self._validate()
        head = LastBlockHead(encoder, self.scope)
        totals: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        num_pairs = 0
        with tqdm(unit="pair", desc="fit last block", disable=not self.progress_bar) as bar:
            for inputs, targets in self._chunks(encoder, head, batches):
                sums = chunk_curvature(head, inputs, targets, encoder.logit_scale, self.source_batch)
                totals = {n: (totals[n][0] + s[0], totals[n][1] + s[1]) if n in totals else s for n, s in sums.items()}
                num_pairs += len(inputs)
                bar.update(len(inputs))
        if num_pairs == 0:
            raise ValueError(f"{self.num_dropped_} pairs, fewer than one chunk of chunk_size={self.chunk_size}")
        factors = kfac_factors(totals, num_pairs)
        self.prior_precision_ = (self._evidence_lambda(head, factors) if self.prior_precision is None
                                 else self.prior_precision)
        self.num_pairs_ = num_pairs
        self.posterior_ = LastBlockPosterior.from_factors(
            factors, self.pseudo_data_count, self.prior_precision_, head.scope, num_pairs,
            f"{source};N={num_pairs};C={self.chunk_size}", encoder.identity)
        return self

    def _chunks(self, encoder: ClipEncoder, head: LastBlockHead,
                batches: Iterable[tuple[torch.Tensor, Sequence[str]]]) -> Iterator[tuple[HeadInputs, torch.Tensor]]:
        """Regroup encoded batches into chunks of exactly ``chunk_size``; sets ``num_dropped_``."""
        inputs: list[HeadInputs] = []
        texts: list[torch.Tensor] = []
        buffered = 0
        for images, captions in batches:
            inputs.append(head.inputs(images))
            texts.append(encoder.encode_text_batch(encoder.tokenize(captions)).embeds)
            buffered += len(captions)
            while buffered >= self.chunk_size:
                chunk, rest = HeadInputs.concat(inputs).split_at(self.chunk_size)
                text = torch.cat(texts)
                yield chunk, text[:self.chunk_size]
                inputs, texts = [rest], [text[self.chunk_size:]]
                buffered -= self.chunk_size
        self.num_dropped_ = buffered

    def _evidence_lambda(self, head: LastBlockHead, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> float:
        """``lambda`` maximising the evidence summed over the layers (``|theta|^2`` each layer's MAP weight)."""
        weights = head.weights()
        spectra = [FactorSpectrum.from_factors(A, B, float(weights[name].double().pow(2).sum()))
                   for name, (A, B) in factors.items()]
        return optimize_prior_precision(spectra, self.pseudo_data_count, self.objective)


def fit_lastblock_posterior(encoder: ClipEncoder, pairs: PairReader | str | Path, **options) -> LastBlockPosterior:
    """Fit and return the last-block posterior; ``options`` are :class:`LastBlockFitter` arguments."""
    return LastBlockFitter(**options).fit(encoder, pairs).posterior_
