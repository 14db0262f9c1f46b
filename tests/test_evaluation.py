"""Benchmark metrics against naive references.

Covers the ranking summary, binned recall, AUROC, risk-coverage, softmax and signals.
"""

import numpy as np
import pytest
import torch
from reference import auroc_pairwise
from scipy import special, stats

from bayesretrieval.evaluation import (
    Fitted,
    Signal,
    TopResults,
    auroc_standard_error,
    available_signals,
    binned_recall,
    failure_auroc,
    fit_temperature,
    risk_coverage,
    signal_values,
    softmax_confidence,
    softmax_statistics,
    split_queries,
    stratified_mean_difference,
    summarise_ranking,
)
from bayesretrieval.metrics import average_precision, first_hit_rank, hits_at_k, precision_at_k, recall_at_k
from bayesretrieval.queries import ProbitCalibration


def _scores(seed=0, nq=7, nb=12):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 5, size=(nq, nb)).astype(float)  # many ties
    relevant = rng.random((nq, nb)) < 0.3
    relevant[np.arange(nq), rng.integers(0, nb, nq)] = True
    return scores, relevant


def test_summary_uses_the_metrics():
    scores, relevant = _scores(1)
    first, hits = first_hit_rank(scores, relevant), hits_at_k(scores, relevant, 10)
    summary = summarise_ranking(first, average_precision(scores, relevant), hits, 10, ks=(1, 5, 10))
    assert [summary[f"recall@{k}"] for k in (1, 5, 10)] == [recall_at_k(first, k) for k in (1, 5, 10)]
    assert summary["precision@10"] == precision_at_k(hits, 10) and summary["queries"] == len(scores)
    with pytest.raises(ValueError, match="no queries"):
        summarise_ranking([], [], [], 10)


def test_binned_recall_trend_and_bins():
    u = np.arange(100.0)
    correct = np.arange(100) < 50  # certain half right, uncertain half wrong
    result = binned_recall(u, correct, bins=10)
    assert result["recall"] == [1.0] * 5 + [0.0] * 5 and result["count"] == [10] * 10
    assert result["spearman"] == pytest.approx(stats.spearmanr(np.arange(10), result["recall"]).statistic)
    assert result["spearman"] < -0.8 and 0 < result["r2"] < 1
    uneven = binned_recall(np.arange(103.0)[::-1], np.arange(103) % 2 == 0, bins=10)
    assert uneven["count"] == [11, 11, 11] + [10] * 7 and uneven["upper_edge"][0] == 10.0
    assert np.isnan(binned_recall(u, np.ones(100, bool))["spearman"])
    with pytest.raises(ValueError, match="bins must be in"):
        binned_recall(u[:3], correct[:3], bins=10)


def test_failure_auroc_equals_pairwise_reference():
    rng = np.random.default_rng(3)
    u = rng.integers(0, 6, 60).astype(float)
    failed = rng.random(60) < 0.4
    assert failure_auroc(u, failed) == pytest.approx(auroc_pairwise(u[~failed], u[failed]))
    assert failure_auroc([0.1, 0.2, 0.9], [False, False, True]) == 1.0
    with pytest.raises(ValueError, match="both classes"):
        failure_auroc([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="NaN"):
        failure_auroc([np.nan, 0.2], [True, False])
    with pytest.raises(ValueError, match="failed must be 0/1 or booleans"):
        failure_auroc([0.1, 0.2], [0, 2])


def test_risk_coverage_matches_naive_and_oracle():
    rng = np.random.default_rng(4)
    u, failed = rng.random(40), rng.random(40) < 0.3
    result = risk_coverage(u, failed)
    order = np.argsort(u)
    naive = [failed[order[:i]].mean() for i in range(1, 41)]
    np.testing.assert_allclose(result["risk"], naive)
    assert result["aurc"] == pytest.approx(np.mean(naive))
    oracle = risk_coverage(failed.astype(float), failed)
    assert oracle["aurc"] == pytest.approx(result["oracle_aurc"]) and result["aurc"] >= result["oracle_aurc"]


def test_softmax_statistics_and_temperature_recovery():
    rng = np.random.default_rng(5)
    cosines = rng.uniform(-0.2, 0.6, size=(400, 30))
    relevant = np.zeros_like(cosines, dtype=bool)
    true_t, s = 0.5, 10.0
    p = special.softmax(s * cosines / true_t, axis=1)
    relevant[np.arange(400), [rng.choice(30, p=row) for row in p]] = True
    grid = np.geomspace(0.1, 3.0, 41)
    lse, rel = softmax_statistics(cosines, relevant, s, grid)
    np.testing.assert_allclose(lse[:, 7], special.logsumexp(s * cosines / grid[7], axis=1))
    t, index = fit_temperature(lse, rel, grid)
    assert grid[index] == t and 0.35 < t < 0.7
    top = cosines.max(axis=1)
    np.testing.assert_allclose(softmax_confidence(top, lse[:, index], s, t), p_at(cosines, s, t).max(axis=1))
    with pytest.raises(ValueError, match="positive"):
        softmax_statistics(cosines, relevant, s, [0.0, 1.0])


def p_at(cosines, s, t):
    return special.softmax(s * cosines / t, axis=1)


def test_split_is_disjoint_and_seeded():
    fit = split_queries(11, seed=2)
    assert fit.sum() == 6 and np.array_equal(fit, split_queries(11, seed=2))
    with pytest.raises(ValueError, match="non-empty halves"):
        split_queries(1, seed=0)


def _top(n=2000, seed=6):
    rng = np.random.default_rng(seed)
    mean = np.sort(rng.uniform(0.2, 0.9, (n, 2)), axis=1)[:, ::-1].copy()
    var = rng.uniform(1e-4, 4e-3, (n, 2))
    extras = rng.random((5, n))  # item scale, item / query Mahalanobis and kNN distances
    return TopResults(mean, var, mean + 0.01, rng.random((n, 2)) < 0.5, rng.random(n), rng.normal(size=n), *extras,
                      item_var=var[:, 0] * rng.uniform(0.1, 0.9, n), probit_log_normaliser=rng.normal(3.0, 0.1, n),
                      aleatoric_var=rng.uniform(1e-4, 1e-2, n))


def test_flip_probability_matches_monte_carlo():
    top = _top(n=5)
    fitted = Fitted(ProbitCalibration.from_dict({"threshold": 0.5, "noise_std": 0.1}), 1.0, 10.0)
    flip = signal_values(Signal.FLIP_PROBABILITY, top, fitted)
    g = torch.Generator().manual_seed(0)
    draws = torch.randn(200_000, 5, 2, generator=g, dtype=torch.float64).numpy()
    samples = top.mean + np.sqrt(top.var) * draws
    np.testing.assert_allclose(flip, (samples[..., 1] > samples[..., 0]).mean(axis=0), atol=4e-3)


def test_every_signal_is_registered_and_oriented():
    top = _top()
    fitted = Fitted(ProbitCalibration.from_dict({"threshold": 0.5, "noise_std": 0.1}), 0.7, 10.0, 0.9)
    for signal in Signal:
        values = signal_values(signal.value, top, fitted)
        assert values.shape == (2000,) and np.isfinite(values).all()
    # Higher top-1 cosine: less uncertain under cosine, mismatch probability and softmax.
    c1 = top.map_cosine[:, 0]
    for signal in (Signal.COSINE, Signal.MISMATCH_PROBABILITY):
        assert stats.spearmanr(signal_values(signal, top, fitted), c1).statistic < -0.9
    assert Signal.SOFTMAX.is_baseline and not Signal.STD.is_baseline
    expected = np.sqrt(top.var[:, 0]) / (top.mean[:, 0] - top.mean[:, 1])
    np.testing.assert_allclose(signal_values(Signal.STD_OVER_GAP, top, fitted), expected)
    lcb = top.mean - np.sqrt(top.var)
    np.testing.assert_allclose(signal_values(Signal.LCB_FLIP, top, fitted), lcb[:, 1] - lcb[:, 0])
    np.testing.assert_array_equal(signal_values(Signal.ITEM_KNN, top, fitted), top.item_knn)
    np.testing.assert_allclose(signal_values(Signal.TOTAL_STD, top, fitted) ** 2,
                               top.var[:, 0] + signal_values(Signal.ALEATORIC_STD, top, fitted) ** 2)
    assert Signal.ITEM_MAHALANOBIS.is_baseline and not Signal.ITEM_SCALE.is_baseline


def test_signals_without_their_input_are_skipped():
    top = _top(n=4)
    bare = TopResults(top.mean, top.var, top.map_cosine, top.relevant, top.query_variance, top.log_normaliser)
    assert Signal.ITEM_SCALE not in available_signals(bare) and Signal.STD in available_signals(bare)
    assert available_signals(top) == list(Signal)
    assert bare.take([0, 2]).item_knn is None and top.take([0, 2]).item_knn.shape == (2,)
    fitted = Fitted(ProbitCalibration.from_dict({"threshold": 0.5, "noise_std": 0.1}), 0.7, 10.0)
    with pytest.raises(ValueError, match="needs TopResults.item_knn"):
        signal_values(Signal.ITEM_KNN, bare, fitted)


def test_auroc_standard_error_covers_the_spread_of_resampled_aurocs():
    rng = np.random.default_rng(8)
    draws = []
    for _ in range(400):
        failed = np.arange(120) < 40
        u = rng.normal(size=120) + 0.8 * failed
        draws.append(failure_auroc(u, failed))
    auroc = float(np.mean(draws))
    assert auroc_standard_error(auroc, 40, 80) == pytest.approx(np.std(draws), rel=0.15)
    with pytest.raises(ValueError, match="both classes"):
        auroc_standard_error(0.7, 0, 10)


def test_the_probit_softmax_divides_each_logit_and_is_the_softmax_without_variance():
    rng = np.random.default_rng(3)
    mean, var = rng.uniform(-0.2, 0.9, (4, 30)), rng.uniform(0, 0.01, (4, 30))
    relevant = rng.random((4, 30)) < 0.2
    s, temperatures = 20.0, np.array([0.5, 1.0, 2.0])
    lse, relevant_lse = softmax_statistics(mean, relevant, s, temperatures, var=var)
    for i, t in enumerate(temperatures):
        logits = (s / t) * mean / np.sqrt(1 + np.pi / 8 * (s / t) ** 2 * var)
        np.testing.assert_allclose(lse[:, i], special.logsumexp(logits, axis=1))
        np.testing.assert_allclose(relevant_lse[:, i], special.logsumexp(np.where(relevant, logits, -np.inf), axis=1))
    plain = softmax_statistics(mean, relevant, s, temperatures)
    np.testing.assert_allclose(softmax_statistics(mean, relevant, s, temperatures, var=0 * var)[0], plain[0])
    top = TopResults(mean[:, :2], 0 * var[:, :2], mean[:, :2], relevant[:, :2], np.ones(4), plain[0][:, 1],
                     probit_log_normaliser=plain[0][:, 1])
    fitted = Fitted(ProbitCalibration.from_dict({"threshold": 0.5, "noise_std": 0.1}), 1.0, s, 1.0)
    np.testing.assert_allclose(signal_values(Signal.PROBIT_SOFTMAX, top, fitted),
                               signal_values(Signal.SOFTMAX, top, fitted))


def test_stratified_mean_difference_is_paired_and_weighted():
    rng = np.random.default_rng(4)
    b = rng.random(300)
    strata = {"x": np.arange(300) < 100, "y": np.arange(300) >= 100}
    shifted = stratified_mean_difference(b + np.where(strata["x"], 0.3, 0.0), b, strata, n_boot=200)
    assert shifted["strata"]["x"]["difference"] == pytest.approx(0.3)
    assert shifted["strata"]["x"]["ci"] == pytest.approx([0.3, 0.3]) and shifted["strata"]["y"]["ci"] == [0.0, 0.0]
    pooled = shifted["pooled"]
    assert pooled["difference"] == pytest.approx(0.1) and pooled["ci"] == pytest.approx([0.1, 0.1])
    noisy = stratified_mean_difference(rng.random(300), b, strata, n_boot=500)
    low, high = noisy["pooled"]["ci"]
    assert low < noisy["pooled"]["difference"] < high and high - low > 0.02
