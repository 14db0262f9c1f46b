"""benchmarks/search_speed.py on a tiny collection: every mode timed, every engine query certified."""

import json

import pytest
import torch
from benchmark_scripts import benchmark_module

TINY = ["--items", "3000", "--dim", "32", "--clusters", "20", "--batches", "2", "--repeats", "3"]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("search_speed") / "search_speed.json"
    threads = torch.get_num_threads()
    try:
        with benchmark_module("search_speed") as script:
            script.main([*TINY, "--output", str(out)])
    finally:
        torch.set_num_threads(threads)  # the script sets torch's threads for its process; this one goes on
    return json.loads(out.read_text())


@pytest.mark.parametrize("label", ["flat", "ivf"])
def test_every_mode_is_timed_against_plain_faiss(written, label):
    timing = written["figures"][label]
    plain_at_first_rounds = [f"plain_k{count}" for count in sorted(set(written["figures"]["first_round"].values()))]
    assert [name for name in timing if name.startswith("plain")] == ["plain", *plain_at_first_rounds]
    assert timing["plain"]["ms_per_batch"] == pytest.approx(1000 * timing["plain"]["seconds"] / 2)
    for name in (*plain_at_first_rounds, "expected", "lcb"):
        low, high = timing[name]["ratio_paired_quartiles"]
        assert 0 < low <= timing[name]["ratio_paired"] <= high
        assert timing[name]["ratio"] == pytest.approx(timing[name]["qps"] / timing["plain"]["qps"])
        assert timing[name]["ratio_median"] == pytest.approx(timing[name]["qps_median"] / timing["plain"]["qps_median"])
    assert all("candidates_mean" not in timing[name] for name in plain_at_first_rounds)
    assert 0 < timing["mean_fetch"]["ratio_bound"] < 1


@pytest.mark.parametrize("label", ["flat", "ivf"])
def test_engine_modes_are_certified(written, label):
    for name in ("expected", "lcb"):
        stats = written["figures"][label][name]
        assert stats["certified_fraction"] == 1.0
        assert stats["exact_fraction"] == (1.0 if label == "flat" else 0.0)
        assert 10 < stats["needed_mean"] <= stats["candidates_mean"]


def test_record_says_how_it_was_produced(written):
    assert written["benchmark"] == "search_speed" and written["command"][0] == "benchmarks/search_speed.py"
    assert written["command"][1:3] == TINY[:2] and written["config"]["items"] == 3000


def test_report_tables_and_headline_from_the_record(written):
    with benchmark_module("report") as report:
        text = report.section(written)
        headline = report.formatters.search_headline(written)
    assert "## search_speed" in text and text.count("| mode | q/s | ms/batch |") == 2
    assert [figure.split(" / ")[0] for figure, _ in headline] == ["search `expected`", "search `lcb`"] * 2
    assert all("paired median (quartiles" in value for _, value in headline)
