"""Does a fitted posterior give shifted images more variance than clean ones?

For each requested model size of the world-trained CLIP: write a training world of
``--n-fit`` images to disk, fit the posterior on it with ``PosteriorFitter`` (chunks of
``--chunk-size``, lambda by the Kronecker evidence), then draw a clean in-distribution
test world and, for every shift family and severity, its shifted version. Each test
image gets three predictive variances: of its embedding, ``tr Cov(g) = q tr(Sigma_B)``
with ``q = a^T A^-1 a`` (docs/math.md section 1); the same divided by ``|mu|^2`` (relative
variance, what the cosine feels); and ``Var[cos]`` with its own caption (both towers
uncertain, the default estimator: what a search scores). The AUROC says how well each
separates the shifted images of a family (for held-out families, only the images the
shift replaced) from the clean test images; 0.5 is chance.

The prior scan then asks whether any prior could do better: it recomputes ``q`` with
``(A + rho I)^-1`` for ``rho`` from far below to far above ``A``'s mean eigenvalue, i.e.
from the Mahalanobis distance of the activation under the fitting data's second moment
to the plain activation norm, at the highest severity asked for. Prints Markdown tables
and writes ``benchmarks/results/posterior_shift_auroc.json``.

    .venv/bin/python benchmarks/posterior_shift_auroc.py --sizes test benchmark
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import record
import torch
from PIL import Image
from scipy.stats import rankdata

from bayesretrieval.encoders import ClipEncoder
from bayesretrieval.posterior import PairReader, PosteriorFitter, PosteriorPair
from bayesretrieval.similarity import cosine_moments
from bayesretrieval.training import ModelSize, get_trained_model, model_name
from bayesretrieval.world import MAX_SEVERITY, Shift, make_world, write_world

VARIANCES = ("total", "relative", "caption")
PRIOR_SCAN = (1e-4, 1e-2, 1.0, 1e2, 1e4)
"""``rho`` of the prior scan, in units of ``A``'s mean eigenvalue."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the model sizes, fitting-world size and chunk size, test-world size, severities, seeds and output."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=[s.value for s in ModelSize],
                        default=[s.value for s in ModelSize])
    parser.add_argument("--n-fit", type=int, default=4096, help="training-world pairs to fit on")
    parser.add_argument("--chunk-size", type=int, default=512, help="C, pairs per InfoNCE chunk")
    parser.add_argument("--n-test", type=int, default=500, help="images per test world")
    parser.add_argument("--severities", type=int, nargs="+", default=[3, MAX_SEVERITY])
    parser.add_argument("--fit-seed", type=int, default=11, help="seed of the fitting world")
    parser.add_argument("--test-seed", type=int, default=12, help="seed of the test worlds")
    parser.add_argument("--output", type=Path, default=record.default_output("posterior_shift_auroc"))
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


@dataclass
class TestImages:
    """Encoded test images with the variances the AUROCs compare."""

    activations: torch.Tensor
    variances: dict[str, np.ndarray]


def encode_test_images(encoder: ClipEncoder, posterior: PosteriorPair, images: np.ndarray,
                       captions: list[str]) -> TestImages:
    """Per image ``tr Cov(g) = q tr(Sigma_B)``, that over ``|mu|^2``, and ``Var[cos]`` with its caption."""
    pixels = torch.stack([encoder.preprocess(Image.fromarray(image)) for image in images])
    encoded = encoder.encode_images(pixels)
    scales = posterior.image.activation_scale(encoded.activations)
    total = scales * torch.trace(posterior.image.output_cov)
    norms_sq = encoded.embeds.double().pow(2).sum(dim=1)
    texts = encoder.encode_texts(captions)
    _, caption_var = cosine_moments(
        encoded.embeds, scales, posterior.image.output_cov,
        texts.embeds, posterior.text.activation_scale(texts.activations), posterior.text.output_cov,
    )
    variances = {"total": total.numpy(), "relative": (total / norms_sq).numpy(),
                 "caption": caption_var.diagonal().numpy()}
    return TestImages(encoded.activations.double(), variances)


@dataclass
class ShiftedSet:
    """The images one shift family changed at one severity, encoded."""

    shift: Shift
    severity: int
    images: TestImages

    @property
    def size(self) -> int:
        """How many images the shift changed."""
        return len(self.images.activations)


def encode_shifted(encoder: ClipEncoder, posterior: PosteriorPair, n_test: int, seed: int,
                   severities: list[int]) -> list[ShiftedSet]:
    """Every shift family at every severity: the shifted images of a test world of ``n_test``."""
    sets = []
    for shift in Shift:
        for severity in severities:
            world = make_world(n_test, seed=seed, shift=shift, severity=severity)
            captions = [caption for caption, shifted in zip(world.captions, world.shifted) if shifted]
            images = encode_test_images(encoder, posterior, world.images[world.shifted], captions)
            sets.append(ShiftedSet(shift, severity, images))
    return sets


def shift_aurocs(clean: TestImages, shifted_sets: list[ShiftedSet]) -> list[dict]:
    """AUROC of each variance for shifted vs clean test images, per family and severity."""
    rows = []
    for shifted in shifted_sets:
        row = {"shift": shifted.shift.value, "severity": shifted.severity, "n_shifted": shifted.size}
        for name in VARIANCES:
            variances = shifted.images.variances[name]
            row[f"auroc_{name}"] = auroc(clean.variances[name], variances)
            row[f"median_ratio_{name}"] = float(np.median(variances) / np.median(clean.variances[name]))
        rows.append(row)
    return rows


def prior_scan(posterior: PosteriorPair, clean: TestImages, shifted_sets: list[ShiftedSet]) -> list[dict]:
    """AUROC of ``q = a^T (A + rho I)^-1 a`` per shift family for each ``rho`` of :data:`PRIOR_SCAN`.

    ``shifted_sets`` holds one severity per family.
    """
    factor = posterior.image.factors["A"]
    mean_eigenvalue = float(torch.trace(factor)) / factor.shape[0]
    rows = []
    for rho in PRIOR_SCAN:
        inverse = torch.linalg.inv(factor + rho * mean_eigenvalue * torch.eye(factor.shape[0], dtype=factor.dtype))
        scale = lambda a: ((a @ inverse) * a).sum(1).numpy()  # noqa: E731
        clean_scales = scale(clean.activations)
        rows.append({"rho": rho, **{s.shift.value: auroc(clean_scales, scale(s.images.activations))
                                    for s in shifted_sets}})
    return rows


def shift_study(encoder: ClipEncoder, posterior: PosteriorPair, n_test: int, seed: int,
                severities: list[int]) -> dict:
    """AUROC rows of a clean test world of ``n_test`` against its shifted versions, and the prior scan.

    The prior scan is at the highest severity. Keys: ``rows``, ``scan_severity``, ``prior_scan``.
    """
    world = make_world(n_test, seed=seed)
    clean = encode_test_images(encoder, posterior, world.images, list(world.captions))
    shifted_sets = encode_shifted(encoder, posterior, n_test, seed, severities)
    scan_severity = max(severities)
    return {"rows": shift_aurocs(clean, shifted_sets), "scan_severity": scan_severity,
            "prior_scan": prior_scan(posterior, clean, [s for s in shifted_sets if s.severity == scan_severity])}


def print_tables(size: str, entry: dict, chunk_size: int) -> None:
    """The AUROC table and the prior scan of one model, as Markdown."""
    lam_image, lam_text = entry["lambda"]
    print(f"\n{size} ({entry['model']}): fitted on {entry['num_pairs']} pairs, C={chunk_size}, "
          f"lambda image {lam_image:.4g}, text {lam_text:.4g}")
    print("| shift | severity | shifted images | AUROC tr Cov | AUROC tr Cov/|mu|^2 | AUROC Var[cos] own caption |"
          " median ratio tr Cov |")
    print("|---|---|---|---|---|---|---|")
    for row in entry["rows"]:
        print(f"| {row['shift']} | {row['severity']} | {row['n_shifted']} | {row['auroc_total']:.3f} | "
              f"{row['auroc_relative']:.3f} | {row['auroc_caption']:.3f} | {row['median_ratio_total']:.2f} |")
    families = [shift.value for shift in Shift]
    print(f"\nprior scan, severity {entry['scan_severity']}: AUROC of a^T (A + rho mean-eig(A) I)^-1 a")
    print("| rho | " + " | ".join(families) + " |")
    print("|---|" + "---|" * len(families))
    for row in entry["prior_scan"]:
        print(f"| {row['rho']:g} | " + " | ".join(f"{row[name]:.3f}" for name in families) + " |")


def main(argv: list[str] | None = None) -> dict:
    """Per model size, fit the posterior on a training world, run the shift study, print and save the tables."""
    args = parse_args(argv)
    results = {"models": {}}
    for size in args.sizes:
        encoder = ClipEncoder.from_pretrained(model_name(size), get_trained_model(size))
        fitter = fit_on_world(encoder, args.n_fit, args.fit_seed, args.chunk_size)
        entry = {
            "model": model_name(size),
            "num_pairs": fitter.num_pairs_,
            "lambda": list(fitter.prior_precision_),
            "logit_scale": encoder.logit_scale,
            **shift_study(encoder, fitter.posterior_, args.n_test, args.test_seed, args.severities),
        }
        results["models"][size] = entry
        print_tables(size, entry, args.chunk_size)
    print(f"wrote {record.save('posterior_shift_auroc', __file__, args, results, argv, args.output)}")
    return results


if __name__ == "__main__":
    main()
