"""Calibration and retrieval metrics against hand-computed values and naive loops."""

import numpy as np
import pytest

from bayesretrieval.metrics import (
    brier_score,
    expected_calibration_error,
    negative_log_likelihood,
    precision_at_k,
    recall_at_k,
    reliability_table,
)


def naive_ece(p, y, bins):
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = [(pi, yi) for pi, yi in zip(p, y) if lo <= pi < hi or (b == bins - 1 and pi == 1.0)]
        if inside:
            total += len(inside) / len(p) * abs(np.mean([t[1] for t in inside]) - np.mean([t[0] for t in inside]))
    return total


def test_ece_matches_naive_loop():
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.random(500), [0.0, 1.0, 0.2, 0.4]])
    y = rng.random(p.size) < p**2
    assert expected_calibration_error(p, y, 15) == pytest.approx(naive_ece(p, y, 15), abs=1e-12)
    assert expected_calibration_error(p, y, 1) == pytest.approx(abs(y.mean() - p.mean()))


def test_ece_of_calibrated_draws_shrinks_and_of_biased_does_not():
    rng = np.random.default_rng(1)
    p = rng.random(200_000)
    y = rng.random(p.size) < p
    assert expected_calibration_error(p, y) < 0.01
    assert expected_calibration_error(np.clip(p + 0.2, 0, 1), y) > 0.1


def test_reliability_table_counts():
    table = reliability_table([0.05, 0.05, 0.95], [0, 1, 1], bins=10)
    assert table["count"][0] == 2 and table["count"][9] == 1
    assert table["frequency"][0] == 0.5 and np.isnan(table["frequency"][5])


def test_brier_and_nll():
    assert brier_score([0.0, 1.0, 0.5], [0, 1, 1]) == pytest.approx(0.25 / 3)
    assert negative_log_likelihood([0.5, 0.5], [0, 1]) == pytest.approx(np.log(2))
    assert np.isfinite(negative_log_likelihood([0.0], [1]))


def test_recall_and_precision():
    I = np.array([[3, 1, 2], [5, -1, -1]])
    assert recall_at_k(I, [{1, 9}, {5}], 2) == pytest.approx((0.5 + 1.0) / 2)
    assert recall_at_k(I, [{1}, set()], 1) == 0.0
    assert precision_at_k(I, [{1, 2}, {5}], 3) == pytest.approx((2 / 3 + 1 / 3) / 2)


@pytest.mark.parametrize("call", [
    lambda: expected_calibration_error([0.5], [1, 0]),
    lambda: expected_calibration_error([1.5], [1]),
    lambda: expected_calibration_error([0.5], [2]),
    lambda: expected_calibration_error([0.5], [1], bins=0),
    lambda: brier_score([], []),
    lambda: recall_at_k([[1]], [{1}], 0),
])
def test_bad_input_raises(call):
    with pytest.raises(ValueError):
        call()
