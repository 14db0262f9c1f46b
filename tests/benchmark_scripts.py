"""Importing the scripts under ``benchmarks/`` (not a package) as modules for tests."""

import contextlib
import importlib.util
import sys
from pathlib import Path
from typing import Iterator

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.append(str(BENCHMARKS))  # the scripts' own imports (``import record``), as when run directly


@contextlib.contextmanager
def benchmark_module(name: str) -> Iterator:
    """``benchmarks/<name>.py`` imported as module ``name``, registered in ``sys.modules`` while in use.

    Registration lets dataclasses defined in the script resolve their annotations.
    """
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)
