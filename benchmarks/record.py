"""Writing a benchmark's result as one JSON record under ``benchmarks/results/``.

Every script in ``benchmarks/`` saves what it measured through :func:`save`, so each
result carries how it was produced beside its numbers:

- ``benchmark``: the record's name (the file is ``<benchmark>.json``);
- ``command``: the script (relative to the repository) and its arguments;
- ``config``: the parsed arguments;
- ``commit``: ``git rev-parse HEAD`` and whether tracked files outside the results
  differed from it;
- ``machine``: platform, CPU, thread count and library versions;
- ``created_at``: UTC time of writing;
- ``figures``: the benchmark's numbers.

``benchmarks/report.py`` turns the records into ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
FORMAT_VERSION = 1
RESULT_PATHS = ("benchmarks/results", "benchmarks/RESULTS.md", "README.md")
"""Paths that the results themselves change: not counted as a dirty working tree."""
LIBRARIES = ("numpy", "torch", "faiss")


def apply_quick(args: argparse.Namespace, quick: dict) -> argparse.Namespace:
    """Override ``args`` with a script's ``--quick`` settings when ``args.quick`` is set; returns ``args``."""
    if args.quick:
        for name, value in quick.items():
            setattr(args, name, value)
    return args


def default_output(benchmark: str) -> Path:
    """``benchmarks/results/<benchmark>.json``."""
    return RESULTS_DIR / f"{benchmark}.json"


def save(benchmark: str, script: str | Path, args: argparse.Namespace, figures: dict,
         argv: list[str] | None = None, output: Path | None = None) -> Path:
    """Write the record of one run and return its path.

    Args:
        benchmark: the record's name.
        script: the benchmark script (its ``__file__``).
        args: the parsed arguments, stored as ``config``.
        figures: the numbers measured (JSON-serialisable).
        argv: the arguments the script was given (default: ``sys.argv[1:]``).
        output: where to write (default: :func:`default_output`).
    """
    data = record(benchmark, script, args, figures, sys.argv[1:] if argv is None else argv)
    path = default_output(benchmark) if output is None else Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def record(benchmark: str, script: str | Path, args: argparse.Namespace, figures: dict,
           argv: list[str]) -> dict:
    """The record of one run (see the module docstring)."""
    if not isinstance(figures, dict):
        raise TypeError(f"figures must be a dict, got {type(figures).__name__}")
    return {
        "format_version": FORMAT_VERSION,
        "benchmark": benchmark,
        "command": [_relative(Path(script)), *map(str, argv)],
        "config": {name: _plain(value) for name, value in vars(args).items()},
        "commit": git_commit(),
        "machine": machine(),
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "figures": figures,
    }


def git_commit(root: Path = ROOT) -> dict:
    """``{"sha": HEAD or None outside a git checkout, "dirty": tracked changes outside the results}``."""
    try:
        sha = _git(root, "rev-parse", "HEAD")
        changes = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ".",
                       *(f":(exclude){path}" for path in RESULT_PATHS))
    except (OSError, subprocess.CalledProcessError):
        return {"sha": None, "dirty": None}
    return {"sha": sha, "dirty": bool(changes)}


def machine() -> dict:
    """Platform, CPU, cores, torch threads and library versions of this process."""
    info = {"platform": platform.platform(), "processor": _cpu_name(), "cpu_count": os.cpu_count(),
            "python": platform.python_version()}
    for name in LIBRARIES:
        info[name] = importlib.import_module(name).__version__
    info["torch_threads"] = importlib.import_module("torch").get_num_threads()
    return info


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def _cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` where there is one, else ``platform.processor()``."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _relative(path: Path) -> str:
    """``path`` relative to the repository, ``../`` for its neighbours such as ``../shared``.

    So no record names a machine's own folders. Relative paths, and those sharing no folder
    with the repository, stay as given.
    """
    if not path.is_absolute():
        return str(path)
    absolute = Path(os.path.abspath(path))  # not resolved: ``../shared`` may be a link
    if absolute.is_relative_to(ROOT.parent):
        return os.path.relpath(absolute, ROOT)
    return str(path)


def _plain(value):
    """Argument values as JSON: paths relative to the repository where inside it."""
    if isinstance(value, Path):
        return _relative(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
