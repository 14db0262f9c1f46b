"""Monte Carlo check of the cosine-moment estimators on a grid of pairs (docs/math.md sections 3 and 7).

For a posterior pair and projections, build image-text pairs whose mean embeddings have a
chosen cosine, draw both embeddings from their Gaussians, and compare every estimator's
mean and std of the cosine with the Monte Carlo ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from bayesretrieval.posterior import KroneckerPosterior, load_bayesvlm_posterior
from bayesretrieval.similarity import CosineEstimator, cosine_moments

DEFAULT_COSINES = (0.95, 0.9, 0.6, 0.3, 0.0, -0.3)
REFERENCE_PAIR_COUNT = 327_680


@dataclass
class GridSetting:
    """One posterior setting of the grid.

    Attributes:
        name: label for reports.
        image: image posterior.
        text: text posterior.
    """

    name: str
    image: KroneckerPosterior
    text: KroneckerPosterior


def random_projection(rows: int, cols: int, squared_norm: float, generator: torch.Generator) -> torch.Tensor:
    """A Gaussian ``(rows, cols)`` matrix rescaled to the given squared Frobenius norm."""
    matrix = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    return matrix * math.sqrt(squared_norm) / matrix.norm()


def _activation_sampler(factor: torch.Tensor, pair_count: int) -> torch.Tensor:
    """Cholesky factor of ``A / sqrt(N)``, the activation covariance the factor implies."""
    cov = factor.to(torch.float64) / math.sqrt(pair_count)
    jitter = 1e-9 * torch.eye(cov.shape[0], dtype=torch.float64)
    return torch.linalg.cholesky((cov + cov.T) / 2 + jitter)


def pair_with_cosine(
    image_chol: torch.Tensor,
    text_chol: torch.Tensor,
    image_projection: torch.Tensor,
    text_projection: torch.Tensor,
    cosine: float,
    activation_scale: float,
    generator: torch.Generator,
    image_pinv: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw realistic activations, then move the image one so the means have ``cosine``.

    The text activation is drawn as is; the image activation gets the minimum-norm change
    that turns its embedding into one at the requested cosine to the text embedding (same
    norm as before).

    Args:
        image_chol: Cholesky factor of the image activation covariance, ``(h_I, h_I)``.
        text_chol: Cholesky factor of the text activation covariance, ``(h_T, h_T)``.
        image_projection: the image projection, ``(h_I, D)``.
        text_projection: the text projection, ``(h_T, D)``.
        cosine: the cosine the two mean embeddings get.
        activation_scale: multiplies both drawn activations.
        generator: the source of the random draws.
        image_pinv: ``pinv(image_projection)`` if already computed.

    Returns:
        ``(image_activation (h_I,), text_activation (h_T,))``.
    """
    if image_pinv is None:
        image_pinv = torch.linalg.pinv(image_projection)
    image_act = activation_scale * image_chol @ torch.randn(
        image_chol.shape[0], generator=generator, dtype=torch.float64
    )
    text_act = activation_scale * text_chol @ torch.randn(
        text_chol.shape[0], generator=generator, dtype=torch.float64
    )
    text_unit = torch.nn.functional.normalize(text_act @ text_projection, dim=0)
    image_mean = image_act @ image_projection
    orthogonal = torch.nn.functional.normalize(image_mean - (image_mean @ text_unit) * text_unit, dim=0)
    target = (cosine * text_unit + math.sqrt(1 - cosine**2) * orthogonal) * image_mean.norm()
    image_act = image_act + (target - image_mean) @ image_pinv
    return image_act, text_act


@dataclass
class NoiseDraws:
    """Shared float64 draws ``W_x ~ N(0, Sigma_x)``, ``W_y ~ N(0, Sigma_y)``, ``(S, D)`` each.

    Precomputes the per-draw products so each cell costs four matrix-vector products.
    """

    noise_x: torch.Tensor
    noise_y: torch.Tensor

    def __post_init__(self):
        self.cross = (self.noise_x * self.noise_y).sum(1)
        self.norm_sq_x = (self.noise_x**2).sum(1)
        self.norm_sq_y = (self.noise_y**2).sum(1)

    @classmethod
    def draw(cls, cov_x: torch.Tensor, cov_y: torch.Tensor, num_draws: int, generator) -> "NoiseDraws":
        """Draw ``num_draws`` pairs from the two covariances."""
        draws = [
            torch.randn(num_draws, cov.shape[0], generator=generator, dtype=torch.float64)
            @ torch.linalg.cholesky(cov).T
            for cov in (cov_x, cov_y)
        ]
        return cls(*draws)


def monte_carlo_cosine(
    mean_x: torch.Tensor, std_x: float, mean_y: torch.Tensor, std_y: float, draws: NoiseDraws
) -> tuple[float, float]:
    """Mean and std of ``cos(mean_x + std_x W_x[s], mean_y + std_y W_y[s])`` over draws ``s``.

    Exact arithmetic on the draws, expanded so no ``(S, D)`` sample matrix is formed.
    """
    x_wx, x_wy = draws.noise_x @ mean_x, draws.noise_y @ mean_x
    y_wx, y_wy = draws.noise_x @ mean_y, draws.noise_y @ mean_y
    dot = mean_x @ mean_y + std_x * y_wx + std_y * x_wy + std_x * std_y * draws.cross
    norm_sq_x = mean_x @ mean_x + 2 * std_x * x_wx + std_x**2 * draws.norm_sq_x
    norm_sq_y = mean_y @ mean_y + 2 * std_y * y_wy + std_y**2 * draws.norm_sq_y
    cos = dot / torch.sqrt(norm_sq_x * norm_sq_y)
    return float(cos.mean()), float(cos.std())


def accuracy_grid(
    settings: Sequence[GridSetting],
    image_projection: torch.Tensor,
    text_projection: torch.Tensor,
    cosines: Sequence[float] = DEFAULT_COSINES,
    activation_scales: Sequence[float] = (1.0, 2.0),
    num_draws: int = 100_000,
    estimators: Sequence[CosineEstimator] = tuple(CosineEstimator),
    pair_count: int = REFERENCE_PAIR_COUNT,
    seed: int = 0,
) -> pd.DataFrame:
    """Compare estimators with Monte Carlo on every (setting, scale, cosine) cell.

    Activations are drawn from ``N(0, A / sqrt(N))`` with ``A`` each posterior's raw
    factor, scaled by each of ``activation_scales``. Draws are float64; one set of
    noise draws per setting is shared by its cells.

    Returns:
        One row per cell and estimator: setting, activation_scale, cosine, estimator,
        mc_mean, mc_std, mean, std, mean_error, std_relative_error.
    """
    generator = torch.Generator().manual_seed(seed)
    image_pinv = torch.linalg.pinv(image_projection)
    rows = []
    for setting in settings:
        image_chol = _activation_sampler(setting.image.factors["A"], pair_count)
        text_chol = _activation_sampler(setting.text.factors["A"], pair_count)
        draws = NoiseDraws.draw(setting.image.output_cov, setting.text.output_cov, num_draws, generator)
        for scale in activation_scales:
            for cosine in cosines:
                image_act, text_act = pair_with_cosine(
                    image_chol, text_chol, image_projection, text_projection, cosine, scale,
                    generator, image_pinv,
                )
                labels = dict(setting=setting.name, activation_scale=scale, cosine=cosine)
                rows += _cell_rows(setting, image_act @ image_projection, image_act,
                                   text_act @ text_projection, text_act, draws, estimators, labels)
    return pd.DataFrame(rows)


def _cell_rows(setting, mean_x, image_act, mean_y, text_act, draws, estimators, labels) -> list[dict]:
    q_x = setting.image.activation_scale(image_act[None])
    q_y = setting.text.activation_scale(text_act[None])
    mc_mean, mc_std = monte_carlo_cosine(mean_x, float(q_x.sqrt()), mean_y, float(q_y.sqrt()), draws)
    rows = []
    for estimator in estimators:
        mean, var = cosine_moments(
            mean_x[None], q_x, setting.image.output_cov, mean_y[None], q_y, setting.text.output_cov, estimator
        )
        std = float(var.sqrt())
        rows.append({
            **labels, "estimator": CosineEstimator(estimator).value, "mc_mean": mc_mean, "mc_std": mc_std,
            "mean": float(mean), "std": std, "mean_error": float(mean) - mc_mean,
            "std_relative_error": std / mc_std - 1,
        })
    return rows


def bayesvlm_grid_settings(bayesvlm_dir: str | Path) -> list[GridSetting]:
    """The three posterior settings of the accuracy grid, from BayesVLM's ViT-B-32 factors.

    (n=1, the JSON's lambdas), (n=10, lambda 2997.9 / 2538.1), (n=1, lambda 300 for both).
    """
    choices = [
        ("n=1, published lambdas", None, None),
        ("n=10, lambda 2997.9/2538.1", 10.0, (2997.9, 2538.1)),
        ("n=1, lambda 300", 1.0, 300.0),
    ]
    return [
        GridSetting(name, *load_bayesvlm_posterior(bayesvlm_dir, n, lam))
        for name, n, lam in choices
    ]


def vit_b32_projections(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ViT-B-32-shaped projections with its squared norms (63.66 image, 42.1 text)."""
    generator = torch.Generator().manual_seed(seed)
    return random_projection(768, 512, 63.66, generator), random_projection(512, 512, 42.1, generator)
