"""The README's Python snippets run as written after the quickstart's demo."""

import re
import subprocess
import sys

import pytest
from conftest import PROJECT_ROOT

README = PROJECT_ROOT / "README.md"
DEMO = ["-m", "bayesretrieval.cli", "demo", "-k", "2"]


def python_blocks() -> list[str]:
    """Every fenced ``python`` block of the README, in order."""
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """A folder holding ``demo-output/`` from a run of ``bayesretrieval demo``, as the quickstart makes it."""
    folder = tmp_path_factory.mktemp("readme")
    subprocess.run([sys.executable, *DEMO], cwd=folder, check=True, capture_output=True, timeout=900)
    return folder


def test_the_readme_has_python_snippets_and_the_two_quickstart_commands():
    text = README.read_text()
    quickstart = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"^    (\S.*)$", quickstart, flags=re.M) == ["make demo", "make test"]
    assert len(python_blocks()) >= 3


@pytest.mark.parametrize("number", range(len(python_blocks())))
def test_snippet_runs_as_written(demo_dir, number):
    snippet = python_blocks()[number]
    done = subprocess.run([sys.executable, "-c", snippet], cwd=demo_dir, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
