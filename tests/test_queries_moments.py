"""Cosine moments of each item covariance form: exact identities and Monte Carlo checks."""

import numpy as np
import pytest
import torch
from reference import monte_carlo_cosine, random_spd

from bayesretrieval.posterior import KroneckerPosterior, PosteriorPair
from bayesretrieval.queries.uncertainty import ModelCovariances, PairMoments, QuerySide, pair_moments
from bayesretrieval.similarity import cosine_moments
from bayesretrieval.store import ItemRows, ItemScalars
from bayesretrieval.store.format import SCALAR_COLUMNS

D = 12


def posterior_pair(noise: float = 1.0) -> PosteriorPair:
    g = torch.Generator().manual_seed(3)
    image = KroneckerPosterior(random_spd(6, g), random_spd(D, g, scale=noise), "image")
    text = KroneckerPosterior(random_spd(5, g), random_spd(D, g, scale=noise), "text")
    return PosteriorPair(image, text, source="test")


def stored_scalars(means, scales, posterior):
    """The six stored scalars, written out with full and diagonal matrices."""
    si, st = posterior.image.output_cov, posterior.text.output_cov
    quad = lambda s: ((means @ s) * means).sum(1)  # noqa: E731
    cols = [scales, (means**2).sum(1), quad(si), quad(st),
            quad(torch.diag(si.diagonal())), quad(torch.diag(st.diagonal()))]
    assert len(cols) == len(SCALAR_COLUMNS)
    return torch.stack(cols, 1).numpy()


def one_per_query(means, scalars, diag=None, lowrank=None):
    """Every item for each of the 3 queries, query by query: item ``j`` of query ``i`` is pair ``i n + j``."""
    tile = lambda a: None if a is None else np.concatenate([np.asarray(a)] * 3)  # noqa: E731
    return ItemRows(np.tile(np.arange(len(means)), 3), tile(means), ItemScalars.from_table(tile(scalars)),
                    tile(diag), tile(lowrank))


def all_pairs_moments(query, items, covs, form, estimator):
    """:func:`pair_moments` of :func:`one_per_query` pairs, as ``(3, n)``."""
    flat = pair_moments(query, np.repeat(np.arange(3), len(items.item_ids) // 3), items, covs, form, estimator)
    return PairMoments(*(values.reshape(3, -1) for values in vars(flat).values()))


def random_setup(seed=0, n=7, noise=1.0, modality="text"):
    g = torch.Generator().manual_seed(seed)
    posterior = posterior_pair(noise)
    means = torch.randn(n, D, generator=g, dtype=torch.float64)
    scales = torch.rand(n, generator=g, dtype=torch.float64) * 0.05 + 0.01
    q_means = torch.randn(3, D, generator=g, dtype=torch.float64)
    q_scales = torch.rand(3, generator=g, dtype=torch.float64) * 0.05 + 0.01
    return posterior, means, scales, q_means, q_scales


@pytest.mark.parametrize("estimator", ["second_order", "published", "kronecker", "delta"])
@pytest.mark.parametrize("modality", ["text", "image"])
def test_kfac_form_equals_dense_all_pairs(estimator, modality):
    posterior, means, scales, q_means, q_scales = random_setup()
    covs = ModelCovariances.from_posterior(posterior, modality, estimator)
    query = QuerySide.build(q_means, q_scales, covs)
    got = all_pairs_moments(query, one_per_query(means, stored_scalars(means, scales, posterior)), covs, "kfac",
                            estimator)
    query_cov = posterior.text.output_cov if modality == "text" else posterior.image.output_cov
    mean, var = cosine_moments(means, scales, posterior.image.output_cov, q_means, q_scales, query_cov, estimator)
    torch.testing.assert_close(got.mean, mean.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.var, var.T, rtol=1e-10, atol=1e-15)
    plain = (q_means @ means.T) / (q_means.norm(dim=1)[:, None] * means.norm(dim=1)[None, :])
    torch.testing.assert_close(got.map_cosine, plain)


@pytest.mark.parametrize("estimator", ["second_order", "published", "delta"])
def test_per_item_forms_reduce_to_kfac(estimator):
    """Diag with ``q diag(Sigma_I)`` is the diagonal-covariance KFAC; full-rank lowrank is KFAC."""
    posterior, means, scales, q_means, q_scales = random_setup(1)
    scalars = stored_scalars(means, scales, posterior)
    sigma = posterior.image.output_cov
    eigvals, eigvecs = torch.linalg.eigh(sigma)
    factor = scales[:, None, None] ** 0.5 * (eigvals.sqrt()[:, None] * eigvecs.T)[None]
    covs = ModelCovariances.from_posterior(posterior, "text", estimator)
    query = QuerySide.build(q_means, q_scales, covs)
    kfac = all_pairs_moments(query, one_per_query(means, scalars), covs, "kfac", estimator)
    lowrank = all_pairs_moments(query, one_per_query(means, scalars, torch.zeros(7, D), factor), covs, "lowrank",
                                estimator)
    torch.testing.assert_close(lowrank.mean, kfac.mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lowrank.var, kfac.var, rtol=1e-8, atol=1e-14)
    diag_posterior = PosteriorPair(posterior.image.diagonal(), posterior.text, source="diag")
    diag_covs = ModelCovariances.from_posterior(diag_posterior, "text", estimator)
    diag_query = QuerySide.build(q_means, q_scales, diag_covs)
    diag_kfac = all_pairs_moments(diag_query, one_per_query(means, stored_scalars(means, scales, diag_posterior)),
                                  diag_covs, "kfac", estimator)
    diag = all_pairs_moments(diag_query, one_per_query(means, scalars, scales[:, None] * sigma.diagonal()[None]),
                             diag_covs, "diag", estimator)
    torch.testing.assert_close(diag.mean, diag_kfac.mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(diag.var, diag_kfac.var, rtol=1e-8, atol=1e-14)


def per_item_cholesky(form, diag, lowrank, i):
    cov = torch.diag(torch.as_tensor(diag[i], dtype=torch.float64))
    if form == "lowrank":
        low = torch.as_tensor(lowrank[i], dtype=torch.float64)
        cov = cov + low.T @ low
    return torch.linalg.cholesky(cov)


@pytest.mark.parametrize("form", ["kfac", "diag", "lowrank"])
@pytest.mark.parametrize("modality", ["text", "image"])
def test_each_form_against_monte_carlo(form, modality):
    """Default estimator vs 100k float64 draws from the same Gaussians, over a spread of cosines.

    Tolerances are the estimator's own accuracy at D=12 with noise ~10% of the norm: the
    std within 7% (the near-parallel pair, cosine ~0.97, is the hardest) and the mean
    within 0.0025.
    """
    posterior, means, scales, q_means, q_scales = random_setup(2, n=5, noise=0.3, modality=modality)
    g = torch.Generator().manual_seed(11)
    means[0] = q_means[0] * 1.3 + 0.2 * torch.randn(D, generator=g, dtype=torch.float64)  # near-parallel pair
    scalars = stored_scalars(means, scales, posterior)
    diag = (torch.rand(5, D, generator=g, dtype=torch.float64) * 0.024 + 0.003).numpy()
    lowrank = (0.08 * torch.randn(5, 2, D, generator=g, dtype=torch.float64)).numpy() if form == "lowrank" else None
    covs = ModelCovariances.from_posterior(posterior, modality, "second_order")
    query = QuerySide.build(q_means, q_scales, covs)
    got = all_pairs_moments(query, one_per_query(means, scalars, diag, lowrank), covs, form, "second_order")
    query_cov = posterior.text.output_cov if modality == "text" else posterior.image.output_cov
    chol_y = torch.linalg.cholesky(q_scales[0] * query_cov)
    for i in range(5):
        chol_x = (torch.linalg.cholesky(scales[i] * posterior.image.output_cov) if form == "kfac"
                  else per_item_cholesky(form, diag, lowrank, i))
        mc_mean, mc_std = monte_carlo_cosine(means[i], chol_x, q_means[0], chol_y, 100_000,
                                             torch.Generator().manual_seed(100 + i))
        assert float(got.mean[0, i]) == pytest.approx(mc_mean, abs=2.5e-3)
        assert float(got.var[0, i].sqrt()) == pytest.approx(mc_std, rel=0.07)
