"""Speed of posterior fitting: the curvature step, the encode step, and the whole pipeline.

Three measurements, all in this run, on this machine:

1. Curvature (``ChunkCurvature.add_chunk``: both towers' ``a a^T`` and InfoNCE
   Gauss-Newton sums) from random activations with ViT-B-32 shapes (D=512, h_I=768,
   h_T=512, s=100), for each chunk size C in ``--chunk-sizes``: pairs per second and how
   the per-pair cost grows with C (it is ``O(C D + D^2)`` per pair).
2. Encoding with open_clip ViT-B-32 at random weights (224x224 images and 77-token
   captions, both towers): pairs per second.
3. End to end through ``PosteriorFitter.fit`` on a folder of PNG pairs with the tiny
   model (decode, encode, curvature, lambda).

Prints a table and writes ``benchmarks/results/fit_speed.json``. On a machine shared
with other busy processes, ``--threads 1`` avoids torch's threads waiting on each other.

    .venv/bin/python benchmarks/fit_speed.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import record
import torch
from PIL import Image

from bayesretrieval.encoders import ClipEncoder
from bayesretrieval.options import TINY_MODEL
from bayesretrieval.posterior.curvature import DEFAULT_SOURCE_BATCH, ChunkCurvature
from bayesretrieval.posterior.fit import PosteriorFitter

VIT_B_32 = {"embed_dim": 512, "image_width": 768, "text_width": 512, "logit_scale": 100.0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the chunk sizes, source batch, repeats, encode and pipeline sizes, torch threads and output."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[512, 2048, 8192, 32768])
    parser.add_argument("--source-batch", type=int, default=DEFAULT_SOURCE_BATCH)
    parser.add_argument("--repeats", type=int, default=2, help="curvature timings per C (best kept)")
    parser.add_argument("--encode-batches", type=int, default=3, help="timed ViT-B-32 batches of 32")
    parser.add_argument("--pipeline-pairs", type=int, default=2048, help="pairs for the end-to-end run")
    parser.add_argument("--pipeline-chunk", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--output", type=Path, default=record.default_output("fit_speed"))
    return parser.parse_args(argv)


def time_curvature(chunk_size: int, source_batch: int, repeats: int = 1, seed: int = 0) -> dict:
    """Best of ``repeats`` timings of one ``add_chunk`` of ViT-B-32-shaped random float32 data."""
    generator = torch.Generator().manual_seed(seed)
    shapes = (VIT_B_32["image_width"], VIT_B_32["embed_dim"], VIT_B_32["text_width"], VIT_B_32["embed_dim"])
    tensors = [torch.randn(chunk_size, width, generator=generator) for width in shapes]
    curvature = ChunkCurvature(VIT_B_32["logit_scale"], chunk_size, source_batch)
    seconds = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        curvature.add_chunk(*tensors)
        seconds = min(seconds, time.perf_counter() - start)
    return {"chunk_size": chunk_size, "seconds": seconds, "pairs_per_second": chunk_size / seconds}


def time_encode(num_batches: int, batch_size: int = 32) -> dict:
    """Time both ViT-B-32 towers (random weights) on random images and captions."""
    encoder = ClipEncoder.from_pretrained("ViT-B-32", None)
    images = torch.randn(batch_size, 3, 224, 224)
    tokens = encoder.tokenize([f"a photo of thing number {i} on a table" for i in range(batch_size)])
    encoder.encode_image_batch(images[:4])
    encoder.encode_text_batch(tokens[:4])
    timings = {"image": 0.0, "text": 0.0}
    for _ in range(num_batches):
        start = time.perf_counter()
        encoder.encode_image_batch(images)
        middle = time.perf_counter()
        encoder.encode_text_batch(tokens)
        timings["image"] += middle - start
        timings["text"] += time.perf_counter() - middle
    pairs = num_batches * batch_size
    return {
        "pairs": pairs,
        "image_per_second": pairs / timings["image"],
        "text_per_second": pairs / timings["text"],
        "pairs_per_second": pairs / (timings["image"] + timings["text"]),
    }


def time_pipeline(num_pairs: int, chunk_size: int) -> dict:
    """Fit the tiny model end to end on a temporary img2dataset-style folder of PNGs."""
    rng = np.random.default_rng(0)
    encoder = ClipEncoder.from_pretrained(TINY_MODEL, None)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for i in range(num_pairs):
            pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"{i:09d}.png")
            (root / f"{i:09d}.txt").write_text(f"a shape number {i}")
        start = time.perf_counter()
        fitter = PosteriorFitter(chunk_size=chunk_size, batch_size=128).fit(encoder, root)
        seconds = time.perf_counter() - start
    return {
        "model": TINY_MODEL,
        "pairs": num_pairs,
        "chunk_size": chunk_size,
        "seconds": seconds,
        "pairs_per_second": fitter.num_pairs_ / seconds,
        "lambda": list(fitter.prior_precision_),
    }


def main(argv: list[str] | None = None) -> dict:
    """Time the curvature step per chunk size, ViT-B-32 encoding and the tiny pipeline; print and save them."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = {"threads": torch.get_num_threads(), "shapes": VIT_B_32, "source_batch": args.source_batch}
    time_curvature(256, args.source_batch)  # warm-up: first-call allocation and thread start-up
    results["curvature"] = [time_curvature(c, args.source_batch, args.repeats) for c in args.chunk_sizes]
    results["encode_vit_b_32"] = time_encode(args.encode_batches)
    results["pipeline_tiny"] = time_pipeline(args.pipeline_pairs, args.pipeline_chunk)
    smallest = results["curvature"][0]
    print(f"torch threads: {results['threads']}")
    print("| C | curvature pairs/s | us per pair | cost per pair vs smallest C |")
    print("|---|---|---|---|")
    for row in results["curvature"]:
        ratio = smallest["pairs_per_second"] / row["pairs_per_second"]
        row["cost_ratio_vs_smallest"] = ratio
        per_pair_us = 1e6 / row["pairs_per_second"]
        print(f"| {row['chunk_size']} | {row['pairs_per_second']:.0f} | {per_pair_us:.0f} | {ratio:.2f}x |")
    encode = results["encode_vit_b_32"]
    print(
        f"ViT-B-32 encode (random weights, batch 32): {encode['pairs_per_second']:.1f} pairs/s "
        f"(image {encode['image_per_second']:.1f}/s, text {encode['text_per_second']:.1f}/s)"
    )
    for row in results["curvature"]:
        overall = 1.0 / (1.0 / encode["pairs_per_second"] + 1.0 / row["pairs_per_second"])
        row["with_vit_b_32_encode_pairs_per_second"] = overall
        print(f"  ViT-B-32 encode + curvature at C={row['chunk_size']}: {overall:.1f} pairs/s")
    pipe = results["pipeline_tiny"]
    print(
        f"end to end ({pipe['model']}, {pipe['pairs']} PNG pairs, C={pipe['chunk_size']}): "
        f"{pipe['pairs_per_second']:.0f} pairs/s"
    )
    print(f"wrote {record.save('fit_speed', __file__, args, results, argv, args.output)}")
    return results


if __name__ == "__main__":
    main()
