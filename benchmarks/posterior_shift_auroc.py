"""Does a fitted posterior give shifted images more variance than clean ones?

For each requested model size of the world-trained CLIP: write a training world of
``--n-fit`` images to disk, fit the posterior on it with ``PosteriorFitter`` (chunks of
``--chunk-size``, lambda by the Kronecker evidence), then draw a clean in-distribution
test world and, for every shift family and severity, its shifted version. Each test
image gets the predictive variance of its embedding, ``tr Cov(g) = q tr(Sigma_B)`` with
``q = a^T A^-1 a`` (MATH.md section 1), and the same divided by ``|mu|^2`` (relative
variance, what the cosine feels). The AUROC says how well each separates the shifted
images of a family (for held-out families, only the images the shift replaced) from the
clean test images; 0.5 is chance. Prints a Markdown table and writes JSON.

    .venv/bin/python benchmarks/posterior_shift_auroc.py --sizes test benchmark
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.stats import rankdata

from bayesretrieval.encoders import ClipEncoder
from bayesretrieval.posterior import PairReader, PosteriorFitter, PosteriorPair
from bayesretrieval.training import ModelSize, get_trained_model, model_name
from bayesretrieval.world import MAX_SEVERITY, Shift, make_world, write_world

VARIANCES = ("total", "relative")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=[s.value for s in ModelSize], default=[s.value for s in ModelSize])
    parser.add_argument("--n-fit", type=int, default=4096, help="training-world pairs to fit on")
    parser.add_argument("--chunk-size", type=int, default=512, help="C, pairs per InfoNCE chunk")
    parser.add_argument("--n-test", type=int, default=500, help="images per test world")
    parser.add_argument("--severities", type=int, nargs="+", default=[3, MAX_SEVERITY])
    parser.add_argument("--fit-seed", type=int, default=11, help="seed of the fitting world")
    parser.add_argument("--test-seed", type=int, default=12, help="seed of the test worlds")
    parser.add_argument("--output", type=Path, default=Path("results/posterior_shift_auroc.json"))
    return parser.parse_args(argv)


def auroc(negative: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney U)."""
    if len(negative) == 0 or len(positive) == 0:
        raise ValueError(f"AUROC needs both classes, got {len(negative)} negatives and {len(positive)} positives")
    ranks = rankdata(np.concatenate([negative, positive]))
    rank_sum = ranks[len(negative) :].sum()
    return float((rank_sum - len(positive) * (len(positive) + 1) / 2) / (len(positive) * len(negative)))


def fit_on_world(encoder: ClipEncoder, n_fit: int, seed: int, chunk_size: int) -> PosteriorFitter:
    """Write a training world to a temporary folder and fit the posterior on its files."""
    world = make_world(n_fit, seed=seed, part="train")
    with tempfile.TemporaryDirectory() as folder:
        root = write_world(world, Path(folder) / "world")
        reader = PairReader(root / "world.parquet", image_root=root / "images")
        return PosteriorFitter(chunk_size=chunk_size, batch_size=256).fit(encoder, reader)


def image_variances(encoder: ClipEncoder, posterior: PosteriorPair, images: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image ``tr Cov(g) = q tr(Sigma_B)`` and that over ``|mu|^2``, each ``(N,)``."""
    pixels = torch.stack([encoder.preprocess(Image.fromarray(image)) for image in images])
    encoded = encoder.encode_images(pixels)
    total = posterior.image.activation_scale(encoded.activations) * torch.trace(posterior.image.output_cov)
    norms_sq = encoded.embeds.double().pow(2).sum(dim=1)
    return {"total": total.numpy(), "relative": (total / norms_sq).numpy()}


def shift_aurocs(
    encoder: ClipEncoder, posterior: PosteriorPair, n_test: int, seed: int, severities: list[int]
) -> list[dict]:
    """AUROC of each variance for shifted vs clean test images, per family and severity."""
    clean = image_variances(encoder, posterior, make_world(n_test, seed=seed).images)
    rows = []
    for shift in Shift:
        for severity in severities:
            world = make_world(n_test, seed=seed, shift=shift, severity=severity)
            shifted = image_variances(encoder, posterior, world.images[world.shifted])
            row = {"shift": shift.value, "severity": severity, "n_shifted": int(world.shifted.sum())}
            for name in VARIANCES:
                row[f"auroc_{name}"] = auroc(clean[name], shifted[name])
                row[f"median_ratio_{name}"] = float(np.median(shifted[name]) / np.median(clean[name]))
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    results = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "models": {}}
    for size in args.sizes:
        encoder = ClipEncoder.from_pretrained(model_name(size), get_trained_model(size))
        fitter = fit_on_world(encoder, args.n_fit, args.fit_seed, args.chunk_size)
        rows = shift_aurocs(encoder, fitter.posterior_, args.n_test, args.test_seed, args.severities)
        results["models"][size] = {
            "model": model_name(size),
            "num_pairs": fitter.num_pairs_,
            "lambda": list(fitter.prior_precision_),
            "logit_scale": encoder.logit_scale,
            "rows": rows,
        }
        lam_image, lam_text = fitter.prior_precision_
        print(f"\n{size} ({model_name(size)}): fitted on {fitter.num_pairs_} pairs, C={args.chunk_size}, "
              f"lambda image {lam_image:.4g}, text {lam_text:.4g}")
        print("| shift | severity | shifted images | AUROC tr Cov | AUROC tr Cov/|mu|^2 | median ratio tr Cov |")
        print("|---|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['shift']} | {row['severity']} | {row['n_shifted']} | {row['auroc_total']:.3f} | "
                  f"{row['auroc_relative']:.3f} | {row['median_ratio_total']:.2f} |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
