"""``BayesCLIP``: an open_clip model with a Laplace posterior, in BayesVLM-Base's API.

Every embedding and every image-text logit comes with a variance (docs/math.md sections 1-3, 6).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch

from bayesretrieval.encoders import DEFAULT_MODEL, DEFAULT_PRETRAINED, ClipEncoder, Encoded
from bayesretrieval.posterior import KroneckerPosterior, PosteriorPair, load_posterior, posterior_for_model
from bayesretrieval.similarity import (
    DEFAULT_ESTIMATOR,
    CosineEstimator,
    cosine_moments,
    probit_probabilities,
    shared_projection_cosine_moments,
)


class ZeroShotMethod(str, Enum):
    """How class probabilities integrate over the logit uncertainty (docs/math.md section 6)."""

    PROBIT = "probit"
    """Closed form ``softmax(s m / sqrt(1 + pi/8 s^2 v))``."""
    MONTE_CARLO = "montecarlo"
    """Average softmax over draws of both embeddings from the posterior."""


@dataclass
class EmbeddingMoments:
    """Unit-normalised embeddings with delta-method variance.

    Attributes:
        embeds: ``g / |g|``, shape ``(N, D)``.
        embeds_var: diagonal variance of the normalised embedding, shape ``(N, D)``.
        embeds_std: its square root.
        activations: pre-projection activations, shape ``(N, h)``.
        unnormalised: the mean ``g = a @ P``, shape ``(N, D)``.
    """

    embeds: torch.Tensor
    embeds_var: torch.Tensor
    embeds_std: torch.Tensor
    activations: torch.Tensor
    unnormalised: torch.Tensor


@dataclass
class BayesCLIPOutput:
    """Output of :meth:`BayesCLIP.__call__`, with BayesVLM-Base's field names.

    Shapes: ``image_embeds*`` ``(N_images, D)``, ``text_embeds*`` ``(N_texts, D)``,
    ``logits_per_image*`` ``(N_images, N_texts)``, ``logits_per_text*`` its transpose.
    """

    image_embeds: torch.Tensor
    image_embeds_var: torch.Tensor
    image_embeds_std: torch.Tensor
    text_embeds: torch.Tensor
    text_embeds_var: torch.Tensor
    text_embeds_std: torch.Tensor
    logits_per_image: torch.Tensor
    logits_per_image_var: torch.Tensor
    logits_per_image_std: torch.Tensor
    logits_per_text: torch.Tensor
    logits_per_text_var: torch.Tensor
    logits_per_text_std: torch.Tensor


def normalized_embedding_variance(
    means: torch.Tensor, scales: torch.Tensor, output_cov: torch.Tensor
) -> torch.Tensor:
    """Delta-method diagonal variance of ``g / |g|`` for ``g ~ N(mu, q Sigma)``.

    With ``J = (I - ghat ghat^T) / |mu|``, ``Var = q diag(J Sigma J^T)``, i.e. per
    dimension ``q (Sigma_dd - 2 ghat_d (Sigma ghat)_d + ghat_d^2 ghat^T Sigma ghat) / |mu|^2``.

    Args:
        means: ``(N, D)`` unnormalised means.
        scales: ``(N,)`` scales ``q``.
        output_cov: ``(D, D)`` output covariance ``Sigma``.

    Returns:
        ``(N, D)`` float64 variances.
    """
    means = means.to(torch.float64)
    norms = means.norm(dim=1, keepdim=True)
    unit = means / norms
    cov_unit = unit @ output_cov
    along = (cov_unit * unit).sum(1, keepdim=True)
    diag = torch.diagonal(output_cov)[None, :]
    var = diag - 2 * unit * cov_unit + unit**2 * along
    return (scales.to(torch.float64)[:, None] * var / norms**2).clamp_min(0.0)


class BayesCLIP:
    """CLIP with a post-hoc Laplace posterior over its two projections.

    Args:
        encoder: the open_clip encoder.
        posterior: image and text posteriors matching the encoder's projections.
        estimator: how cosine moments are approximated (default: ``second_order``).

    Raises:
        ValueError: if a posterior's shape does not match the model's projection.
    """

    def __init__(
        self,
        encoder: ClipEncoder,
        posterior: PosteriorPair,
        estimator: CosineEstimator | str = DEFAULT_ESTIMATOR,
    ):
        posterior.check_encoder(encoder)
        self.encoder = encoder
        self.posterior = posterior
        self.estimator = CosineEstimator(estimator)

    @classmethod
    def from_pretrained(
        cls,
        model_name: str = DEFAULT_MODEL,
        pretrained: str | Path | None = DEFAULT_PRETRAINED,
        posterior: PosteriorPair | str | Path | None = None,
        device: str = "cpu",
        estimator: CosineEstimator | str = DEFAULT_ESTIMATOR,
        force_posterior: bool = False,
    ) -> "BayesCLIP":
        """Build the model from an open_clip name and a posterior.

        Args:
            model_name: open_clip architecture.
            pretrained: open_clip tag, checkpoint path, or ``None`` for random weights.
            posterior: a ``PosteriorPair`` or a path any of :func:`load_posterior`'s
                formats; required.
            device: where to run the towers.
            estimator: cosine-moment estimator.
            force_posterior: use a posterior fitted for other weights, or one that does not
                say which (logged as a warning).

        Raises:
            PosteriorMismatchError: the posterior belongs to other weights (unless forced).
        """
        if posterior is None:
            raise ValueError("a posterior is required: a PosteriorPair or a path to one")
        if not isinstance(posterior, PosteriorPair):
            posterior = load_posterior(posterior)
        encoder = ClipEncoder.from_pretrained(model_name, pretrained, device=device)
        posterior.check_encoder(encoder)
        return cls(encoder, posterior_for_model(posterior, encoder.identity, force_posterior), estimator)

    @property
    def logit_scale(self) -> float:
        """``s``, the model's exponentiated logit scale."""
        return self.encoder.logit_scale

    def _moments(self, encoded: Encoded, posterior: KroneckerPosterior) -> EmbeddingMoments:
        means = encoded.embeds.to(torch.float64)
        var = normalized_embedding_variance(
            means, posterior.activation_scale(encoded.activations), posterior.output_cov
        )
        unit = means / means.norm(dim=1, keepdim=True)
        return EmbeddingMoments(unit, var, var.sqrt(), encoded.activations, encoded.embeds)

    def get_image_features(self, pixel_values: torch.Tensor, batch_size: int = 256) -> EmbeddingMoments:
        """Image embeddings with variance, for preprocessed images ``(N, 3, H, W)``."""
        return self._moments(self.encoder.encode_images(pixel_values, batch_size), self.posterior.image)

    def get_text_features(self, texts, batch_size: int = 256) -> EmbeddingMoments:
        """Text embeddings with variance, for strings or token ids ``(N, L)``."""
        return self._moments(self.encoder.encode_texts(texts, batch_size), self.posterior.text)

    def logit_moments(
        self, images: EmbeddingMoments, texts: EmbeddingMoments
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of ``s * cos`` for all image-text pairs, ``(N_images, N_texts)``."""
        mean, var = cosine_moments(
            images.unnormalised,
            self.posterior.image.activation_scale(images.activations),
            self.posterior.image.output_cov,
            texts.unnormalised,
            self.posterior.text.activation_scale(texts.activations),
            self.posterior.text.output_cov,
            self.estimator,
        )
        scale = self.logit_scale
        return mean * scale, var * scale**2

    def image_similarity(
        self, images_a: EmbeddingMoments, images_b: EmbeddingMoments
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of the cosine for all image-image pairs, ``(N_a, N_b)``.

        Both images pass through the one uncertain image projection, so their noises are
        correlated (docs/math.md section 12): an image compared with itself gets cosine 1
        with variance 0.
        """
        return shared_projection_cosine_moments(images_a.unnormalised, images_a.activations,
                                                images_b.unnormalised, images_b.activations, self.posterior.image)

    def __call__(self, pixel_values: torch.Tensor, input_ids) -> BayesCLIPOutput:
        """Embeddings and logits with uncertainty for images ``(N, 3, H, W)`` and texts."""
        images = self.get_image_features(pixel_values)
        texts = self.get_text_features(input_ids)
        mean, var = self.logit_moments(images, texts)
        std = var.sqrt()
        return BayesCLIPOutput(
            images.embeds, images.embeds_var, images.embeds_std,
            texts.embeds, texts.embeds_var, texts.embeds_std,
            mean, var, std, mean.T, var.T, std.T,
        )

    def zero_shot_probabilities(
        self,
        pixel_values: torch.Tensor,
        class_texts,
        method: ZeroShotMethod | str = ZeroShotMethod.PROBIT,
        num_samples: int = 1000,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Class probabilities ``p(c | image)``, shape ``(N_images, N_classes)`` (docs/math.md s.6).

        Args:
            pixel_values: preprocessed images.
            class_texts: one prompt per class.
            method: a :class:`ZeroShotMethod` or its name.
            num_samples: Monte Carlo draws.
            generator: random generator for Monte Carlo.
        """
        images = self.get_image_features(pixel_values)
        texts = self.get_text_features(class_texts)
        if ZeroShotMethod(method) is ZeroShotMethod.PROBIT:
            return probit_probabilities(*self.logit_moments(images, texts))
        return self._monte_carlo_probabilities(images, texts, num_samples, generator)

    def _monte_carlo_probabilities(self, images, texts, num_samples, generator) -> torch.Tensor:
        image_draws = _draw(images, self.posterior.image, num_samples, generator)
        text_draws = _draw(texts, self.posterior.text, num_samples, generator)
        logits = self.logit_scale * torch.einsum(
            "sid,scd->sic",
            torch.nn.functional.normalize(image_draws, dim=-1),
            torch.nn.functional.normalize(text_draws, dim=-1),
        )
        return torch.softmax(logits, dim=-1).mean(0)


def _draw(moments: EmbeddingMoments, posterior: KroneckerPosterior, num_samples: int, generator):
    """Draw ``(S, N, D)`` samples of ``g ~ N(mu, q Sigma_B)``."""
    means = moments.unnormalised.to(torch.float64)
    scales = posterior.activation_scale(moments.activations).sqrt()
    chol = torch.linalg.cholesky(posterior.output_cov)
    noise = torch.randn(num_samples, *means.shape, dtype=torch.float64, generator=generator)
    return means + scales[None, :, None] * (noise @ chol.T)

