"""benchmarks/speed_summary.py: ratios read from the speed benchmarks' records (no benchmark is run)."""

import json

import pytest
from benchmark_scripts import benchmark_module


@pytest.fixture(scope="module")
def script():
    with benchmark_module("speed_summary") as module:
        yield module


def test_summary_from_existing_records(script, tmp_path, capsys):
    modes = {s: {"qps": q, "ratio": q / 100.0, "candidates_mean": 40.0, "ratio_paired": q / 90.0,
                 "ratio_paired_quartiles": [q / 95.0, q / 85.0]} for s, q in (("expected", 50.0), ("lcb", 25.0))}
    search = {label: {"plain": {"qps": 100.0}, **modes} for label in ("flat", "ivf")}
    (tmp_path / "search_speed.json").write_text(json.dumps({"config": {"items": 1000, "dim": 8}, "figures": search}))
    build = {"speed": [{"model": "m", "end_to_end_images_per_s": 9.0, "end_to_end_over_in_memory": 0.9,
                        "scalars_s": 0.1, "scalars_over_encode": 0.02}],
             "memory": [{"images": 10, "peak_rss_with_workers_mib": 300.0}]}
    (tmp_path / "build_index_speed.json").write_text(json.dumps({"config": {}, "figures": build}))
    summary = script.main(["--no-run", "--benchmarks", "search_speed", "build_index_speed", "--out", str(tmp_path)])
    ratios = [row["ratio"] for entry in summary["benchmarks"].values() for row in entry["rows"]]
    assert ratios == [0.5, 0.25, 0.5, 0.25, 0.9, 0.02, None]
    printed = capsys.readouterr().out
    assert ("| search flat 1000 x 8, lcb vs plain FAISS | 25 q/s (candidates mean 40; paired 0.278, "
            "quartiles 0.263-0.294) | 0.25 |") in printed
    assert summary["mode"] == "existing" and sorted(p.name for p in tmp_path.iterdir()) == [
        "build_index_speed.json", "search_speed.json"]


def test_quick_runs_do_not_replace_the_committed_records(script):
    assert script.parse_args([]).out == script.QUICK_OUT
    assert script.parse_args(["--full"]).out == script.parse_args(["--no-run"]).out == script.record.RESULTS_DIR


def test_every_benchmark_has_quick_settings_and_a_script(script):
    for benchmark in script.SpeedBenchmark:
        assert benchmark.script.is_file() and benchmark in script.QUICK_ARGS and benchmark in script.ROWS
