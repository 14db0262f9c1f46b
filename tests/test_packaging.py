"""Packaging: the top-level API, imports covered by the core dependencies, a plain ``pip install .``."""

import ast
import importlib.metadata
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import bayesretrieval
from bayesretrieval import indexing, model, posterior, queries, store

tomllib = pytest.importorskip("tomllib")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = PROJECT_ROOT / "bayesretrieval"


def test_top_level_api_is_the_subpackages_objects():
    from bayesretrieval import BayesCLIP, IndexReader, PosteriorPair, ScoreName, Searcher, build_index

    assert (Searcher, BayesCLIP, build_index) == (queries.Searcher, model.BayesCLIP, indexing.build_index)
    assert (PosteriorPair, IndexReader, ScoreName) == (posterior.PosteriorPair, store.IndexReader, queries.ScoreName)
    assert bayesretrieval.__all__ == sorted(bayesretrieval.__all__)
    assert all(hasattr(bayesretrieval, name) for name in bayesretrieval.__all__)


def _third_party_imports() -> dict[str, bool]:
    """Top-level modules that ``bayesretrieval`` imports, each mapped to whether any import of it is at module level."""
    found: dict[str, bool] = {}

    def visit(node: ast.AST, deferred: bool) -> None:
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            found[top] = found.get(top, False) or not deferred
        inside = deferred or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    for path in PACKAGE_DIR.rglob("*.py"):
        visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), False)
    return {name: eager for name, eager in found.items()
            if name not in sys.stdlib_module_names and name != "bayesretrieval"}


def _requirement_names(requirements) -> set[str]:
    return {canonicalize_name(Requirement(text).name) for text in requirements}


def test_imports_are_provided_by_the_declared_dependencies():
    """Module-level imports need a core dependency; imports inside functions may come from an extra."""
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    core = _requirement_names(project["dependencies"])
    extras = _requirement_names(r for group in project["optional-dependencies"].values() for r in group)
    providers = importlib.metadata.packages_distributions()
    unprovided = {}
    for module, eager in _third_party_imports().items():
        distributions = {canonicalize_name(d) for d in providers.get(module, [])}
        if not distributions & (core if eager else core | extras):
            unprovided[module] = sorted(distributions) or "not installed"
    assert not unprovided, f"imported but not declared (eager imports need a core dependency): {unprovided}"


SMOKE_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path

    import numpy as np
    import torch
    from PIL import Image

    import bayesretrieval
    from bayesretrieval import BuildConfig, ClipEncoder, PosteriorPair, Searcher, build_index
    from bayesretrieval.posterior import KroneckerPosterior

    assert Path(bayesretrieval.__file__).is_relative_to(sys.prefix), bayesretrieval.__file__
    root = Path(sys.argv[1])
    rng = np.random.default_rng(0)
    for i in range(6):
        (root / "img").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
    eye = lambda: torch.eye(64, dtype=torch.float64)  # noqa: E731
    posterior = PosteriorPair(*(KroneckerPosterior.from_factors(eye(), eye(), 10.0, 5.0, m) for m in ("image", "text")),
                              source="smoke-test")
    encoder = ClipEncoder.from_pretrained("bayes-tiny", None)
    build_index(root / "img", root / "index", encoder, posterior, BuildConfig(batch_size=4, workers=0))
    results = Searcher.open(root / "index", encoder=encoder).search(["a red circle"], k=3, score="lcb")
    assert len(results) == 3 and results["path"].str.endswith(".png").all(), results
    print("smoke search ok")
""")


@pytest.mark.slow
def test_plain_pip_install_searches(tmp_path):
    """A fresh venv, ``pip install .`` without extras, then build and search a tiny index in it."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(PROJECT_ROOT / name, source / name)
    shutil.copytree(PACKAGE_DIR, source / "bayesretrieval", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    python = venv / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "--quiet", source], check=True, timeout=1500)
    (tmp_path / "work").mkdir()
    run = subprocess.run([python, "-c", SMOKE_SCRIPT, tmp_path / "work"], cwd=tmp_path / "work", capture_output=True,
                         text=True, timeout=600, env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                                                      "HOME": str(Path.home())})
    assert run.returncode == 0 and "smoke search ok" in run.stdout, run.stdout + run.stderr
