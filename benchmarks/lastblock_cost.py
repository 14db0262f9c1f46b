"""Cost of the last-block posterior's per-item covariance against the projection posterior's scalars.

End to end, nothing downloaded: write a training world, fit on its pairs the projection
posterior (``PosteriorFitter``, as ``retrieval_calibration`` does) and the last-block
posterior (``LastBlockFitter``, scope ``--scope``, docs/math.md section 13) with the same
chunk size; then encode a clean gallery of ``--n-items`` images (preprocessed in memory)
and time, per item, what build-index would compute:

- ``tower``: the image tower alone (means and activations), the floor every option pays;
- ``projection/<form>``: tower plus the projection posterior's scalars and columns
  (``ScalarComputer``) for ``kfac``, ``diag`` and ``lowrank:R``;
- ``lastblock/<form>``: tower plus the last block's Jacobians and ``S = J Sigma J^T``
  truncated to ``diag`` or ``lowrank:R`` (``item_covariance``).

Timings run in ``--repeats`` interleaved rounds (each round one pass of every method over
the gallery, batches of ``--batch-size``); the figures are medians over rounds of the
seconds per item and of the ratio to the tower's pass in the same round. Storage per
item: every index stores the mean (``D`` float32) and the six float64 scalars; each form
adds its float32 covariance columns (``kfac``: none; ``diag``: ``D``; ``lowrank:R``:
``(R+1) D``), the same size whichever posterior fills them.
Also the fit time of both posteriors, and what the covariance holds: the share of
``tr S`` from layers other than the projection, the share of ``tr S`` in its top ``R``
eigenpairs, and the Spearman correlation of ``tr S`` with the projection posterior's ``q``.
Writes ``benchmarks/results/lastblock_cost.json``.

    .venv/bin/python benchmarks/lastblock_cost.py            # bayes-small
    .venv/bin/python benchmarks/lastblock_cost.py --quick    # bayes-tiny, small sizes
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import record
import retrieval_calibration
import torch
from PIL import Image
from scipy.stats import spearmanr

from bayesretrieval.encoders import ClipEncoder
from bayesretrieval.indexing.scalars import ScalarComputer
from bayesretrieval.posterior import PosteriorPair
from bayesretrieval.posterior.lastblock import BlockScope, LastBlockHead
from bayesretrieval.posterior.lastblock_posterior import LastBlockPosterior, embedding_covariance, item_covariance
from bayesretrieval.store.format import SCALAR_COLUMNS, VarianceSpec
from bayesretrieval.training import ModelSize, get_trained_model, model_name
from bayesretrieval.world import make_world

QUICK = {"size": ModelSize.TEST.value, "n_fit": 128, "chunk_size": 64, "n_items": 32, "batch_size": 16, "repeats": 1,
         "rank": 4}
"""What ``--quick`` sets (with the work folder and output under ``results/``)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the model size, scope, sizes, rank, repeats and paths."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="test model and small sizes: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--size", choices=[s.value for s in ModelSize], default=ModelSize.BENCHMARK.value)
    parser.add_argument("--scope", choices=[s.value for s in BlockScope], default=BlockScope.MLP.value)
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the worlds")
    parser.add_argument("--n-fit", type=int, default=2048, help="training-world pairs for both posterior fits")
    parser.add_argument("--chunk-size", type=int, default=512, help="C, pairs per InfoNCE chunk of both fits")
    parser.add_argument("--n-items", type=int, default=512, help="gallery images timed")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch")
    parser.add_argument("--rank", type=int, default=8, help="R of the lowrank:R form")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (median)")
    parser.add_argument("--work", type=Path, default=None,
                        help="world and posteriors, reused when present (default results/lastblock_cost_work, "
                             "results/lastblock_cost_quick_work)")
    parser.add_argument("--output", type=Path, default=None,
                        help="result JSON (default benchmarks/results/lastblock_cost.json; "
                             "--quick: results/lastblock_cost_quick.json)")
    args = record.apply_quick(parser.parse_args(argv), QUICK)
    suffix = "_quick" if args.quick else ""
    args.work = args.work or Path(f"results/lastblock_cost{suffix}_work")
    args.output = args.output or (Path("results/lastblock_cost_quick.json") if args.quick
                                  else record.default_output("lastblock_cost"))
    return args


def fit_projection(encoder: ClipEncoder, work: Path, args: argparse.Namespace) -> tuple[PosteriorPair, float | None]:
    """The projection posterior (cached in ``work`` by ``retrieval_calibration``) and its fit seconds, or None."""
    cached = (work / "posterior" / "posterior.json").is_file()
    started = time.perf_counter()
    posterior = retrieval_calibration.fit_posterior_on_world(encoder, work, args)
    return posterior, None if cached else time.perf_counter() - started


def seconds_per_item(run: Callable[[torch.Tensor], object], images: torch.Tensor, batch_size: int) -> float:
    """Seconds per item of one pass of ``run`` over batches of ``images``."""
    started = time.perf_counter()
    for batch in images.split(batch_size):
        run(batch)
    return (time.perf_counter() - started) / len(images)


def projection_runner(encoder: ClipEncoder, posterior: PosteriorPair, form: str) -> Callable:
    """Tower plus the projection posterior's per-item scalars and columns of ``form``."""
    computer = ScalarComputer(posterior, VarianceSpec.parse(form))

    def run(batch: torch.Tensor):
        encoded = encoder.encode_image_batch(batch)
        return computer.from_activations(encoded.embeds, encoded.activations)

    return run


def timings(encoder, posterior, lastblock, images, args) -> dict:
    """Seconds per item of every method and its ratio to the tower, medians over interleaved rounds.

    Every round times one pass of each method in turn, so a change in the machine's load
    between rounds moves all methods alike, and the ratios are taken within a round.
    """
    forms = ["diag", f"lowrank:{args.rank}"]
    runners = {"tower": encoder.encode_image_batch}
    runners.update({f"projection/{form}": projection_runner(encoder, posterior, form) for form in ["kfac", *forms]})
    runners.update({f"lastblock/{form}": (lambda batch, form=form: item_covariance(encoder, lastblock, batch, form,
                                                                                     args.batch_size))
                    for form in forms})
    for run in runners.values():
        run(images[:args.batch_size])
    rounds = [{name: seconds_per_item(run, images, args.batch_size) for name, run in runners.items()}
              for _ in range(args.repeats)]
    return {"seconds_per_item": {name: statistics.median(r[name] for r in rounds) for name in runners},
            "ratio_to_tower": {name: statistics.median(r[name] / r["tower"] for r in rounds) for name in runners}}


def storage(embed_dim: int, rank: int) -> dict:
    """Bytes per item: the mean, the scalars, and each form's float32 covariance columns."""
    mean, scalars = 4 * embed_dim, 8 * len(SCALAR_COLUMNS)
    return {"mean": mean, "scalars": scalars, "kfac": 0, "diag": 4 * embed_dim,
            f"lowrank:{rank}": 4 * (rank + 1) * embed_dim}


def covariance_content(encoder, posterior: PosteriorPair, lastblock: LastBlockPosterior, images, rank: int) -> dict:
    """What ``S`` holds beyond the projection posterior's ``q Sigma_I`` (see the module docstring)."""
    head = LastBlockHead(encoder, lastblock.scope)
    linearisation = head.linearise(head.inputs(images))
    covariance = embedding_covariance(lastblock, linearisation)
    total = torch.diagonal(covariance, dim1=1, dim2=2).sum(1)
    proj = lastblock.layers["proj"]
    own = proj.activation_scale(linearisation.inputs["proj"]) * torch.trace(proj.output_cov)
    top = torch.linalg.eigvalsh(covariance)[:, -rank:].sum(1)
    q = posterior.image.activation_scale(encoder.encode_image_batch(images).activations)
    quartiles = [0.25, 0.5, 0.75]
    return {"share_outside_projection": np.quantile(1 - own / total, quartiles).tolist(),
            f"share_in_top_{rank}": np.quantile(top / total, quartiles).tolist(),
            "spearman_trace_vs_projection_q": float(spearmanr(total.numpy(), q.numpy()).statistic),
            "quartiles": quartiles}


def gallery(encoder: ClipEncoder, args: argparse.Namespace) -> torch.Tensor:
    """``--n-items`` clean test images, preprocessed, ``(N, 3, H, W)``."""
    world = make_world(args.n_items, seed=args.seed + 2)
    return torch.stack([encoder.preprocess(Image.fromarray(image)) for image in world.images])


def table(figures: dict) -> str:
    """The cost table: seconds per item (ms), ratio to the tower alone, covariance-column bytes per item."""
    lines = ["| method | ms per item | x tower | covariance columns, bytes per item |", "|---|---|---|---|"]
    for name, seconds in figures["seconds_per_item"].items():
        columns = figures["bytes_per_item"].get(name.split("/")[-1], 0)
        ratio = figures["ratio_to_tower"][name]
        lines.append(f"| {name} | {1000 * seconds:.3f} | {ratio:.2f} | {columns} |")
    sizes = figures["bytes_per_item"]
    lines.append(f"\nevery index also stores the mean ({sizes['mean']} B) and the scalars ({sizes['scalars']} B)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Fit both posteriors, time every method, save the record and print the table."""
    args = parse_args(argv)
    work = args.work / args.size
    encoder = ClipEncoder.from_pretrained(model_name(args.size), get_trained_model(args.size, args.seed))
    posterior, projection_fit = fit_projection(encoder, work, args)
    lastblock, lastblock_fit = retrieval_calibration.fit_lastblock(encoder, work, args, args.scope)
    images = gallery(encoder, args)
    figures = {
        "model": model_name(args.size), "scope": args.scope, "embed_dim": encoder.embed_dim,
        "layers": {name: [layer.in_features, layer.out_features] for name, layer in lastblock.layers.items()},
        "fit_seconds": {"projection": projection_fit, "lastblock": lastblock_fit, "pairs": lastblock.num_pairs},
        "lambda": {"projection_image": posterior.image.prior_precision, "lastblock": lastblock.prior_precision},
        **timings(encoder, posterior, lastblock, images, args),
        "bytes_per_item": storage(encoder.embed_dim, args.rank),
        "covariance": covariance_content(encoder, posterior, lastblock, images, args.rank),
        "torch_threads": torch.get_num_threads(),
    }
    path = record.save("lastblock_cost", __file__, args, figures, argv, args.output)
    print(table(figures))
    print(f"wrote {path}")
    return figures


if __name__ == "__main__":
    main()
