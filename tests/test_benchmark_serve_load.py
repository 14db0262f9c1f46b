"""benchmarks/serve_load.py end to end, very short: real servers, concurrent clients, updates under load."""

import json

import pytest
from benchmark_scripts import benchmark_module

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_load")
    with benchmark_module("serve_load") as script:
        figures = script.main(["--size", "test", "--n-fit", "512", "--n-gallery", "60", "--queries", "50",
                               "--clients", "3", "--rounds", "1", "--seconds", "1.5", "--in-process-seconds", "1",
                               "--workers", "1", "--updates", "1", "--update-gap", "0.5", "--update-images", "3",
                               "--work", str(tmp / "work"), "--output", str(tmp / "out.json")])
    return figures, json.loads((tmp / "out.json").read_text())


def test_the_record_holds_throughput_against_in_process_search(run):
    figures, saved = run
    assert saved["benchmark"] == "serve_load" and saved["config"]["clients"] == 3
    phase = figures["rounds"][0]
    assert phase["in_process_qps"] > 0 and phase["http"]["1"]["errors"] == 0
    assert phase["http"]["1"]["requests"] > 0
    assert phase["ratio"]["1"] == pytest.approx(phase["http"]["1"]["rps"] / phase["in_process_qps"])
    assert figures["summary"]["1"]["requests"] == phase["http"]["1"]["requests"]


def test_an_update_under_load_is_seen_by_the_next_requests_without_errors(run):
    updates = run[0]["updates"]
    assert updates["errors"] == 0 and updates["requests"] > 0 and updates["all_seen"]
    (version,) = updates["versions"]
    assert version["version"] == "v000002" and version["first_seen_s"] < 1.0
    assert updates["max_last_stale_s"] is None or updates["max_last_stale_s"] < 1.0
