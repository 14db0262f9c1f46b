"""Laplace posterior over the image tower's last block and projection; per-item covariances (docs/math.md s. 13).

Every covered layer ``l`` (:class:`~bayesretrieval.posterior.lastblock.BlockScope`) has its
own matrix-normal posterior over its weight as an ``(in, out)`` matrix (bias as the last
row), independent of the other layers: input-side covariance ``A_l^-1``, output-side
``Sigma_l``, both built from curvature factors exactly as the projection posterior's
(``P_A = sqrt(n) A + sqrt(lambda) I``, one ``n`` and ``lambda`` for all layers). The
linearised embedding of an item then has covariance

    S = J Sigma_theta J^T = sum_l q_l J_l Sigma_l J_l^T,    q_l = a~_l^T A_l^-1 a~_l

with ``J_l = dg/ds_l`` the Jacobian of the embedding with respect to layer ``l``'s output
and ``a~_l`` its input. For the projection ``J = I`` and the term is the projection
posterior's ``q Sigma_B``. The index stores ``S`` as ``diag`` or ``lowrank:R`` columns
(:func:`covariance_factors`, the convention of :mod:`bayesretrieval.store.format`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from bayesretrieval.atomic import publish_directory
from bayesretrieval.encoders import ClipEncoder, ModelIdentity
from bayesretrieval.posterior.kronecker import KroneckerPosterior, Modality
from bayesretrieval.posterior.lastblock import BlockScope, HeadLinearisation, LastBlockHead
from bayesretrieval.store.format import CovarianceForm, VarianceSpec

FORMAT_VERSION = 1
TENSORS_FILE = "lastblock.safetensors"
METADATA_FILE = "lastblock.json"


@dataclass
class LastBlockPosterior:
    """Block-diagonal Kronecker posterior over the last block's covered layers and the projection.

    Attributes:
        layers: per covered layer (``scope.layers`` order), its :class:`KroneckerPosterior`
            over the ``(in, out)`` weight, with the raw factors.
        scope: which layers are covered.
        num_pairs: ``N``, the pairs the factors were estimated from.
        source: where the factors came from.
        model: the weights they belong to, if known.
    """

    layers: dict[str, KroneckerPosterior]
    scope: BlockScope
    num_pairs: int
    source: str = "unknown"
    model: ModelIdentity | None = None

    @classmethod
    def from_factors(cls, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], pseudo_data_count: float,
                     prior_precision: float, scope: BlockScope | str, num_pairs: int, source: str = "unknown",
                     model: ModelIdentity | None = None) -> "LastBlockPosterior":
        """Build every layer's posterior from its ``(A, B)`` with one ``n`` and ``lambda`` (docs/math.md s. 2).

        Raises:
            ValueError: if ``factors`` does not hold exactly the scope's layers.
        """
        scope = BlockScope(scope)
        if set(factors) != set(scope.layers):
            raise ValueError(f"scope {scope.value} covers layers {list(scope.layers)}, factors hold {list(factors)}")
        layers = {name: KroneckerPosterior.from_factors(*factors[name], pseudo_data_count, prior_precision,
                                                        Modality.IMAGE) for name in scope.layers}
        return cls(layers, scope, num_pairs, source, model)

    def raw_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, ``(A, B)`` before the prior."""
        return {name: (layer.factors["A"], layer.factors["B"]) for name, layer in self.layers.items()}

    def with_prior(self, pseudo_data_count: float | None = None,
                   prior_precision: float | None = None) -> "LastBlockPosterior":
        """Rebuild from the raw factors with another ``n`` and/or ``lambda``."""
        n = self.pseudo_data_count if pseudo_data_count is None else pseudo_data_count
        lam = self.prior_precision if prior_precision is None else prior_precision
        return LastBlockPosterior.from_factors(self.raw_factors(), n, lam, self.scope, self.num_pairs, self.source,
                                               self.model)

    @property
    def pseudo_data_count(self) -> float:
        """``n``, shared by all layers."""
        return next(iter(self.layers.values())).pseudo_data_count

    @property
    def prior_precision(self) -> float:
        """``lambda``, shared by all layers."""
        return next(iter(self.layers.values())).prior_precision

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 over what :meth:`save` writes: scope, raw factors, ``n`` and ``lambda`` (content identity).

        The inverses are rebuilt on every load (their float rounding depends on threads and
        device), so they are not hashed.
        """
        digest = hashlib.sha256(self.scope.value.encode())
        for name, (A, B) in self.raw_factors().items():
            digest.update(name.encode())
            for factor in (A, B):
                digest.update(factor.detach().cpu().contiguous().numpy().tobytes())
        digest.update(repr((self.pseudo_data_count, self.prior_precision)).encode())
        return digest.hexdigest()

    def identity(self) -> dict:
        """JSON-ready description: scope, source, fingerprint, ``n``, ``lambda``, pairs and model."""
        return {"scope": self.scope.value, "source": self.source, "fingerprint": self.fingerprint,
                "pseudo_data_count": self.pseudo_data_count, "prior_precision": self.prior_precision,
                "num_pairs": self.num_pairs, "model": self.model.to_dict() if self.model else None}

    def check_head(self, head: LastBlockHead) -> None:
        """Raise ``ValueError`` if the head's scope or layer shapes differ from the posterior's."""
        if head.scope is not self.scope:
            raise ValueError(f"posterior covers scope {self.scope.value}, head has {head.scope.value}")
        for name, weight in head.weights().items():
            self.layers[name].check_projection(tuple(weight.shape), f"{head.encoder.identity.model_name} {name}")

    def save(self, directory: str | Path) -> Path:
        """Write the raw factors and the prior to ``directory`` atomically (safetensors + JSON)."""
        tensors = {f"{name}.{key}": factor.contiguous() for name, pair in self.raw_factors().items()
                   for key, factor in zip("AB", pair)}
        metadata = {"format_version": FORMAT_VERSION, "scope": self.scope.value, "num_pairs": self.num_pairs,
                    "source": self.source, "model": self.model.to_dict() if self.model else None,
                    "pseudo_data_count": self.pseudo_data_count, "prior_precision": self.prior_precision}

        def write(staging: Path) -> None:
            save_file(tensors, str(staging / TENSORS_FILE))
            (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2))

        publish_directory(Path(directory), write)
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path) -> "LastBlockPosterior":
        """Read what :meth:`save` wrote, checking the format version."""
        directory = Path(directory)
        metadata = json.loads((directory / METADATA_FILE).read_text())
        if metadata.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{directory}: last-block posterior format version {metadata.get('format_version')}, "
                             f"this library reads version {FORMAT_VERSION}")
        tensors = load_file(str(directory / TENSORS_FILE))
        scope = BlockScope(metadata["scope"])
        factors = {name: (tensors[f"{name}.A"], tensors[f"{name}.B"]) for name in scope.layers}
        model = ModelIdentity.from_dict(metadata["model"]) if metadata.get("model") else None
        return cls.from_factors(factors, metadata["pseudo_data_count"], metadata["prior_precision"], scope,
                                metadata["num_pairs"], metadata["source"], model)


def embedding_covariance(posterior: LastBlockPosterior, linearisation: HeadLinearisation) -> torch.Tensor:
    """``S = sum_l q_l J_l Sigma_l J_l^T`` per item, ``(N, D, D)`` float64 (docs/math.md section 13)."""
    total = None
    for name, layer in posterior.layers.items():
        scales = layer.activation_scale(linearisation.inputs[name])
        jacobian = linearisation.jacobians[name].to(layer.output_cov.device, torch.float64)
        term = scales[:, None, None] * (jacobian @ layer.output_cov @ jacobian.transpose(1, 2))
        total = term if total is None else total + term
    return (total + total.transpose(1, 2)) / 2


@dataclass
class CovarianceFactors:
    """Per-item covariance columns in the index's convention (:class:`~bayesretrieval.store.format.CovarianceForm`).

    ``diag``: ``S_i = diag(d_i)``; ``lowrank``: ``S_i ~= L_i^T L_i + diag(d_i)``, ``L_i`` the
    top-``r`` eigenpairs ``sqrt(lambda_j) v_j`` of ``S_i`` and ``d_i`` the rest of its diagonal.

    Attributes:
        variance_diag: ``d``, ``(N, D)`` float32.
        variance_lowrank: ``L``, ``(N, r, D)`` float32, or ``None`` for ``diag``.
    """

    variance_diag: np.ndarray
    variance_lowrank: np.ndarray | None = None

    def nbytes_per_item(self) -> int:
        """Bytes one item's columns take (float32)."""
        per_row = [a[0].nbytes for a in (self.variance_diag, self.variance_lowrank) if a is not None]
        return int(sum(per_row))


def covariance_factors(covariance: torch.Tensor, variance: VarianceSpec | str) -> CovarianceFactors:
    """Truncate per-item covariances ``(N, D, D)`` to the ``diag`` or ``lowrank:R`` columns.

    The diagonal of ``L^T L + diag(d)`` equals ``diag(S)`` exactly; the off-diagonal part
    of ``S`` outside the top ``R`` eigenpairs is dropped.

    Raises:
        ValueError: for ``kfac`` (the last-block covariance has no per-item scalar form) or
            a rank above ``D``.
    """
    variance = VarianceSpec.parse(variance)
    if variance.form is CovarianceForm.KFAC:
        raise ValueError("the last-block posterior's item covariance is not q * Sigma_I; use diag or lowrank:R")
    covariance = covariance.to(torch.float64)
    diagonal = torch.diagonal(covariance, dim1=1, dim2=2)
    if variance.form is CovarianceForm.DIAG:
        return CovarianceFactors(diagonal.float().numpy())
    if variance.rank > covariance.shape[1]:
        raise ValueError(f"variance rank {variance.rank} exceeds the embedding dimension {covariance.shape[1]}")
    eigvals, eigvecs = torch.linalg.eigh(covariance)
    top_vals, top_vecs = eigvals[:, -variance.rank:], eigvecs[:, :, -variance.rank:]
    lowrank = top_vals.clamp_min(0).sqrt()[:, :, None] * top_vecs.transpose(1, 2)
    residual = (diagonal - (lowrank * lowrank).sum(1)).clamp_min(0)
    return CovarianceFactors(residual.float().numpy(), lowrank.float().numpy())


def item_covariance(encoder: ClipEncoder, posterior: LastBlockPosterior, images: torch.Tensor,
                    variance: VarianceSpec | str, batch_size: int = 64
                    ) -> tuple[torch.Tensor, torch.Tensor, CovarianceFactors]:
    """Mean embeddings and covariance columns of preprocessed images under the last-block posterior.

    The entry point for index building and benchmarks: one tower pass, then the head's
    Jacobians and :func:`embedding_covariance` per batch of ``batch_size``.

    Args:
        encoder: the open_clip encoder the posterior was fitted for.
        posterior: the fitted :class:`LastBlockPosterior`.
        images: preprocessed images ``(N, 3, H, W)``.
        variance: ``"diag"`` or ``"lowrank:R"`` (a :class:`VarianceSpec`).
        batch_size: images per Jacobian batch (memory ``O(batch_size D (w + 4w))``).

    Returns:
        ``(means, activations, factors)``: the unnormalised MAP embeddings ``(N, D)``
        float32 (the linearised model's mean), the pre-projection activations ``(N, h)``
        float32 (the projection's input, what the projection posterior's scalars need) and
        the :class:`CovarianceFactors`.
    """
    head = LastBlockHead(encoder, posterior.scope)
    posterior.check_head(head)
    means, activations, parts = [], [], []
    for batch in images.split(batch_size):
        linearisation = head.linearise(head.inputs(batch))
        means.append(linearisation.embeds.float().cpu())
        activations.append(linearisation.inputs["proj"].float().cpu())
        parts.append(covariance_factors(embedding_covariance(posterior, linearisation), variance))
    lowrank = None if parts[0].variance_lowrank is None else np.concatenate([p.variance_lowrank for p in parts])
    factors = CovarianceFactors(np.concatenate([p.variance_diag for p in parts]), lowrank)
    return torch.cat(means), torch.cat(activations), factors
