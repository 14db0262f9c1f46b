"""Calibration and retrieval metrics against hand-computed values and naive loops."""

import numpy as np
import pytest

from bayesretrieval.metrics import (
    NO_HIT,
    average_precision,
    binary_labels,
    brier_score,
    expected_calibration_error,
    first_hit_rank,
    hits_at_k,
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


def _ranked(scores_row, relevant_row):
    """Naive ranking: sort item indices by (-score, index)."""
    order = sorted(range(len(scores_row)), key=lambda j: (-scores_row[j], j))
    return [bool(relevant_row[j]) for j in order]


def _scores(seed=0, nq=7, nb=12):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 5, size=(nq, nb)).astype(float)  # many ties
    relevant = rng.random((nq, nb)) < 0.3
    return scores, relevant


def test_ranking_quantities_match_naive_loops():
    scores, relevant = _scores()
    first, hits, ap = (first_hit_rank(scores, relevant), hits_at_k(scores, relevant, 4),
                       average_precision(scores, relevant))
    for q in range(len(scores)):
        ranked = _ranked(scores[q], relevant[q])
        assert first[q] == (ranked.index(True) if any(ranked) else NO_HIT)
        assert hits[q] == sum(ranked[:4])
        precisions = [sum(ranked[: r + 1]) / (r + 1) for r in range(len(ranked)) if ranked[r]]
        assert ap[q] == pytest.approx(np.mean(precisions)) if precisions else np.isnan(ap[q])


def test_recall_is_the_fraction_of_queries_with_a_hit_in_the_top_k():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1], [0.5, 0.5, 0.5]])
    relevant = np.array([[0, 0, 1], [0, 1, 1], [0, 0, 0]], dtype=bool)  # the last query has no relevant item
    first = first_hit_rank(scores, relevant)
    assert first.tolist() == [1, 0, NO_HIT]
    assert [recall_at_k(first, k) for k in (1, 2, 3, 4)] == pytest.approx([1 / 3, 2 / 3, 2 / 3, 2 / 3])
    scores, relevant = _scores(1, nq=40, nb=25)
    first = first_hit_rank(scores, relevant)
    for k in (1, 3, 10, 30):
        naive = np.mean([any(_ranked(s, r)[:k]) for s, r in zip(scores, relevant)])
        assert recall_at_k(first, k) == pytest.approx(naive)


def test_precision_is_the_mean_fraction_of_relevant_items_in_the_top_k():
    scores, relevant = _scores(2)
    for k in (1, 4):
        naive = np.mean([sum(_ranked(s, r)[:k]) / k for s, r in zip(scores, relevant)])
        assert precision_at_k(hits_at_k(scores, relevant, k), k) == pytest.approx(naive)


def test_binary_labels():
    assert binary_labels([0, 1.0, True]).tolist() == [False, True, True]
    for bad in ([0, 2], [0.5], [np.nan], ["1"]):
        with pytest.raises(ValueError, match="labels must be 0/1 or booleans, got"):
            binary_labels(bad)
    with pytest.raises(ValueError, match="relevant must be 0/1"):
        first_hit_rank(np.zeros((1, 2)), [[0, 3]])


@pytest.mark.parametrize("call", [
    lambda: expected_calibration_error([0.5], [1, 0]),
    lambda: expected_calibration_error([1.5], [1]),
    lambda: expected_calibration_error([0.5], [2]),
    lambda: expected_calibration_error([0.5], [1], bins=0),
    lambda: brier_score([], []),
    lambda: recall_at_k([0], 0),
    lambda: recall_at_k([], 1),
    lambda: precision_at_k([3], 2),
    lambda: hits_at_k(np.zeros((1, 3)), np.ones((1, 3), bool), 0),
    lambda: first_hit_rank(np.zeros((2, 3)), np.zeros((2, 4), bool)),
])
def test_bad_input_raises(call):
    with pytest.raises(ValueError):
        call()
