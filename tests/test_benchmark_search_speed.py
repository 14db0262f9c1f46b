"""benchmarks/search_speed.py on a tiny collection: every mode timed, every engine query certified."""

import json

import pytest
from benchmark_scripts import benchmark_module

from bayesretrieval.queries.candidates import default_candidates

TINY = ["--items", "3000", "--dim", "32", "--clusters", "20", "--batches", "2", "--repeats", "3"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("search_speed") / "search_speed.json"
    with benchmark_module("search_speed") as script:
        script.main([*TINY, "--output", str(out)])
    return json.loads(out.read_text())


@pytest.mark.parametrize("label", ["flat", "ivf"])
def test_every_mode_is_timed_against_plain_faiss(results, label):
    timing = results[label]
    plain_at_first_round = f"plain_k{default_candidates(results['k'])}"
    for name in (plain_at_first_round, "expected", "lcb"):
        low, high = timing[name]["ratio_paired_quartiles"]
        assert 0 < low <= timing[name]["ratio_paired"] <= high
        assert timing[name]["ratio"] == pytest.approx(timing[name]["qps"] / timing["plain"]["qps"])
    assert "candidates_mean" not in timing[plain_at_first_round]


@pytest.mark.parametrize("label", ["flat", "ivf"])
def test_engine_modes_are_certified(results, label):
    for name in ("expected", "lcb"):
        stats = results[label][name]
        assert stats["certified_fraction"] == 1.0
        assert stats["exact_fraction"] == (1.0 if label == "flat" else 0.0)
        assert 10 < stats["needed_mean"] <= stats["candidates_mean"]
