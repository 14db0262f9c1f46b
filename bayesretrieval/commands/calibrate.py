"""``bayesretrieval calibrate``: fit the probit match link of an index on labelled pairs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from bayesretrieval.cli import CommandError
from bayesretrieval.options import DEFAULT_ESTIMATOR, CosineEstimator

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from bayesretrieval.queries.uncertainty import PairMoments

DESCRIPTION = """\
Fit the link p(match) = Phi((E[cos] - tau) / sqrt(Var[cos] + noise_std^2)) (docs/math.md
section 11) by maximum likelihood on labelled (query, image) pairs and store it in
INDEX_DIR/calibration.json, so `search --score probability` and `--threshold` give
calibrated probabilities.

PAIRS is a .csv or .parquet table with columns `query` (text), `label` (0/1) and either
`item_id` or `path` (as stored in the index). With --holdout F a random fraction F of the
queries is held out: the link is fitted on the rest and the held-out expected
calibration error is reported next to the usual baseline (a logistic link on the plain
cosine); the stored link is then refitted on all pairs."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``calibrate`` subcommand."""
    parser = subparsers.add_parser("calibrate", help="fit calibrated match probabilities on labelled pairs",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("index_dir", type=Path, metavar="INDEX_DIR")
    parser.add_argument("pairs", type=Path, metavar="PAIRS", help="labelled pairs (.csv or .parquet)")
    parser.add_argument("--holdout", type=float, default=0.0, help="fraction of queries held out for the report")
    parser.add_argument("--bins", type=int, default=15, help="ECE bins (default 15)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the hold-out split")
    parser.add_argument("--estimator", default=DEFAULT_ESTIMATOR.value,
                        help=f"cosine estimator, one of {[e.value for e in CosineEstimator]}")
    parser.add_argument("--device", default="cpu")
    parser.set_defaults(run=run)


def read_pairs(path: Path, reader) -> pd.DataFrame:
    """Labelled pairs with an ``item_id`` column (resolved from ``path`` when needed).

    Raises:
        CommandError: if the file is missing, does not parse, or names unknown items.
    """
    import numpy as np
    import pandas as pd

    from bayesretrieval.metrics import binary_labels

    if not path.is_file():
        raise CommandError(f"pairs file not found: {path}")
    try:
        frame = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(path)
    except (ValueError, OSError, pd.errors.ParserError) as err:
        raise CommandError(f"pairs file {path} does not parse: {err}") from None
    missing = {"query", "label"} - set(frame.columns)
    if missing or not {"item_id", "path"} & set(frame.columns):
        raise CommandError(f"pairs file {path} needs columns query, label and item_id or path; "
                           f"has {list(frame.columns)}")
    if "item_id" not in frame.columns:
        table = reader.read_items(columns=["item_id", "path"]).to_pandas()
        frame = frame.merge(table, on="path", how="left")
        unknown = frame.loc[frame.item_id.isna(), "path"].tolist()
        if unknown:
            raise CommandError(f"{len(unknown)} paths are not in the index, e.g. {unknown[0]!r}")
    try:
        binary_labels(frame["label"].to_numpy(), "column label")
    except ValueError as err:
        raise CommandError(str(err)) from None
    return frame.astype({"item_id": np.int64, "label": np.int64})


def _subset(moments: PairMoments, mask: np.ndarray) -> PairMoments:
    import torch

    from bayesretrieval.queries.uncertainty import PairMoments

    rows = torch.from_numpy(mask.reshape(-1))
    return PairMoments(moments.mean.reshape(-1)[rows], moments.var.reshape(-1)[rows],
                       moments.map_cosine.reshape(-1)[rows])


def run(args: argparse.Namespace) -> int:
    """Fit, report and store the link."""
    import numpy as np

    from bayesretrieval.queries.calibration import evaluate_links
    from bayesretrieval.queries.searcher import Searcher

    if not 0 <= args.holdout < 1:
        raise CommandError(f"--holdout must be in [0, 1), got {args.holdout}")
    if not args.index_dir.is_dir():
        raise CommandError(f"index directory not found: {args.index_dir}")
    searcher = Searcher.open(args.index_dir, device=args.device, estimator=args.estimator)
    pairs = read_pairs(args.pairs, searcher.reader)
    queries = pairs["query"].astype(str).tolist()
    report = {"pairs": len(pairs), "positives": int(pairs.label.sum())}
    if args.holdout > 0:
        names = np.array(sorted(set(queries)))
        held = set(np.random.default_rng(args.seed).permutation(names)[: max(1, int(len(names) * args.holdout))])
        test = pairs["query"].isin(held).to_numpy().copy()
        moments = searcher.pair_moments(queries, pairs.item_id.to_numpy())
        report["holdout"] = evaluate_links(_subset(moments, ~test), pairs.label[~test], _subset(moments, test),
                                           pairs.label[test], args.bins)
    link = searcher.calibrate(queries, pairs.item_id.to_numpy(), pairs.label.to_numpy())
    report.update(threshold=link.threshold_, noise_std=link.noise_std_, nll=link.nll_,
                  stored=str(args.index_dir / "calibration.json"))
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
