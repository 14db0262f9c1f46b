"""Two images through one uncertain projection: their cosine's moments against Monte Carlo.

The reference samples the projection's noise matrix ``E ~ MN(0, A^-1, Sigma_B)`` itself
and passes both activations through the same draw.
"""

import numpy as np
import pytest
import torch
from reference import random_spd

from bayesretrieval.posterior import KroneckerPosterior
from bayesretrieval.similarity import cosine_moments, shared_projection_cosine_moments

H = D = 32
DRAWS, CHUNK = 40_000, 5_000


@pytest.fixture(scope="module")
def setting():
    """A posterior, an activation, a projection scaled so that q tr(Sigma) / |mu|^2 = 0.1 (ViT-B-32 is near 0.11)."""
    g = torch.Generator().manual_seed(0)
    posterior = KroneckerPosterior.from_factors(random_spd(H, g), random_spd(D, g), 1.0, 5.0, "image")
    base = torch.randn(1, H, generator=g, dtype=torch.float64)
    projection = torch.randn(H, D, generator=g, dtype=torch.float64)
    noise = float(posterior.activation_scale(base)) * float(torch.trace(posterior.output_cov))
    projection *= (noise / 0.1) ** 0.5 / float((base @ projection).norm())
    return posterior, base, projection, torch.randn(1, H, generator=g, dtype=torch.float64)


def monte_carlo(posterior, activations, means, seed=1):
    """Mean and std of cos(x_0, x_1) with one sampled noise matrix per draw for both rows."""
    g = torch.Generator().manual_seed(seed)
    left = torch.linalg.cholesky(posterior.a_inv.double())
    right = torch.linalg.cholesky(posterior.output_cov.double())
    cosines = []
    for _ in range(DRAWS // CHUNK):
        noise = left @ torch.randn(CHUNK, H, D, generator=g, dtype=torch.float64) @ right.T
        x = means[None] + torch.einsum("ih,nhd->nid", activations, noise)
        x = x / x.norm(dim=2, keepdim=True)
        cosines.append((x[:, 0] * x[:, 1]).sum(1))
    cosines = torch.cat(cosines)
    return float(cosines.mean()), float(cosines.std())


def test_an_image_compared_with_itself_has_cosine_one_and_no_variance(setting):
    posterior, base, projection, _ = setting
    activations = torch.cat([base, 2 * base[:1].flip(1), base])
    mean, var = shared_projection_cosine_moments(activations @ projection, activations, activations @ projection,
                                                 activations, posterior)
    np.testing.assert_allclose(torch.diagonal(mean), 1.0, atol=1e-12)
    assert float(torch.diagonal(var).sqrt().max()) < 1e-6 and float(var[0, 2].sqrt()) < 1e-6
    _, independent = cosine_moments(activations @ projection, posterior.activation_scale(activations),
                                    posterior.output_cov, activations @ projection,
                                    posterior.activation_scale(activations), posterior.output_cov)
    assert float(independent[0, 0].sqrt()) > 1e-3  # treating them as independent is what was wrong


@pytest.mark.parametrize("step", [0.01, 0.1, 0.3, 1.0])
def test_near_duplicates_agree_with_monte_carlo(setting, step):
    posterior, base, projection, direction = setting
    activations = torch.cat([base, base + step * direction * base.norm() / direction.norm()])
    means = activations @ projection
    mean, var = shared_projection_cosine_moments(means[:1], activations[:1], means[1:], activations[1:], posterior)
    mc_mean, mc_std = monte_carlo(posterior, activations, means)
    standard_error = mc_std / DRAWS**0.5
    assert 1 - float(mean) == pytest.approx(1 - mc_mean, rel=0.03, abs=4 * standard_error)
    assert float(var.sqrt()) == pytest.approx(mc_std, rel=0.05)
