"""Cosine-moment estimators: decomposition, references, compatibility contract."""

import numpy as np
import pytest
import reference
import torch
from scipy.special import softmax

from bayesretrieval import probabilistic_logits
from bayesretrieval.posterior import KroneckerPosterior
from bayesretrieval.similarity import (
    CosineEstimator,
    CovarianceConstants,
    best_match_probabilities,
    cosine_moments,
    cosine_moments_from_statistics,
    pair_terms,
    probit_probabilities,
    side_statistics,
)

PAIR_REFERENCES = {
    CosineEstimator.KRONECKER: reference.probcosine_pair,
    CosineEstimator.DELTA: reference.delta_pair,
    CosineEstimator.SECOND_ORDER: reference.second_order_pair,
}


@pytest.fixture
def gaussians():
    gen = torch.Generator().manual_seed(0)
    dim = 12
    return dict(
        means_x=torch.randn(7, dim, generator=gen, dtype=torch.float64),
        scales_x=torch.rand(7, generator=gen, dtype=torch.float64) + 0.2,
        cov_x=reference.random_spd(dim, gen, 0.05),
        means_y=torch.randn(4, dim, generator=gen, dtype=torch.float64),
        scales_y=torch.rand(4, generator=gen, dtype=torch.float64) + 0.2,
        cov_y=reference.random_spd(dim, gen, 0.05),
    )


@pytest.mark.parametrize("estimator", list(PAIR_REFERENCES))
def test_decomposed_moments_equal_direct_per_pair_formula(gaussians, estimator):
    g = gaussians
    mean, var = cosine_moments(**g, estimator=estimator)
    for i in range(len(g["means_x"])):
        for j in range(len(g["means_y"])):
            ref_mean, ref_var = PAIR_REFERENCES[estimator](
                g["means_x"][i], g["scales_x"][i] * g["cov_x"], g["means_y"][j], g["scales_y"][j] * g["cov_y"]
            )
            torch.testing.assert_close(mean[i, j], ref_mean, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(var[i, j], ref_var, rtol=1e-10, atol=1e-16)


def test_published_is_kronecker_with_diagonal_covariances(gaussians):
    g = dict(gaussians)
    published = cosine_moments(**g, estimator="published")
    g["cov_x"], g["cov_y"] = torch.diag(torch.diagonal(g["cov_x"])), torch.diag(torch.diagonal(g["cov_y"]))
    kronecker = cosine_moments(**g, estimator="kronecker")
    torch.testing.assert_close(published, kronecker)


def test_statistics_path_equals_direct_computation(gaussians):
    g = gaussians
    x = side_statistics(g["means_x"], g["scales_x"], g["cov_x"], g["cov_y"])
    y = side_statistics(g["means_y"], g["scales_y"], g["cov_y"], g["cov_x"])
    pair = pair_terms(g["means_x"], g["means_y"], g["cov_x"], g["cov_y"])
    constants = CovarianceConstants.from_covariances(g["cov_x"], g["cov_y"])
    stored = cosine_moments_from_statistics(x, y, pair, constants)
    torch.testing.assert_close(stored, cosine_moments(**g))


def test_unknown_estimator_is_rejected(gaussians):
    with pytest.raises(ValueError, match="not a valid CosineEstimator"):
        cosine_moments(**gaussians, estimator="exact")


def _posterior(gen, h, dim, modality):
    return KroneckerPosterior.from_factors(
        reference.random_spd(h, gen), reference.random_spd(dim, gen), 1.0, 50.0, modality
    )


def test_probabilistic_logits_published_matches_bayesvlm_probcosine():
    gen = torch.Generator().manual_seed(1)
    h_i, h_t, dim = 10, 8, 6
    image_post, text_post = _posterior(gen, h_i, dim, "image"), _posterior(gen, h_t, dim, "text")
    image_act = torch.randn(5, h_i, generator=gen, dtype=torch.float64)
    text_act = torch.randn(3, h_t, generator=gen, dtype=torch.float64)
    image_mean = torch.randn(5, dim, generator=gen, dtype=torch.float64)
    text_mean = torch.randn(3, dim, generator=gen, dtype=torch.float64)
    mean, var = probabilistic_logits(
        image_mean, image_act, image_post, text_mean, text_act, text_post, logit_scale=100.0
    )
    ref_mean, ref_var = reference.bayesvlm_probcosine(
        image_mean, image_post.embedding_variance(image_act), text_mean, text_post.embedding_variance(text_act)
    )
    torch.testing.assert_close(mean, 100 * ref_mean, rtol=1e-5, atol=0)
    torch.testing.assert_close(var, 100**2 * ref_var, rtol=1e-5, atol=0)
    as_numpy = probabilistic_logits(
        image_mean.numpy(), image_act.numpy(), image_post, text_mean.numpy(), text_act.numpy(), text_post
    )
    assert all(isinstance(a, np.ndarray) and a.shape == (5, 3) for a in as_numpy)
    np.testing.assert_allclose(as_numpy[1], var.numpy(), rtol=1e-12)


def test_best_match_probabilities_sum_to_one_per_query_and_ignore_a_common_shift():
    rng = np.random.default_rng(3)
    groups = np.repeat([4, 0, 7], [5, 1, 3])  # contiguous, any labels, unequal sizes
    mean, var = rng.normal(10, 3, groups.size), rng.uniform(0, 20, groups.size)
    p = best_match_probabilities(groups, mean, var)
    assert p[groups == 0] == pytest.approx([1.0])
    for g in (4, 7):
        assert p[groups == g].sum() == pytest.approx(1.0)
    np.testing.assert_allclose(best_match_probabilities(groups, mean - 25.0, var), p, rtol=1e-12)
    np.testing.assert_allclose(best_match_probabilities(groups, mean, var, block=4), p, rtol=1e-12)
    without_noise = best_match_probabilities(groups, mean, np.zeros_like(var))
    np.testing.assert_allclose(without_noise[groups == 4], softmax(mean[groups == 4]), rtol=1e-12)
    assert best_match_probabilities(np.zeros(0), np.zeros(0), np.zeros(0)).shape == (0,)


@pytest.mark.parametrize("seed", range(3))
def test_best_match_probability_is_close_to_the_monte_carlo_softmax_of_gaussian_logits(seed):
    rng = np.random.default_rng(seed)
    mean, var = rng.normal(20.0, 1.5, 10), rng.uniform(0.0, 4.0, 10)  # cosine-like logits: far from zero
    g = torch.Generator().manual_seed(seed)
    draws = torch.tensor(mean) + torch.tensor(var).sqrt() * torch.randn(200_000, 10, generator=g, dtype=torch.float64)
    monte_carlo = torch.softmax(draws, dim=1).mean(0).numpy()
    pairwise = best_match_probabilities(np.zeros(10), mean, var)
    per_logit = probit_probabilities(torch.tensor(mean), torch.tensor(var)).numpy()
    assert np.abs(pairwise - monte_carlo).max() < 0.1
    assert np.abs(pairwise - monte_carlo).max() < np.abs(per_logit - monte_carlo).max()
