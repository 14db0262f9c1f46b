"""Accuracy of the cosine-moment estimators against Monte Carlo (MATH.md section 3).

Usage:
    .venv/bin/python benchmarks/cosine_accuracy.py [--hessians DIR] [--draws 100000]

Writes results/cosine_accuracy.json (every cell) and prints the worst cell per estimator.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bayesretrieval.accuracy import accuracy_grid, bayesvlm_grid_settings, vit_b32_projections

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_HESSIANS = ROOT.parent / "shared" / "bayesvlm-hessians" / "ViT-B-32-laion2B-s34B-b79K"


def main() -> None:
    """Run the grid and report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hessians", type=Path, default=DEFAULT_HESSIANS, help="BayesVLM hessian directory")
    parser.add_argument("--draws", type=int, default=100_000, help="Monte Carlo draws per cell")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "cosine_accuracy.json")
    args = parser.parse_args()
    grid = accuracy_grid(bayesvlm_grid_settings(args.hessians), *vit_b32_projections(), num_draws=args.draws)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(grid.to_dict(orient="records"), indent=1))
    worst = grid.loc[grid.std_relative_error.abs().groupby(grid.estimator).idxmax()]
    columns = ["estimator", "setting", "activation_scale", "cosine", "std_relative_error", "mean_error"]
    print("worst cell per estimator (std error relative to Monte Carlo):")
    print(worst[columns].to_string(index=False, float_format=lambda v: f"{v:+.4f}"))
    print("\nstd error by MAP cosine (max |error| over settings and scales):")
    table = grid.assign(err=grid.std_relative_error.abs()).pivot_table(
        index="cosine", columns="estimator", values="err", aggfunc="max").sort_index(ascending=False)
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    mean_errors = grid.mean_error.abs().groupby(grid.estimator).max()
    print("\nmax |mean error| per estimator:", mean_errors.round(5).to_dict())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
