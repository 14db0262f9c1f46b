"""Stratified failure AUROC with bootstrap intervals, and the activation OOD baselines, against naive references."""

import numpy as np
import pytest
from reference import auroc_pairwise

from bayesretrieval.evaluation import KnnDistance, MahalanobisDistance, auroc_rows, failure_auroc, stratified_auroc


def mahalanobis_naive(x, fit, ridge):
    """Centred squared Mahalanobis distance, row by row, numpy float64."""
    mean, cov = fit.mean(axis=0), np.cov(fit, rowvar=False)
    cov = cov + ridge * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
    return np.array([(row - mean) @ np.linalg.solve(cov, row - mean) for row in x])


def knn_naive(x, fit, k):
    """1 - cosine to the k-th nearest fitting row, by sorting every distance."""
    out = []
    for row in x:
        cos = fit @ row / (np.linalg.norm(fit, axis=1) * np.linalg.norm(row))
        out.append(np.sort(1.0 - cos)[k - 1])
    return np.array(out)


def test_ood_distances_match_naive_references():
    rng = np.random.default_rng(0)
    fit = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) + 3.0
    x = np.vstack([rng.normal(size=(5, 6)) + 3.0, rng.normal(size=(5, 6)) * 10])
    np.testing.assert_allclose(MahalanobisDistance(1e-3).fit(fit).score(x), mahalanobis_naive(x, fit, 1e-3),
                               rtol=1e-8)
    np.testing.assert_allclose(KnnDistance(k=7).fit(fit).score(x, chunk_size=3), knn_naive(x, fit, 7), atol=1e-12)
    with pytest.raises(RuntimeError, match="not fitted"):
        KnnDistance().score(x)
    with pytest.raises(ValueError, match="has dim 5, the fitting set has dim 6"):
        MahalanobisDistance().fit(fit).score(x[:, :5])
    with pytest.raises(ValueError, match="at least k=10"):
        KnnDistance(10).fit(fit[:3])


def test_auroc_rows_equals_the_pairwise_reference():
    rng = np.random.default_rng(1)
    u = rng.integers(0, 5, (4, 30)).astype(float)
    failed = rng.random((4, 30)) < 0.4
    failed[3] = True
    got = auroc_rows(u, failed)
    for row in range(3):
        assert got[row] == pytest.approx(auroc_pairwise(u[row][~failed[row]], u[row][failed[row]]))
    assert np.isnan(got[3])


def simpson(seed=2, n=600):
    """Two strata with opposite base rates: ``u`` detects failures within each, ``stratum`` flag pools badly."""
    rng = np.random.default_rng(seed)
    hard = np.arange(n) < n // 2
    failed = rng.random(n) < np.where(hard, 0.8, 0.2)
    signal = failed + rng.normal(0, 1.0, n)
    base = rng.normal(size=n) + 0.3 * failed
    return {"signal": signal, "base": base, "noise": rng.normal(size=n)}, failed, {"hard": hard, "easy": ~hard}


def test_pooled_is_the_weighted_mean_of_strata_and_intervals_cover():
    values, failed, strata = simpson()
    out = stratified_auroc(values, ["base"], failed, strata, n_boot=400, seed=0)
    for name, mask in strata.items():
        entry = out["strata"][name]
        assert entry["queries"] == mask.sum() and entry["failures"] == failed[mask].sum()
        a = entry["signals"]["signal"]
        assert a["auroc"] == pytest.approx(failure_auroc(values["signal"][mask], failed[mask]))
        assert a["ci"][0] < a["auroc"] < a["ci"][1] and a["ci"][1] - a["ci"][0] < 0.2
    pooled = out["pooled"]["signals"]["signal"]["auroc"]
    assert pooled == pytest.approx(np.mean([out["strata"][s]["signals"]["signal"]["auroc"] for s in strata]))
    assert out["strata"]["hard"]["best_baseline"] == "base"
    assert out["useful"]["pooled"] == ["signal"] and "noise" not in out["useful"]["hard"]
    diff = out["pooled"]["signals"]["noise"]
    assert diff["minus_best_baseline_ci"][1] < 0 and not diff["useful"]


def test_bootstrap_interval_has_its_coverage():
    """Over fresh data sets, the 95% interval of one stratum's AUROC holds the true AUROC about 95% of the time."""
    rng = np.random.default_rng(3)
    truth = failure_auroc(np.r_[rng.normal(size=200_000) + 0.7, rng.normal(size=200_000)],
                          np.r_[np.ones(200_000, bool), np.zeros(200_000, bool)])
    hits = 0
    for trial in range(60):
        failed = np.arange(150) < 50
        u = rng.normal(size=150) + 0.7 * failed
        ci = stratified_auroc({"u": u, "b": np.zeros(150)}, ["b"], failed, {"all": np.ones(150, bool)},
                              n_boot=300, seed=trial)["strata"]["all"]["signals"]["u"]["ci"]
        hits += ci[0] <= truth <= ci[1]
    assert hits >= 51  # 95% of 60 is 57; binomial 1% tail is about 52


def test_small_strata_are_reported_without_figures():
    values, failed, strata = simpson()
    strata["tiny"] = np.arange(failed.size) < 6
    out = stratified_auroc(values, ["base"], failed, strata, n_boot=50)
    assert out["strata"]["tiny"]["signals"] is None and "tiny" not in out["pooled"]["strata"]
    with pytest.raises(ValueError, match="at least one baseline"):
        stratified_auroc(values, [], failed, strata)
    with pytest.raises(ValueError, match="signal 'base' has 3 values"):
        stratified_auroc({**values, "base": np.zeros(3)}, ["base"], failed, strata)


def test_failure_kinds_first_match_wins_and_shares_add_up():
    from bayesretrieval.evaluation.failures import failure_kinds, unseen_word_queries

    unseen = unseen_word_queries(["a red star", "a red circle", "Circle, red!"], ["a red circle", "a blue square"])
    assert unseen.tolist() == [True, False, False]
    content = unseen_word_queries(["a star object", "a red object"], ["a red circle"], content_words=["star", "red"])
    assert content.tolist() == [True, False]
    failed = np.array([1, 1, 1, 1, 1, 0], bool)
    out = failure_kinds(failed, [1, 0, 0, 0, 0, 1], [1, 1, 0, 0, 0, 1], [0, 1, 1, 0, 0, 0])
    counts = {k: v["count"] for k, v in out["kinds"].items()}
    assert counts == {"unseen_query_word": 1, "top1_shifted": 1, "relevant_only_shifted": 1, "in_distribution": 2}
    assert out["knowable_share"] == pytest.approx(0.6) and out["flags"]["top1_shifted"] == 2
    assert sum(v["share"] for v in out["kinds"].values()) == pytest.approx(1.0)
    assert not out["kinds"]["in_distribution"]["knowable"]
