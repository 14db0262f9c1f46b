"""The default cosine estimator against Monte Carlo on BayesVLM's real ViT-B-32 factors."""

import pytest

from bayesretrieval.accuracy import accuracy_grid, bayesvlm_grid_settings, vit_b32_projections


@pytest.fixture(scope="module")
def grid(bayesvlm_dir):
    return accuracy_grid(bayesvlm_grid_settings(bayesvlm_dir), *vit_b32_projections(), num_draws=100_000)


def test_grid_covers_every_cell(grid):
    cells = grid.groupby(["setting", "activation_scale", "cosine"]).ngroups
    assert cells == 3 * 2 * 6


def test_default_estimator_std_within_ten_percent_and_mean_within_0002(grid):
    default = grid[grid.estimator == "second_order"]
    assert default.std_relative_error.abs().max() <= 0.10, default.sort_values("std_relative_error")
    assert default.mean_error.abs().max() <= 0.002


def test_published_estimator_is_far_off_for_near_parallel_pairs(grid):
    published = grid[(grid.estimator == "published") & (grid.cosine >= 0.9)]
    assert published.std_relative_error.min() > 0.2
    near_orthogonal = grid[(grid.estimator == "published") & (grid.cosine == 0.0)]
    assert near_orthogonal.std_relative_error.abs().max() < 0.05
