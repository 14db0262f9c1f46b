"""benchmarks/record.py (one JSON record per run) and benchmarks/report.py (RESULTS.md, the README's headlines)."""

import argparse
import json
import subprocess
from pathlib import Path

import pytest
from benchmark_scripts import BENCHMARKS, benchmark_module

HELPERS = {"record", "report", "formatters"}
DERIVED = {"speed_summary"}  # runs the speed benchmarks and prints their ratios; writes no record of its own


@pytest.fixture(scope="module")
def report():
    with benchmark_module("report") as module:
        yield module


@pytest.fixture(scope="module")
def record(report):
    return report.record


def test_committed_results_and_readme_are_current(report):
    assert report.main(["--check"]) == 0, "run .venv/bin/python benchmarks/report.py and commit the result"


def test_every_benchmark_script_writes_a_record():
    for path in BENCHMARKS.glob("*.py"):
        if path.stem not in HELPERS | DERIVED:
            assert "record.save(" in path.read_text(), f"{path.name} does not write through record.save"


def test_record_says_how_the_figures_were_produced(record, tmp_path):
    args = argparse.Namespace(draws=10, hessians=record.ROOT / "benchmarks", sizes=["a", "b"], output=None,
                              shared=record.ROOT.parent / "shared" / "x")
    path = record.save("demo", BENCHMARKS / "cosine_accuracy.py", args, {"worst": 0.5},
                       ["--draws", "10"], tmp_path / "out" / "demo.json")
    data = json.loads(path.read_text())
    assert data["benchmark"] == "demo" and data["figures"] == {"worst": 0.5}
    assert data["command"] == ["benchmarks/cosine_accuracy.py", "--draws", "10"]
    assert data["config"] == {"draws": 10, "hessians": "benchmarks", "sizes": ["a", "b"], "output": None,
                              "shared": "../shared/x"}  # no machine's own folders in a committed record
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=record.ROOT, capture_output=True, text=True).stdout
    assert data["commit"]["sha"] == head.strip() and isinstance(data["commit"]["dirty"], bool)
    assert {"platform", "cpu_count", "python", "numpy", "torch", "faiss"} <= set(data["machine"])
    assert data["created_at"].endswith("+00:00")


def test_default_output_is_the_committed_results_folder(record):
    assert record.default_output("x") == record.ROOT / "benchmarks" / "results" / "x.json"
    ignored = subprocess.run(["git", "check-ignore", "-q", "benchmarks/results/x.json"], cwd=record.ROOT)
    assert ignored.returncode == 1, "benchmarks/results/ must not be git-ignored"


def test_figures_must_be_a_dict(record, tmp_path):
    with pytest.raises(TypeError, match="figures must be a dict, got list"):
        record.save("demo", "x.py", argparse.Namespace(), [1, 2], [], tmp_path / "demo.json")


def test_outside_git_the_commit_is_unknown(record, tmp_path):
    assert record.git_commit(tmp_path) == {"sha": None, "dirty": None}


def write_demo(record, folder: Path, figures: dict, name: str = "demo") -> Path:
    args = argparse.Namespace(size=3, output=folder / f"{name}.json")
    return record.save(name, BENCHMARKS / f"{name}.py", args, figures, ["--size", "3"], folder / f"{name}.json")


def test_generated_results_and_check_mode(report, record, tmp_path):
    results = tmp_path / "results"
    write_demo(record, results, {"speed": 2.5, "models": [{"name": "a", "recall": {"1": 0.5}}],
                                 "by_mode": {"fast": {"qps": 10.0}, "slow": {"qps": 1.0}}})
    argv = ["--results", str(results), "--markdown", str(tmp_path / "RESULTS.md"), "--readme", str(tmp_path / "none")]
    assert report.main([*argv, "--check"]) == 1 and not (tmp_path / "RESULTS.md").exists()
    assert report.main(argv) == 0 and report.main([*argv, "--check"]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## demo" in text and "- Command: `.venv/bin/python benchmarks/demo.py --size 3`" in text
    assert "- Configuration: size=3\n" in text
    assert "| figure | value |\n|---|---|\n| speed | 2.5 |" in text
    assert "| name | recall.1 |\n|---|---|\n| a | 0.5 |" in text
    assert "|  | qps |\n|---|---|\n| fast | 10 |\n| slow | 1 |" in text
    write_demo(record, results, {"speed": 3.0})
    assert report.main([*argv, "--check"]) == 1


def test_headline_block_between_markers(report, record, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "cosine_accuracy.json").write_text((record.RESULTS_DIR / "cosine_accuracy.json").read_text())
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nBefore.\n{report.HEADLINE_START}\nold table\n{report.HEADLINE_END}\nAfter.\n")
    argv = ["--results", str(results), "--markdown", str(tmp_path / "RESULTS.md"), "--readme", str(readme)]
    assert report.main(argv) == 0 and report.main([*argv, "--check"]) == 0
    text = readme.read_text()
    assert text.startswith("# Title\n\nBefore.\n") and text.endswith(f"{report.HEADLINE_END}\nAfter.\n")
    assert "old table" not in text and "search" not in text  # no search_speed record: left out, not invented
    assert "| cosine std, worst error vs Monte Carlo: `second_order` / `published` |" in text
    assert "`benchmarks/cosine_accuracy.py`" in text
    readme.write_text(text.replace("After.", "After, edited."))
    assert report.main([*argv, "--check"]) == 0  # only the block is generated
    readme.write_text(text.replace("| cosine std", "| cosine"))
    assert report.main([*argv, "--check"]) == 1


def test_readme_without_markers_is_left_alone_and_half_markers_refused(report):
    assert report.with_headline("no markers\n", "| t |") == "no markers\n"
    with pytest.raises(ValueError, match="needs <!-- headline-figures:start --> before"):
        report.with_headline(f"{report.HEADLINE_END}\n{report.HEADLINE_START}\n", "| t |")


def test_numbers(report):
    number = report.formatters.number
    assert [number(v) for v in (0.919123, 12345.6, 1e-06, 3, None, [0.5, 0.25], float("nan"))] == [
        "0.9191", "12346", "1e-06", "3", "-", "0.5, 0.25", "nan"]
    assert report.formatters.table([{"a": "x|y"}]) == "| a |\n|---|\n| x\\|y |"


def test_calibration_strata_block_between_its_markers(report, record, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    readme = tmp_path / "README.md"
    readme.write_text(f"# T\n{report.STRATA_START}\nold\n{report.STRATA_END}\n")
    argv = ["--results", str(results), "--markdown", str(tmp_path / "RESULTS.md"), "--readme", str(readme)]
    assert report.main(argv) == 0 and "No stratified `retrieval_calibration` record yet." in readme.read_text()
    (results / "retrieval_calibration.json").write_text((record.RESULTS_DIR / "retrieval_calibration.json").read_text())
    assert report.main(argv) == 0 and report.main([*argv, "--check"]) == 0
    text = readme.read_text()
    assert "| stratum | n | failures | std |" in text and "pooled (weighted mean)" in text and "old" not in text
