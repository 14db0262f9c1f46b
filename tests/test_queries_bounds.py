"""The certificate's bounds dominate every item's actual moments (all estimators and forms)."""

import numpy as np
import pytest
import torch
from conftest import clustered_index, random_queries

from bayesretrieval.queries.bounds import Spectra, candidate_variance_floor, float32_slack, score_bounds
from bayesretrieval.queries.uncertainty import ModelCovariances, PairMoments, QuerySide, pair_moments
from bayesretrieval.store import IndexReader


@pytest.fixture(scope="module", params=["kfac", "diag", "lowrank:3"])
def index(request, tmp_path_factory):
    return clustered_index(tmp_path_factory.mktemp("bounds"), n=3000, variance=request.param, seed=9, duplicates=5)


@pytest.fixture(scope="module")
def kfac_index(tmp_path_factory):
    return clustered_index(tmp_path_factory.mktemp("floor"), n=3000, variance="kfac", seed=12, duplicates=5)


def _prepared_queries(reader, estimator, modality, seed, count=5):
    """The covariances for ``estimator`` and ``count`` random queries of ``modality``, prepared."""
    covs = ModelCovariances.from_posterior(reader.posterior, modality, estimator)
    queries = random_queries(count, seed=seed, modality=modality)
    posterior = reader.posterior.text if modality == "text" else reader.posterior.image
    return covs, QuerySide.build(queries.embeds, posterior.activation_scale(queries.activations), covs)


def _all_pairs_moments(reader, query, covs, form, estimator, nq=5):
    """Moments of every query with every item, ``(nq, N)``."""
    every = reader.fetch(np.tile(np.asarray(reader.item_ids), nq))
    flat = pair_moments(query, np.repeat(np.arange(nq), len(reader)), every, covs, form, estimator)
    return PairMoments(*(values.reshape(nq, -1) for values in vars(flat).values()))


def test_stored_extremes_match_the_arrays(index):
    """The manifest's extremes equal the ratios taken item by item."""
    reader = IndexReader.open(index)
    forms = ["kfac"] + (["diag"] if reader.variance_diag is not None else []) + (
        ["lowrank"] if reader.variance_lowrank is not None else [])
    assert sorted(reader.manifest.extremes) == sorted(forms)
    scalars = np.asarray(reader.scalars)
    norm_sq, noise = scalars[:, 1], scalars[:, 0] * reader.trace_image
    for form in forms:
        trace = noise if form == "kfac" else np.asarray(reader.variance_diag, np.float64).sum(1)
        if form == "lowrank":
            trace = trace + np.einsum("nrd,nrd->n", *(np.asarray(reader.variance_lowrank, np.float64),) * 2)
        mean_factor = np.sqrt((norm_sq + noise) / (norm_sq + trace))
        map_factor = np.sqrt((norm_sq + noise) / norm_sq)
        stored = reader.extremes(form)
        np.testing.assert_allclose(
            [stored.noise_ratio_max, stored.plain_noise_ratio_max, stored.mean_factor_min, stored.mean_factor_max,
             stored.map_factor_min, stored.map_factor_max],
            [(trace / (norm_sq + trace)).max(), (trace / norm_sq).max(), mean_factor.min(), mean_factor.max(),
             map_factor.min(), map_factor.max()], rtol=1e-12)
    with pytest.raises(ValueError, match="unknown covariance form"):
        reader.extremes("full")
    if reader.variance_diag is None:
        with pytest.raises(ValueError, match="needs variance columns"):
            reader.extremes("diag")


@pytest.mark.parametrize("estimator", ["second_order", "published", "kronecker", "delta"])
@pytest.mark.parametrize("modality", ["text", "image"])
def test_bounds_dominate_all_items(index, estimator, modality):
    reader = IndexReader.open(index)
    form = reader.manifest.variance_spec.form
    covs, query = _prepared_queries(reader, estimator, modality, seed=10)
    nq = 5
    moments = _all_pairs_moments(reader, query, covs, form, estimator, nq)
    vectors = np.asarray(reader.means, np.float64) / reader.expected_norm()[:, None]
    f = query.faiss_queries().astype(np.float64) @ vectors.T  # what FAISS ranks by, (nq, n)
    extremes = reader.extremes(form)
    spectra = Spectra.of(covs)
    for cut in (0.0, 0.5, 0.9):  # items with f <= the cut-th quantile of each query's row (plus FAISS slack)
        f_bound = np.quantile(f, cut, axis=1)
        bounds = score_bounds(f_bound + float32_slack(vectors.shape[1]), query, covs, extremes,
                              form, estimator, spectra)
        below = f <= f_bound[:, None]
        for qi in range(nq):
            rows = below[qi]
            assert moments.mean[qi, rows].max() <= bounds.mean[qi] + 1e-12
            assert moments.map_cosine[qi, rows].max() <= bounds.map_cosine[qi] + 1e-12
    bounds = score_bounds(f.max(1), query, covs, extremes, form, estimator, spectra)
    assert torch.all(moments.var.max(1).values <= torch.from_numpy(bounds.var) * (1 + 1e-12))


@pytest.mark.parametrize("estimator", ["second_order", "published", "kronecker"])
@pytest.mark.parametrize("modality", ["text", "image"])
def test_candidate_variance_floor_is_below_every_variance(kfac_index, estimator, modality):
    """From scalars and a float32-rounded inner product alone, the floor never exceeds the exact variance."""
    reader = IndexReader.open(kfac_index)
    covs, query = _prepared_queries(reader, estimator, modality, seed=11)
    nq = 5
    moments = _all_pairs_moments(reader, query, covs, "kfac", estimator, nq)
    vectors = (np.asarray(reader.means, np.float64) / reader.expected_norm()[:, None]).astype(np.float32)
    f = query.faiss_queries() @ vectors.T  # float32, as FAISS computes it
    rows = np.repeat(np.arange(nq), len(reader))
    floor = candidate_variance_floor(f.reshape(-1).astype(np.float64), float32_slack(vectors.shape[1]),
                                     reader.fetch_scalars(np.tile(np.asarray(reader.item_ids), nq)), query, rows,
                                     covs, estimator, Spectra.of(covs)).reshape(nq, -1)
    var = moments.var.numpy()
    assert np.all(floor <= var)
    assert np.median(floor / var) > (0.99 if estimator != "second_order" else 0.5)  # measured 0.83-0.85
