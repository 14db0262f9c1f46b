"""The certificate's bounds dominate every item's actual moments (all estimators and forms)."""

import numpy as np
import pytest
import torch

from bayesretrieval.queries.bounds import (
    ScoreBounds,
    Spectra,
    candidate_variance_floor,
    float32_slack,
    score_bounds,
)
from bayesretrieval.queries.uncertainty import Candidates, ModelCovariances, QuerySide, candidate_moments
from bayesretrieval.store import IndexReader
from test_queries_search import build_index, text_queries


@pytest.fixture(scope="module", params=["none", "diag", "lowrank:3"])
def index(request, tmp_path_factory):
    return build_index(tmp_path_factory.mktemp("bounds"), n=3000, variance=request.param, seed=9, duplicates=5)


@pytest.fixture(scope="module")
def kfac_index(tmp_path_factory):
    return build_index(tmp_path_factory.mktemp("floor"), n=3000, variance="none", seed=12, duplicates=5)


def _prepared_queries(reader, estimator, modality, seed, count=5):
    """The covariances for ``estimator`` and ``count`` random queries of ``modality``, prepared."""
    covs = ModelCovariances.from_posterior(reader.posterior, modality, estimator)
    queries = text_queries(count, seed=seed, modality=modality)
    posterior = reader.posterior.text if modality == "text" else reader.posterior.image
    return covs, QuerySide.build(queries.embeds, posterior.activation_scale(queries.activations), covs)


def test_stored_extremes_match_the_arrays(index):
    """The manifest's extremes equal the ratios taken item by item; old manifests get them computed."""
    reader = IndexReader.open(index)
    forms = ["kfac"] + (["diag"] if reader.variance_diag is not None else []) + (
        ["lowrank"] if reader.variance_lowrank is not None else [])
    assert sorted(reader.manifest.stats["ratio_extremes"]) == sorted(forms)
    scalars = np.asarray(reader.scalars)
    norm_sq, noise = scalars[:, 1], scalars[:, 0] * reader.trace_image
    legacy = IndexReader.open(index)
    del legacy.manifest.stats["ratio_extremes"]
    for form in forms:
        trace = noise if form == "kfac" else np.asarray(reader.variance_diag, np.float64).sum(1)
        if form == "lowrank":
            trace = trace + np.einsum("nrd,nrd->n", *(np.asarray(reader.variance_lowrank, np.float64),) * 2)
        mean_factor = np.sqrt((norm_sq + noise) / (norm_sq + trace))
        map_factor = np.sqrt((norm_sq + noise) / norm_sq)
        stored = reader.collection_bounds(form)
        np.testing.assert_allclose(
            [stored.noise_ratio_max, stored.plain_noise_ratio_max, stored.mean_factor_min, stored.mean_factor_max,
             stored.map_factor_min, stored.map_factor_max],
            [(trace / (norm_sq + trace)).max(), (trace / norm_sq).max(), mean_factor.min(), mean_factor.max(),
             map_factor.min(), map_factor.max()], rtol=1e-12)
        assert legacy.collection_bounds(form) == stored
    with pytest.raises(ValueError, match="unknown covariance form"):
        reader.collection_bounds("full")
    for opened in (reader, legacy):
        if reader.variance_diag is None:
            with pytest.raises(ValueError, match="needs variance columns"):
                opened.collection_bounds("diag")


@pytest.mark.parametrize("estimator", ["second_order", "published", "kronecker", "delta"])
@pytest.mark.parametrize("modality", ["text", "image"])
def test_bounds_dominate_all_items(index, estimator, modality):
    reader = IndexReader.open(index)
    form = {"none": "kfac", "diag": "diag", "lowrank": "lowrank"}[reader.manifest.variance_spec.kind.value]
    covs, query = _prepared_queries(reader, estimator, modality, seed=10)
    nq = 5
    every = Candidates(np.tile(np.asarray(reader.item_ids), (nq, 1)), np.repeat(np.asarray(reader.means)[None], nq, 0),
                       np.repeat(np.asarray(reader.scalars)[None], nq, 0),
                       None if reader.variance_diag is None else np.repeat(np.asarray(reader.variance_diag)[None], nq, 0),
                       None if reader.variance_lowrank is None
                       else np.repeat(np.asarray(reader.variance_lowrank)[None], nq, 0))
    moments = candidate_moments(query, every, covs, form, estimator)
    vectors = np.asarray(reader.means, np.float64) / reader.expected_norm()[:, None]
    f = query.faiss_queries().astype(np.float64) @ vectors.T  # what FAISS ranks by, (nq, n)
    extremes = reader.collection_bounds(form)
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
    ids = np.tile(np.asarray(reader.item_ids), (nq, 1))
    scalars = np.repeat(np.asarray(reader.scalars)[None], nq, 0)
    every = Candidates(ids, np.repeat(np.asarray(reader.means)[None], nq, 0), scalars)
    moments = candidate_moments(query, every, covs, "kfac", estimator)
    vectors = (np.asarray(reader.means, np.float64) / reader.expected_norm()[:, None]).astype(np.float32)
    f = query.faiss_queries() @ vectors.T  # float32, as FAISS computes it
    floor = candidate_variance_floor(f, float32_slack(vectors.shape[1]), scalars, query, covs, "kfac", estimator,
                                     Spectra.of(covs))
    var = moments.var.numpy()
    assert np.all(floor <= var)
    assert np.median(floor / var) > (0.99 if estimator != "second_order" else 0.5)  # measured 0.83-0.85


def test_score_bounds_columns_slice_the_candidates_and_keep_the_per_query_variance():
    mean, map_cosine = np.arange(12.0).reshape(3, 4), -np.arange(12.0).reshape(3, 4)
    var, floor = np.ones((3, 1)), np.full((3, 4), 0.5) + np.arange(4)
    part = ScoreBounds(mean, var, map_cosine, floor).columns(1)
    np.testing.assert_array_equal(part.mean, mean[:, 1:])
    np.testing.assert_array_equal(part.map_cosine, map_cosine[:, 1:])
    np.testing.assert_array_equal(part.var_floor, floor[:, 1:])
    assert part.var is var
    assert ScoreBounds(mean, var, map_cosine).columns(3).var_floor == 0.0
