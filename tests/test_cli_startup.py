"""The console script answers --help and --version without loading torch, FAISS or open_clip."""

import os
import subprocess
import sys
import time

import pytest

from bayesretrieval import __version__, options

HEAVY = ("torch", "faiss", "open_clip", "pandas", "pyarrow", "PIL")


def run_python(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run the interpreter in a fresh process, offline; returns the result and its wall time."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)
    return result, time.perf_counter() - start


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--help"], "usage: bayesretrieval"),
        (["--version"], f"bayesretrieval {__version__}"),
        (["search", "--help"], "usage: bayesretrieval search"),
        (["build-index", "--help"], "usage: bayesretrieval build-index"),
    ],
)
def test_help_and_version_answer(argv, expected):
    result, _ = run_python("-m", "bayesretrieval.cli", *argv)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout


def test_building_the_parser_loads_no_heavy_module():
    code = (
        "import sys; from bayesretrieval.cli import build_parser; build_parser(); "
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    result, _ = run_python("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_import_bayesretrieval_is_lazy_but_complete():
    code = (
        "import sys, bayesretrieval; "
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules)); "
        "from bayesretrieval import Searcher, BayesCLIP; "
        "print(all(getattr(bayesretrieval, n) is not None for n in bayesretrieval.__all__), "
        "set(bayesretrieval.__all__) <= set(dir(bayesretrieval)))"
    )
    result, _ = run_python("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["[]", "True True"]


def test_help_is_fast():
    """A generous bound (the check above is the robust one): --help took 5-10 s with eager imports."""
    result, seconds = run_python("-m", "bayesretrieval.cli", "--help")
    assert result.returncode == 0, result.stderr
    assert seconds < 3.0, f"--help took {seconds:.1f} s"


def test_moved_options_are_the_same_objects():
    from bayesretrieval import encoders, similarity, training
    from bayesretrieval.indexing import decode
    from bayesretrieval.queries import candidates, scorers
    from bayesretrieval.world import io, shifts, world

    assert similarity.CosineEstimator is options.CosineEstimator
    assert similarity.DEFAULT_ESTIMATOR is options.DEFAULT_ESTIMATOR
    assert scorers.ScoreName is options.ScoreName
    assert training.ModelSize is options.ModelSize
    assert shifts.Shift is options.Shift and world.Part is options.Part and io.ImageFormat is options.ImageFormat
    assert (encoders.DEFAULT_MODEL, encoders.DEFAULT_PRETRAINED) == (options.DEFAULT_MODEL, options.DEFAULT_PRETRAINED)
    assert (decode.DEFAULT_MAX_PIXELS, candidates.DEFAULT_MAX_CANDIDATES) == (
        options.DEFAULT_MAX_PIXELS,
        options.DEFAULT_MAX_CANDIDATES,
    )
    assert [s for s in shifts.Shift if s.is_pixel] == list(shifts.CORRUPTIONS)


def test_folded_options_are_the_same_objects():
    """Owners import these from options; the old import paths give the very same objects."""
    from bayesretrieval import training
    from bayesretrieval.indexing import export, pipeline
    from bayesretrieval.posterior import curvature, fit, prior

    assert fit.DEFAULT_CHUNK_SIZE is options.DEFAULT_CHUNK_SIZE
    assert curvature.DEFAULT_SOURCE_BATCH is options.DEFAULT_SOURCE_BATCH
    assert prior.PriorObjective is options.PriorObjective
    assert export.ExportFormat is options.ExportFormat and export.DEFAULT_ROWS_PER_FILE is options.DEFAULT_ROWS_PER_FILE
    assert pipeline.default_workers is options.default_workers
    assert {s: (c.model_name, c.steps, c.batch_size) for s, c in training.TRAIN_CONFIGS.items()} == options.TRAIN_RUNS
