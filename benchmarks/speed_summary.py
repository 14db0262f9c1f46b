"""One table of speed ratios against their baselines, from the project's speed benchmarks.

Runs, one after the other (never two at once), with quick settings by default:

- ``benchmarks/fit_speed.py``: posterior fitting throughput (ViT-B-32 encode plus the
  curvature of chunk size C) over encoding alone, and the per-pair curvature cost of each
  C against the smallest;
- ``benchmarks/build_index_speed.py``: end-to-end ``build_index`` over JPEG files against
  encoding the same images already in memory, and the posterior scalars' share of
  encode time, for ViT-B-32 (random weights) and the tiny model;
- ``benchmarks/search_speed.py``: ``Searcher.search`` (``expected`` and ``lcb``) queries
  per second against plain FAISS on the same vectors, Flat and IVF.

Each writes its record (``benchmarks/record.py``) as ``<name>.json`` into ``--out``; this
script then prints one Markdown table of their ratios. It writes no JSON of its own: the
table is derived from the records, and ``benchmarks/report.py`` puts it in RESULTS.md.
``--full`` runs the benchmarks with their own defaults (tens of minutes) into
``benchmarks/results/``; quick runs are smoke checks and go to ``results/speed/`` unless
``--out`` says otherwise, so they never replace the committed results. ``--no-run`` only
summarises the records already in ``--out`` (default ``benchmarks/results/``).

    .venv/bin/python benchmarks/speed_summary.py              # quick, a few minutes on 2 cores
    .venv/bin/python benchmarks/speed_summary.py --full
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Callable

import record

BENCHMARKS_DIR = Path(__file__).resolve().parent
QUICK_OUT = Path("results/speed")


class SpeedBenchmark(str, Enum):
    """The speed benchmarks summarised, by script name."""

    FIT = "fit_speed"
    """Posterior fitting: curvature and encode throughput (``benchmarks/fit_speed.py``)."""
    BUILD_INDEX = "build_index_speed"
    """Index building end to end vs in-memory encoding (``benchmarks/build_index_speed.py``)."""
    SEARCH = "search_speed"
    """Certified search vs plain FAISS (``benchmarks/search_speed.py``)."""

    @property
    def script(self) -> Path:
        """The benchmark script."""
        return BENCHMARKS_DIR / f"{self.value}.py"


QUICK_ARGS: dict[SpeedBenchmark, list[str]] = {
    SpeedBenchmark.FIT: ["--chunk-sizes", "512", "2048", "--repeats", "1", "--encode-batches", "1",
                         "--pipeline-pairs", "512", "--pipeline-chunk", "256"],
    SpeedBenchmark.BUILD_INDEX: ["--vit-images", "64", "--tiny-images", "500", "--rss-sizes", "2000",
                                 "--repeats", "1"],
    SpeedBenchmark.SEARCH: ["--items", "20000", "--clusters", "100", "--batches", "2", "--repeats", "2"],
}
"""Settings that keep each benchmark to a minute or two on 2 cores."""


def _fit_rows(result: dict) -> list[dict]:
    data = result["figures"]
    encode = data["encode_vit_b_32"]["pairs_per_second"]
    rows = []
    for row in data["curvature"]:
        rows.append({"measure": f"fit ViT-B-32: encode + curvature (C={row['chunk_size']}) vs encode only",
                     "value": f"{row['with_vit_b_32_encode_pairs_per_second']:.1f} pairs/s",
                     "ratio": row["with_vit_b_32_encode_pairs_per_second"] / encode})
        if row is not data["curvature"][0]:
            rows.append({"measure": f"fit curvature per-pair cost, C={row['chunk_size']} vs "
                                    f"C={data['curvature'][0]['chunk_size']}",
                         "value": f"{row['pairs_per_second']:.0f} pairs/s", "ratio": row["cost_ratio_vs_smallest"]})
    pipe = data["pipeline_tiny"]
    rows.append({"measure": f"fit end to end ({pipe['model']}, {pipe['pairs']} PNG pairs)",
                 "value": f"{pipe['pairs_per_second']:.0f} pairs/s", "ratio": None})
    return rows


def _build_rows(result: dict) -> list[dict]:
    data = result["figures"]
    rows = []
    for row in data["speed"]:
        rows.append({"measure": f"build-index {row['model']}: end-to-end vs in-memory encode throughput",
                     "value": f"{row['end_to_end_images_per_s']:.1f} images/s",
                     "ratio": row["end_to_end_over_in_memory"]})
        rows.append({"measure": f"build-index {row['model']}: posterior scalars / encode time",
                     "value": f"{row['scalars_s']:.3f} s", "ratio": row["scalars_over_encode"]})
    for row in data["memory"]:
        rows.append({"measure": f"build-index peak RSS, {row['images']} images (tiny, with workers)",
                     "value": f"{row['peak_rss_with_workers_mib']:.0f} MiB", "ratio": None})
    return rows


def _search_rows(result: dict) -> list[dict]:
    config, rows = result["config"], []
    for label in [label for label in ("flat", "ivf") if label in result["figures"]]:
        for score in ("expected", "lcb"):
            t = result["figures"][label][score]
            low, high = t["ratio_paired_quartiles"]
            rows.append({"measure": f"search {label} {config['items']} x {config['dim']}, {score} vs plain FAISS",
                         "value": f"{t['qps']:.0f} q/s (candidates mean {t['candidates_mean']:.0f}; "
                                  f"paired {t['ratio_paired']:.3f}, quartiles {low:.3f}-{high:.3f})",
                         "ratio": t["ratio"]})
    return rows


ROWS: dict[SpeedBenchmark, Callable[[dict], list[dict]]] = {
    SpeedBenchmark.FIT: _fit_rows, SpeedBenchmark.BUILD_INDEX: _build_rows, SpeedBenchmark.SEARCH: _search_rows,
}


def run_benchmark(benchmark: SpeedBenchmark, folder: Path, full: bool) -> float:
    """Run one benchmark script to ``folder/<name>.json`` (its output on this console); returns seconds."""
    args = [] if full else QUICK_ARGS[benchmark]
    command = [sys.executable, str(benchmark.script), *args, "--output", str(folder / f"{benchmark.value}.json")]
    start = time.perf_counter()
    done = subprocess.run(command)
    if done.returncode != 0:
        raise RuntimeError(f"{benchmark.script.name} failed (exit {done.returncode})")
    return time.perf_counter() - start


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse which benchmarks to run, quick or ``--full`` (or ``--no-run``), and the records folder."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmarks", nargs="+", choices=[b.value for b in SpeedBenchmark],
                        default=[b.value for b in SpeedBenchmark])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="run with the benchmarks' own (long) defaults")
    mode.add_argument("--no-run", action="store_true", help="only summarise existing JSON files")
    parser.add_argument("--out", type=Path, help=f"records folder (default: {QUICK_OUT} for quick runs, "
                                                 "else benchmarks/results)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = QUICK_OUT if not (args.full or args.no_run) else record.RESULTS_DIR
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run (unless ``--no-run``) the chosen benchmarks and print the table of their ratios."""
    args = parse_args(argv)
    folder = args.out
    folder.mkdir(parents=True, exist_ok=True)
    summary = {"mode": "existing" if args.no_run else "full" if args.full else "quick", "benchmarks": {}}
    for benchmark in map(SpeedBenchmark, args.benchmarks):
        entry = {"json": str(folder / f"{benchmark.value}.json")}
        if not args.no_run:
            print(f"running {benchmark.script.name} ({summary['mode']}) ...", flush=True)
            entry["seconds"] = run_benchmark(benchmark, folder, args.full)
        entry["rows"] = ROWS[benchmark](json.loads(Path(entry["json"]).read_text()))
        summary["benchmarks"][benchmark.value] = entry
    print("\n| measurement | value | ratio |\n|---|---|---|")
    for entry in summary["benchmarks"].values():
        for row in entry["rows"]:
            ratio = "" if row["ratio"] is None else f"{row['ratio']:.3g}"
            print(f"| {row['measure']} | {row['value']} | {ratio} |")
    return summary


if __name__ == "__main__":
    main()
