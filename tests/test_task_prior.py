"""Choosing n and lambda by the held-out retrieval likelihood (the probit softmax over a batch)."""

import numpy as np
import pytest
import torch
from conftest import random_posterior
from scipy import special

from bayesretrieval.posterior import KroneckerPosterior, PosteriorPair
from bayesretrieval.posterior.task_prior import HeldOutPairs, retrieval_log_likelihood, tune_prior

D, H, N = 8, 12, 40


def held_out(seed=0, noise=0.6):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(N, D, generator=g, dtype=torch.float64)
    texts = images + noise * torch.randn(N, D, generator=g, dtype=torch.float64)  # caption i matches image i
    return HeldOutPairs(images, torch.randn(N, H, generator=g, dtype=torch.float64), texts,
                        torch.randn(N, H, generator=g, dtype=torch.float64))


def test_without_posterior_noise_it_is_the_softmax_likelihood_of_the_mean_cosines():
    pairs, s = held_out(), 7.0
    certain = random_posterior(D, H)
    certain = PosteriorPair(*(side.with_prior(1.0, 1e16) for side in certain))
    x = pairs.image_means.numpy() / np.linalg.norm(pairs.image_means.numpy(), axis=1, keepdims=True)
    y = pairs.text_means.numpy() / np.linalg.norm(pairs.text_means.numpy(), axis=1, keepdims=True)
    expected = np.mean(np.diag(special.log_softmax(s * x @ y.T, axis=0)))
    assert retrieval_log_likelihood(certain, pairs, s) == pytest.approx(expected, rel=1e-6)


def test_more_posterior_noise_flattens_the_softmax():
    pairs, posterior = held_out(noise=0.1), random_posterior(D, H)
    values = [retrieval_log_likelihood(PosteriorPair(*(side.with_prior(1.0, lam) for side in posterior)), pairs, 30.0)
              for lam in (1e6, 1e2, 1.0, 1e-2)]
    assert values == sorted(values, reverse=True) and values[0] - values[-1] > 0.1


def test_tuning_takes_the_grids_best_and_rebuilds_both_towers():
    pairs, posterior = held_out(seed=1), random_posterior(D, H, seed=3)
    factors = (0.01, 1.0, 100.0)
    tuned, report = tune_prior(posterior, pairs, 20.0, factors)
    cells = {(c["n_factor"], c["lambda_factor"]): c["log_likelihood"] for c in report["grid"]}
    assert len(cells) == 9 and report["log_likelihood"] == max(cells.values()) >= report["evidence_log_likelihood"]
    assert report["evidence_log_likelihood"] == pytest.approx(cells[(1.0, 1.0)])
    fn, fl = report["n_factor"], report["lambda_factor"]
    for old, new in zip(posterior, tuned):
        assert new.pseudo_data_count == pytest.approx(old.pseudo_data_count * fn)
        assert new.prior_precision == pytest.approx(old.prior_precision * fl)
        rebuilt = old.with_prior(old.pseudo_data_count * fn, old.prior_precision * fl)
        torch.testing.assert_close(new.output_cov, rebuilt.output_cov)
    assert retrieval_log_likelihood(tuned, pairs, 20.0) == pytest.approx(report["log_likelihood"])
    assert tuned.source.endswith("task-prior") and tuned.reference is None


def test_a_posterior_without_curvature_factors_cannot_be_tuned():
    bare = KroneckerPosterior(torch.eye(H, dtype=torch.float64), torch.eye(D, dtype=torch.float64), "image")
    with pytest.raises(ValueError, match="raw curvature factors"):
        tune_prior(PosteriorPair(bare, bare), held_out(), 10.0, (1.0,))
