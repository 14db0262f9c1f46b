"""Accuracy of the cosine-moment estimators against Monte Carlo (docs/math.md section 3).

Usage:
    .venv/bin/python benchmarks/cosine_accuracy.py [--hessians DIR] [--draws 100000]

Writes ``benchmarks/results/cosine_accuracy.json`` (every cell, the worst cell per
estimator and the worst error per MAP cosine) and prints the summaries.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import record

from bayesretrieval.accuracy import accuracy_grid, bayesvlm_grid_settings, vit_b32_projections
from bayesretrieval.similarity import DEFAULT_ESTIMATOR

DEFAULT_HESSIANS = record.ROOT.parent / "shared" / "bayesvlm-hessians" / "ViT-B-32-laion2B-s34B-b79K"
WORST_COLUMNS = ["estimator", "setting", "activation_scale", "cosine", "std_relative_error", "mean_error"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the hessian directory, the Monte Carlo draws per cell and the output path."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hessians", type=Path, default=DEFAULT_HESSIANS, help="BayesVLM hessian directory")
    parser.add_argument("--draws", type=int, default=100_000, help="Monte Carlo draws per cell")
    parser.add_argument("--output", type=Path, default=record.default_output("cosine_accuracy"))
    return parser.parse_args(argv)


def summarise(grid: pd.DataFrame) -> dict:
    """Figures of one grid: worst std cell per estimator, worst std error per cosine, worst mean error, every cell."""
    worst = grid.loc[grid.std_relative_error.abs().groupby(grid.estimator).idxmax(), WORST_COLUMNS]
    by_cosine = grid.assign(err=grid.std_relative_error.abs()).pivot_table(
        index="cosine", columns="estimator", values="err", aggfunc="max").sort_index(ascending=False)
    return {
        "default_estimator": DEFAULT_ESTIMATOR.value,
        "worst_std_cell": worst.to_dict(orient="records"),
        "max_abs_std_relative_error_by_cosine": by_cosine.reset_index().to_dict(orient="records"),
        "max_abs_mean_error": grid.mean_error.abs().groupby(grid.estimator).max().to_dict(),
        "cells": grid.to_dict(orient="records"),
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the grid, write the record and print the summaries."""
    args = parse_args(argv)
    grid = accuracy_grid(bayesvlm_grid_settings(args.hessians), *vit_b32_projections(), num_draws=args.draws)
    figures = summarise(grid)
    path = record.save("cosine_accuracy", __file__, args, figures, argv, args.output)
    print("worst cell per estimator (std error relative to Monte Carlo):")
    print(pd.DataFrame(figures["worst_std_cell"]).to_string(index=False, float_format=lambda v: f"{v:+.4f}"))
    print("\nstd error by MAP cosine (max |error| over settings and scales):")
    table = pd.DataFrame(figures["max_abs_std_relative_error_by_cosine"]).set_index("cosine")
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    print("\nmax |mean error| per estimator:", {k: round(v, 5) for k, v in figures["max_abs_mean_error"].items()})
    print(f"wrote {path}")
    return figures


if __name__ == "__main__":
    main()
