"""benchmarks/retrieval_calibration.py end to end with the test model: a quick run, its record and its tables."""

import json

import numpy as np
import pytest
from benchmark_scripts import benchmark_module

ARGS = ["--size", "test", "--n-clean", "60", "--n-shift", "12", "--severities", "3", "5", "--queries", "240",
        "--n-fit", "512", "--estimators", "second_order", "--bootstrap", "100", "--held-out-pairs", "128"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("calibration")
    with benchmark_module("retrieval_calibration") as script:
        results = script.main([*ARGS, "--work", str(tmp / "work"), "--output", str(tmp / "out.json")])
        yield script, results, json.loads((tmp / "out.json").read_text())


def test_record_holds_the_figures_and_visible_labels_are_stricter(run):
    _, results, saved = run
    assert saved["benchmark"] == "retrieval_calibration" and saved["figures"]["model"] == "bayes-tiny"
    queries = results["queries"]
    assert queries["full"] == 120 and sum(queries[f"partial-{n}"] for n in (1, 2, 3)) == 120
    assert queries["mean_relevant_full"] <= queries["mean_relevant_full_scene_labels"]
    assert queries["mean_relevant_partial"] <= queries["mean_relevant_partial_scene_labels"]
    summary = results["estimators"]["second_order"]
    assert "signals" not in summary  # no AUROC over pooled strata
    assert summary["engine_check"]["agree"] == summary["engine_check"]["queries"]


def test_every_figure_is_per_stratum_with_intervals_and_a_verdict(run):
    _, results, _ = run
    stratified = results["estimators"]["second_order"]["stratified"]
    assert {"std", "item_std", "probit_softmax", "aleatoric_std", "total_std", "item_scale", "lcb_flip", "cosine",
            "margin", "softmax", "item_mahalanobis", "item_knn", "query_mahalanobis",
            "query_knn"} <= set(stratified["signals"])
    for view in ("visible", "scene"):
        query = stratified["views"][view]["query"]
        assert set(query["strata"]) == {"full", "partial-1", "partial-2", "partial-3"}
        assert "clean" in stratified["views"][view]["top1"]["strata"]
        reported = {s: e for s, e in query["strata"].items() if e["signals"]}
        assert reported, "at least one stratum must have enough failures and successes"
        weights = np.array([reported[s]["queries"] for s in query["pooled"]["strata"]])
        for name, pooled in query["pooled"]["signals"].items():
            per_stratum = [reported[s]["signals"][name]["auroc"] for s in query["pooled"]["strata"]]
            assert pooled["auroc"] == pytest.approx(np.dot(weights, per_stratum) / weights.sum())
            assert pooled["ci"][0] <= pooled["auroc"] <= pooled["ci"][1]
            if not stratified["signals"][name]["baseline"]:
                assert pooled["useful"] == (pooled["minus_best_baseline_ci"][0] > 0)
    failures = stratified["failures"]
    assert sum(k["count"] for k in failures["kinds"].values()) == failures["failures"] > 0


def test_risk_averse_rankings_and_the_task_prior_are_measured_against_expected(run):
    _, results, _ = run
    summary = results["estimators"]["second_order"]
    for family in ("lcb", "lcb_item"):
        gain = summary["ranking_gain"][family]
        assert gain["label"] in summary["retrieval"] and gain["label"].startswith(f"{family}(kappa=")
        assert set(gain["strata"]) == {"full", "partial-1", "partial-2", "partial-3"}
        assert gain["pooled"]["ci"][0] <= gain["pooled"]["difference"] <= gain["pooled"]["ci"][1]
        assert gain["pooled"]["queries"] == summary["queries"]["held_out"]
    prior = results["task_prior"]
    assert prior["pairs"] == 128 and prior["log_likelihood"] >= prior["evidence_log_likelihood"]
    assert max(max(row) for row in prior["log_likelihood_grid"]) == prior["log_likelihood"]
    tuned = results["estimators"]["second_order, task prior"]
    assert tuned["engine_check"]["agree"] == tuned["engine_check"]["queries"] and "stratified" in tuned


def test_the_last_block_index_holds_the_same_items_with_their_own_covariance(run):
    _, results, _ = run
    lastblock = results["estimators"]["second_order, last block"]
    assert lastblock["engine_check"]["agree"] == lastblock["engine_check"]["queries"]
    assert results["lastblock"]["items"] == results["gallery"]["items"]
    assert results["lastblock"]["trace_quartiles"][0] > 0 and results["aleatoric"]["pairs"] == 128
    detection = results["image_shift_detection"]
    assert detection["severity"] == 5 and "blur" in detection["strata"]
    scored = [e for e in detection["strata"].values() if e["signals"]]
    assert scored and all({"item_scale", "lastblock_trace", "aleatoric_var", "item_knn"} <= set(e["signals"])
                          for e in scored)
    projection = results["estimators"]["second_order"]["retrieval"]["lcb(kappa=1)"]
    assert lastblock["retrieval"]["lcb(kappa=1)"] != projection  # another posterior ranks differently


def test_tables_render_from_the_record(run):
    script, _, saved = run
    text = "\n\n".join(script.formatters.calibration_benchmark(saved))
    assert "Failure AUROC, visible labels, query strata" in text and "pooled (weighted mean)" in text
    assert "Held-out failures by kind" in text
    assert "Precision@10 of the risk-averse scores minus `expected`" in text and "**second_order, task prior**" in text
    assert "**second_order, last block**" in text and "Image-side shift detection" in text
    summary = script.formatters.calibration_summary(saved)
    assert summary.startswith("| stratum | n | failures | std |") and "knowable" in summary
