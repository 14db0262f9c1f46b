"""The cosine variance split into the query's, the item's and the joint part (docs/math.md section 7).

Every estimator and covariance form against per-pair references written out with full
matrices, exact zeros when one side has no noise, Monte Carlo with one side's noise only,
and the split in real search results.
"""

import math

import numpy as np
import pytest
import torch
from conftest import clustered_index, random_queries
from reference import random_spd

from bayesretrieval.commands.search import format_results
from bayesretrieval.encoders import Encoded
from bayesretrieval.posterior import KroneckerPosterior, PosteriorPair
from bayesretrieval.queries import RESULT_COLUMNS, Searcher
from bayesretrieval.queries.report import render_html
from bayesretrieval.queries.uncertainty import ModelCovariances, QuerySide, pair_moments
from bayesretrieval.similarity import cosine_moment_parts, cosine_moments
from bayesretrieval.store import IndexReader, ItemRows, ItemScalars

D = 10
ESTIMATORS = ["second_order", "kronecker", "published", "delta"]


# Per-pair references: full covariances S_x (item) and S_y (query), already scaled.

def second_order_parts(a, cov_x, b, cov_y):
    """``(query, item, joint)`` of the default estimator with explicit gradients."""
    rx2, ry2 = a @ a + torch.trace(cov_x), b @ b + torch.trace(cov_y)
    mean = (a @ b) / torch.sqrt(rx2 * ry2)
    g_x = (b - (a @ b / rx2) * a) / torch.sqrt(rx2 * ry2)
    g_y = (a - (a @ b / ry2) * b) / torch.sqrt(rx2 * ry2)
    item = g_x @ cov_x @ g_x + 0.5 * mean**2 * torch.trace(cov_x @ cov_x) / rx2**2
    query = g_y @ cov_y @ g_y + 0.5 * mean**2 * torch.trace(cov_y @ cov_y) / ry2**2
    return query, item, torch.trace(cov_x @ cov_y) / (rx2 * ry2)


def probcosine_parts(a, cov_x, b, cov_y):
    """``(query, item, joint)`` of ProbCosine: the three terms of ``Var[x.y]`` over ``r_x^2 r_y^2``."""
    normaliser = (a @ a + torch.trace(cov_x)) * (b @ b + torch.trace(cov_y))
    return a @ cov_y @ a / normaliser, b @ cov_x @ b / normaliser, torch.trace(cov_x @ cov_y) / normaliser


def delta_parts(a, cov_x, b, cov_y):
    """``(query, item, 0)`` of the first-order delta method."""
    c = (a @ b) / (a.norm() * b.norm())
    grad_x = (b / b.norm() - c * a / a.norm()) / a.norm()
    grad_y = (a / a.norm() - c * b / b.norm()) / b.norm()
    return grad_y @ cov_y @ grad_y, grad_x @ cov_x @ grad_x, torch.zeros((), dtype=torch.float64)


def reference_parts(estimator, a, cov_x, b, cov_y):
    """The reference of ``estimator`` (``published``: every covariance by its diagonal)."""
    if estimator == "published":
        cov_x, cov_y = torch.diag(cov_x.diagonal()), torch.diag(cov_y.diagonal())
    function = {"second_order": second_order_parts, "kronecker": probcosine_parts, "published": probcosine_parts,
                "delta": delta_parts}[estimator]
    return torch.stack(function(a, cov_x, b, cov_y))


def random_gaussians(seed=0, n=4, m=3):
    g = torch.Generator().manual_seed(seed)
    return dict(
        means_x=torch.randn(n, D, generator=g, dtype=torch.float64),
        scales_x=torch.rand(n, generator=g, dtype=torch.float64) * 0.05 + 0.01,
        cov_x=random_spd(D, g),
        means_y=torch.randn(m, D, generator=g, dtype=torch.float64),
        scales_y=torch.rand(m, generator=g, dtype=torch.float64) * 0.05 + 0.01,
        cov_y=random_spd(D, g),
    )


def assert_parts_sum_to_var(moments):
    parts = (moments.var_query, moments.var_item, moments.var_joint)
    for part in parts:
        assert part.dtype == torch.float64 and part.shape == moments.var.shape
    assert torch.equal(moments.var, (parts[0] + parts[1] + parts[2]).clamp_min(0.0))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_dense_parts_match_the_reference_and_sum_to_var(estimator):
    g = random_gaussians()
    moments = cosine_moment_parts(**g, estimator=estimator)
    assert_parts_sum_to_var(moments)
    mean, var = cosine_moments(**g, estimator=estimator)
    assert torch.equal(moments.mean, mean) and torch.equal(moments.var, var)
    for i in range(len(g["means_x"])):
        for j in range(len(g["means_y"])):
            want = reference_parts(estimator, g["means_x"][i], g["scales_x"][i] * g["cov_x"],
                                   g["means_y"][j], g["scales_y"][j] * g["cov_y"])
            got = torch.stack([moments.var_query[i, j], moments.var_item[i, j], moments.var_joint[i, j]])
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-16)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_dense_part_is_zero_without_that_sides_noise(estimator):
    g = random_gaussians(1)
    g["scales_y"][1] = 0.0
    g["scales_x"][2] = 0.0
    moments = cosine_moment_parts(**g, estimator=estimator)
    assert torch.all(moments.var_query[:, 1] == 0) and torch.all(moments.var_joint[:, 1] == 0)
    assert torch.all(moments.var_item[2] == 0) and torch.all(moments.var_joint[2] == 0)
    noisy_items, noisy_queries = torch.arange(4) != 2, torch.arange(3) != 1
    assert torch.all(moments.var_item[noisy_items] > 0) and torch.all(moments.var_query[:, noisy_queries] > 0)


@pytest.mark.parametrize("estimator", ["second_order", "kronecker", "published"])
def test_a_part_is_the_one_sided_variance_over_the_other_sides_norm_ratio(estimator):
    """With the query exact the variance is ``var_item r_y^2 / |mu_y|^2`` (docs/math.md section 7), and mirrored."""
    g = random_gaussians(2)
    moments = cosine_moment_parts(**g, estimator=estimator)
    trace = lambda cov: float(torch.trace(torch.diag(cov.diagonal()) if estimator == "published" else cov))  # noqa: E731
    ry2_ratio = 1 + g["scales_y"] * trace(g["cov_y"]) / (g["means_y"] ** 2).sum(1)
    rx2_ratio = 1 + g["scales_x"] * trace(g["cov_x"]) / (g["means_x"] ** 2).sum(1)
    _, item_only = cosine_moments(**{**g, "scales_y": torch.zeros(3, dtype=torch.float64)}, estimator=estimator)
    _, query_only = cosine_moments(**{**g, "scales_x": torch.zeros(4, dtype=torch.float64)}, estimator=estimator)
    torch.testing.assert_close(moments.var_item * ry2_ratio[None, :], item_only, rtol=1e-12, atol=0)
    torch.testing.assert_close(moments.var_query * rx2_ratio[:, None], query_only, rtol=1e-12, atol=0)


# Search-side pair moments, every covariance form.

def posterior_pair(seed=3) -> PosteriorPair:
    g = torch.Generator().manual_seed(seed)
    image = KroneckerPosterior(random_spd(6, g), random_spd(D, g), "image")
    text = KroneckerPosterior(random_spd(5, g), random_spd(D, g), "text")
    return PosteriorPair(image, text, source="test")


def scalar_table(means, scales, posterior) -> np.ndarray:
    """The six stored scalars ``(n, 6)``, written out with full and diagonal matrices."""
    si, st = posterior.image.output_cov, posterior.text.output_cov
    quad = lambda s: ((means @ s) * means).sum(1)  # noqa: E731
    columns = [scales, (means**2).sum(1), quad(si), quad(st), quad(torch.diag(si.diagonal())),
               quad(torch.diag(st.diagonal()))]
    return torch.stack(columns, 1).numpy()


def item_covariance(form, i, scales, posterior, diag, lowrank):
    """Item ``i``'s full covariance ``S_i`` for ``form``."""
    if form == "kfac":
        return scales[i] * posterior.image.output_cov
    cov = torch.diag(torch.as_tensor(diag[i], dtype=torch.float64))
    if form == "lowrank":
        low = torch.as_tensor(lowrank[i], dtype=torch.float64)
        cov = cov + low.T @ low
    return cov


def form_setup(form, seed=0, n=6):
    """Items, 2 text queries and every item with each query (pair ``p``: query ``p // n``, item ``p % n``)."""
    g = torch.Generator().manual_seed(seed)
    posterior = posterior_pair()
    means = torch.randn(n, D, generator=g, dtype=torch.float64)
    scales = torch.rand(n, generator=g, dtype=torch.float64) * 0.05 + 0.01
    diag = (torch.rand(n, D, generator=g, dtype=torch.float64) * 0.02 + 0.002).numpy()
    lowrank = (0.08 * torch.randn(n, 2, D, generator=g, dtype=torch.float64)).numpy() if form == "lowrank" else None
    q_means = torch.randn(2, D, generator=g, dtype=torch.float64)
    q_scales = torch.rand(2, generator=g, dtype=torch.float64) * 0.05 + 0.01
    return posterior, means, scales, diag if form != "kfac" else None, lowrank, q_means, q_scales


def all_pairs(form, estimator, posterior, means, scales, diag, lowrank, q_means, q_scales):
    """:func:`pair_moments` of every item with each query, each ``(nq n,)``."""
    covs = ModelCovariances.from_posterior(posterior, "text", estimator)
    query = QuerySide.build(q_means, q_scales, covs)
    n, nq = len(means), len(q_means)
    tile = lambda a: None if a is None else np.concatenate([np.asarray(a)] * nq)  # noqa: E731
    items = ItemRows(np.tile(np.arange(n), nq), tile(means), ItemScalars.from_table(tile(scalar_table(
        means, scales, posterior))), tile(diag), tile(lowrank))
    return pair_moments(query, np.repeat(np.arange(nq), n), items, covs, form, estimator)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("form", ["kfac", "diag", "lowrank"])
def test_pair_moment_parts_match_the_reference_for_every_form(form, estimator):
    posterior, means, scales, diag, lowrank, q_means, q_scales = form_setup(form)
    got = all_pairs(form, estimator, posterior, means, scales, diag, lowrank, q_means, q_scales)
    assert_parts_sum_to_var(got)
    n = len(means)
    for p in range(len(got.var)):
        q, i = divmod(p, n)
        cov_x = item_covariance(form, i, scales, posterior, diag, lowrank)
        want = reference_parts(estimator, means[i], cov_x, q_means[q], q_scales[q] * posterior.text.output_cov)
        parts = torch.stack([got.var_query[p], got.var_item[p], got.var_joint[p]])
        torch.testing.assert_close(parts, want, rtol=1e-9, atol=1e-16)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("form", ["kfac", "diag", "lowrank"])
def test_pair_moment_part_is_zero_without_that_sides_noise(form, estimator):
    posterior, means, scales, diag, lowrank, q_means, q_scales = form_setup(form, seed=1)
    q_scales[1] = 0.0
    scales[2] = 0.0
    if diag is not None:
        diag[2] = 0.0
    if lowrank is not None:
        lowrank[2] = 0.0
    got = all_pairs(form, estimator, posterior, means, scales, diag, lowrank, q_means, q_scales)
    n = len(means)
    assert torch.all(got.var_query[n:] == 0) and torch.all(got.var_joint[n:] == 0)
    assert got.var_item[2] == 0 and got.var_item[n + 2] == 0 and got.var_joint[2] == 0
    assert torch.all(got.var_query[:n] > 0) and torch.all(got.var_item[n:n + 2] > 0)


# Monte Carlo: one side's noise only.

def pair_with_cosine(cosine, generator):
    """Means ``a`` (item) and ``b`` (query) at ``cosine``, with norms 1.0 and 1.3."""
    a = torch.randn(D, generator=generator, dtype=torch.float64)
    a = a / a.norm()
    other = torch.randn(D, generator=generator, dtype=torch.float64)
    other = other - (other @ a) * a
    b = cosine * a + math.sqrt(1 - cosine**2) * other / other.norm()
    return a, 1.3 * b


def one_side_variance(a, chol_x, b, chol_y, num_draws, generator):
    """Variance of ``cos(x, y)`` over float64 draws with ``x = a + chol_x z``, ``y = b + chol_y z'``."""
    x = a + torch.randn(num_draws, D, generator=generator, dtype=torch.float64) @ chol_x.T
    y = b + torch.randn(num_draws, D, generator=generator, dtype=torch.float64) @ chol_y.T
    return float(torch.nn.functional.cosine_similarity(x, y, dim=1).var())


@pytest.mark.parametrize("cosine", [0.3, 0.6, 0.9])
def test_second_order_parts_against_monte_carlo_with_one_sides_noise(cosine):
    """100k float64 draws of one side's noise: variance within 5% of ``var_item`` (``var_query``).

    Both sides' noise is 2% of the squared norm (``tr S / |mu|^2``), so the part, a term of
    the full formula, is 2% below the one-sided variance of the same estimator (the test
    above); the rest is the estimator's own error, up to 3.5% at cosine 0.9 in ``D = 10``.
    """
    g = torch.Generator().manual_seed(int(cosine * 100))
    a, b = pair_with_cosine(cosine, g)
    sigma_x, sigma_y = random_spd(D, g), random_spd(D, g)
    q_x = 0.02 * float(a @ a) / float(torch.trace(sigma_x))
    q_y = 0.02 * float(b @ b) / float(torch.trace(sigma_y))
    moments = cosine_moment_parts(a[None], torch.tensor([q_x]), sigma_x, b[None], torch.tensor([q_y]), sigma_y)
    chol_x, chol_y = torch.linalg.cholesky(q_x * sigma_x), torch.linalg.cholesky(q_y * sigma_y)
    none = torch.zeros(D, D, dtype=torch.float64)
    draws = torch.Generator().manual_seed(7)
    item_only = one_side_variance(a, chol_x, b, none, 100_000, draws)
    query_only = one_side_variance(a, none, b, chol_y, 100_000, draws)
    var_item, var_query = float(moments.var_item), float(moments.var_query)
    assert var_item == pytest.approx(item_only, rel=0.05)
    assert var_query == pytest.approx(query_only, rel=0.05)


# Search results.

@pytest.fixture(scope="module", params=["kfac", "diag", "lowrank:3"])
def written_index(request, tmp_path_factory):
    return clustered_index(tmp_path_factory.mktemp("split"), n=1500, variance=request.param, seed=3, duplicates=5)


@pytest.mark.parametrize("estimator", ["second_order", "delta"])
def test_search_results_carry_the_split(written_index, estimator):
    searcher = Searcher(IndexReader.open(written_index), None, written_index, estimator=estimator)
    queries = random_queries(4)
    frame = searcher.search(queries, k=5, score="lcb")
    assert list(frame.columns) == list(RESULT_COLUMNS)
    at = list(frame.columns).index("cosine_std")
    assert list(frame.columns)[at + 1:at + 3] == ["cosine_std_query", "cosine_std_item"]
    std, std_query, std_item = (frame[c].to_numpy() for c in ("cosine_std", "cosine_std_query", "cosine_std_item"))
    joint = std**2 - std_query**2 - std_item**2
    assert np.all(joint >= -1e-12) and np.all(std_query > 0) and np.all(std_item > 0)
    if estimator == "delta":
        np.testing.assert_allclose(joint, 0.0, atol=1e-12)
    rows = torch.tensor(frame.query_index.to_numpy())
    repeated = Encoded(queries.embeds[rows], queries.activations[rows])
    pairs = searcher.pair_moments(repeated, frame.item_id.to_numpy())
    np.testing.assert_allclose(std_query, pairs.var_query.clamp_min(0).sqrt().numpy(), rtol=1e-12)
    np.testing.assert_allclose(std_item, pairs.var_item.clamp_min(0).sqrt().numpy(), rtol=1e-12)
    np.testing.assert_allclose(joint, pairs.var_joint.numpy(), atol=1e-12)
    searcher.close()


def test_cli_table_and_html_show_the_split(written_index):
    searcher = Searcher(IndexReader.open(written_index), None, written_index)
    frame = searcher.search(random_queries(2), k=3)
    searcher.close()
    table = format_results(frame, "table")
    assert "std q/i" in table and f"{frame.cosine_std_query[0]:.3f}/{frame.cosine_std_item[0]:.3f}" in table
    assert "cosine_std_query" in format_results(frame, "csv").splitlines()[0]
    page = render_html(frame)
    assert page.count("query &plusmn;") == len(frame) and page.count("item &plusmn;") == len(frame)
