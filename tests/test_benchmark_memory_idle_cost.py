"""benchmarks/memory_idle_cost.py on tiny arrays: one median per array and pause, written to JSON."""

import json
import math

import pytest

from benchmark_scripts import benchmark_module


def test_probe_reports_every_pause_for_both_arrays(tmp_path, capsys):
    output = tmp_path / "idle.json"
    with benchmark_module("memory_idle_cost") as probe:
        results = probe.main(["--rows", "2000", "--dim", "16", "--table-mib", "1", "--reads", "50",
                              "--pauses", "0", "0.01", "--trials", "2", "--output", str(output)])
    assert json.loads(output.read_text()) == results
    assert set(results["us_per_read"]) == {"row", "table"}
    for by_pause in results["us_per_read"].values():
        assert list(by_pause) == ["0", "0.01"]
        assert all(math.isfinite(us) and us > 0 for us in by_pause.values())
    printed = capsys.readouterr().out
    assert "64 B row of 0.1 MiB: after 0 s idle" in printed
    assert "8 B from 1 MiB: after 0 s idle" in printed


def test_probe_refuses_empty_sizes(tmp_path):
    with benchmark_module("memory_idle_cost") as probe, pytest.raises(SystemExit, match="must be positive"):
        probe.main(["--rows", "0", "--output", str(tmp_path / "x.json")])
