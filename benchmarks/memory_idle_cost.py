"""What it costs on this machine to read memory again after it has sat idle.

The search engine's work after a FAISS search is many small, random reads: stored rows,
lookup tables, its own temporaries. On some virtual machines, memory left untouched for
a moment costs far more to touch again than the same memory read at once, and the
ratios of ``search_speed.py`` then move with it. This probe measures it directly:

- random rows (``--dim`` float32 each) of an in-use ``--rows`` x ``--dim`` array;
- random 8-byte reads from a ``--table-mib`` table;

each read once, then read again after an idle pause of each of ``--pauses`` seconds,
``--trials`` times; the median time per element of the second read is reported.

    .venv/bin/python benchmarks/memory_idle_cost.py
    .venv/bin/python benchmarks/memory_idle_cost.py --rows 200000 --pauses 0 1 --trials 3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the large array")
    parser.add_argument("--dim", type=int, default=512, help="float32 values per row")
    parser.add_argument("--table-mib", type=int, default=8, help="size of the small table")
    parser.add_argument("--reads", type=int, default=1100, help="random reads per timing")
    parser.add_argument("--pauses", type=float, nargs="+", default=[0.0, 0.5, 2.0, 5.0, 20.0],
                        help="idle seconds before each timing")
    parser.add_argument("--trials", type=int, default=3, help="timings per pause (median reported)")
    parser.add_argument("--output", type=Path, default=Path("results/memory_idle_cost.json"))
    return parser.parse_args(argv)


def microseconds_per_reread(array: np.ndarray, reads: int, pause: float, rng: np.random.Generator) -> float:
    """Microseconds per element to read ``reads`` random elements (rows) of ``array`` again, ``pause`` s after reading them."""
    positions = rng.integers(0, len(array), reads)
    float(array[positions].sum())
    time.sleep(pause)
    start = time.perf_counter()
    float(array[positions].sum())
    return 1e6 * (time.perf_counter() - start) / reads


def idle_costs(arrays: dict[str, np.ndarray], pauses: list[float], trials: int, reads: int,
               rng: np.random.Generator) -> dict[str, dict[str, float]]:
    """Median microseconds per re-read of each array after each pause: ``{name: {pause: us}}``."""
    costs = {name: {} for name in arrays}
    for pause in pauses:
        for name, array in arrays.items():
            samples = [microseconds_per_reread(array, reads, pause, rng) for _ in range(trials)]
            costs[name][f"{pause:g}"] = float(np.median(samples))
    return costs


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.rows <= 0 or args.dim <= 0 or args.table_mib <= 0 or args.reads <= 0 or args.trials <= 0:
        raise SystemExit("--rows, --dim, --table-mib, --reads and --trials must be positive")
    rng = np.random.default_rng(0)
    rows = np.ones((args.rows, args.dim), np.float32)
    table = np.ones((args.table_mib << 20) // 8, np.int64)
    costs = idle_costs({"row": rows, "table": table}, args.pauses, args.trials, args.reads, rng)
    results = {"rows": args.rows, "dim": args.dim, "table_mib": args.table_mib, "reads": args.reads,
               "trials": args.trials, "us_per_read": costs}
    for name, by_pause in costs.items():
        what = f"{rows.itemsize * args.dim} B row of {rows.nbytes / 2**20:.1f} MiB" if name == "row" else \
            f"8 B from {args.table_mib} MiB"
        print(f"{what}: " + ", ".join(f"after {pause} s idle {us:.2f} us" for pause, us in by_pause.items()))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
