"""Speed and memory of build-index, with ratios against baselines measured in this run.

1. End to end (``build_index`` over JPEG files on disk: walk, decode in loader workers,
   encode, posterior scalars, shards, publish) versus encoding the same images already
   decoded and preprocessed in memory (``encode_image_batch`` only). Reported for
   open_clip ``ViT-B-32`` at random weights (``pretrained=None``, real shapes, with
   BayesVLM's published posterior from ../shared when present, else a random one) and
   for the tiny model.
2. Posterior scalars (``ScalarComputer.from_activations``) as a fraction of encode time,
   per batch, for both models.
3. Peak memory (max RSS of the build process, and of its loader workers) for indexing
   ``--rss-sizes`` images with the tiny model, each in a fresh process.

Prints a table and writes ``benchmarks/results/build_index_speed.json``.

    .venv/bin/python benchmarks/build_index_speed.py
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import record
import torch
from PIL import Image

from bayesretrieval.encoders import ClipEncoder
from bayesretrieval.indexing import BuildConfig, build_index, decode_image
from bayesretrieval.indexing.scalars import ScalarComputer
from bayesretrieval.options import TINY_MODEL
from bayesretrieval.posterior import KroneckerPosterior, PosteriorPair, load_posterior, posterior_for_model

SHARED_HESSIANS = record.ROOT.parent / "shared" / "bayesvlm-hessians" / "ViT-B-32-laion2B-s34B-b79K"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse image counts, RSS sizes, batch size, workers, repeats and output (and the internal ``--rss-child``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vit-images", type=int, default=192, help="images for the ViT-B-32 run")
    parser.add_argument("--tiny-images", type=int, default=2000, help="images for the tiny-model run")
    parser.add_argument("--rss-sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the best time counts")
    parser.add_argument("--output", type=Path, default=record.default_output("build_index_speed"))
    parser.add_argument("--rss-child", nargs=2, metavar=("IMAGE_DIR", "INDEX_DIR"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def write_jpegs(folder: Path, count: int, size: tuple[int, int], seed: int = 0, per_folder: int = 2000) -> Path:
    """Smooth random JPEGs (photo-like compressed sizes) in sub-folders of ``per_folder``."""
    rng = np.random.default_rng(seed)
    width, height = size
    for i in range(count):
        base = rng.integers(0, 255, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((width, height), Image.BILINEAR)
        path = folder / f"part{i // per_folder:02d}" / f"img_{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=90)
    return folder


def random_posterior(embed_dim: int, width: int, seed: int = 0) -> PosteriorPair:
    """Random SPD curvature factors of the right shapes (for models without published ones)."""
    g = torch.Generator().manual_seed(seed)

    def spd(n):
        m = torch.randn(n, n, generator=g, dtype=torch.float64)
        return m @ m.T / n + 0.1 * torch.eye(n, dtype=torch.float64)

    image = KroneckerPosterior.from_factors(spd(width), spd(embed_dim), 10.0, 100.0, "image")
    text = KroneckerPosterior.from_factors(spd(width), spd(embed_dim), 10.0, 100.0, "text")
    return PosteriorPair(image, text, source="random-benchmark")


def model_and_posterior(name: str) -> tuple[ClipEncoder, PosteriorPair]:
    """Model ``name`` at random weights and a posterior: BayesVLM's for ViT-B-32 when in ../shared, else random.

    Neither posterior was fitted for random weights; the speed does not depend on that, so
    the pairing is forced.
    """
    encoder = ClipEncoder.from_pretrained(name, None)
    if name == "ViT-B-32" and SHARED_HESSIANS.is_dir():
        posterior = load_posterior(SHARED_HESSIANS)
    else:
        d, h = encoder.image_projection.shape[1], encoder.image_projection.shape[0]
        posterior = random_posterior(d, h)
        if posterior.text.in_features != encoder.text_projection.shape[0]:
            posterior = PosteriorPair(posterior.image, random_posterior(d, encoder.text_projection.shape[0]).text,
                                      source="random-benchmark")
    return encoder, posterior_for_model(posterior, encoder.identity, force=True)


def speed_run(name: str, count: int, size: tuple[int, int], args, work: Path) -> dict:
    """End-to-end vs in-memory encoding, and the scalars' share of encode time."""
    encoder, posterior = model_and_posterior(name)
    folder = write_jpegs(work / f"img-{name}", count, size)
    files = sorted(folder.rglob("*.jpg"))
    pixels = torch.stack([encoder.preprocess(decode_image(f)) for f in files])
    encoder.encode_image_batch(pixels[: args.batch_size])  # warm-up
    computer = ScalarComputer(posterior)
    config = BuildConfig(batch_size=args.batch_size, workers=args.workers)
    in_memory, scalars, end_to_end = [], [], []
    for repeat in range(args.repeats):  # interleaved, best of: the machine may be shared
        start = time.perf_counter()
        encoded = [encoder.encode_image_batch(b) for b in pixels.split(args.batch_size)]
        in_memory.append(time.perf_counter() - start)
        start = time.perf_counter()
        for batch in encoded:
            computer.from_activations(batch.embeds, batch.activations)
        scalars.append(time.perf_counter() - start)
        index_dir = work / f"idx-{name}"
        shutil.rmtree(index_dir, ignore_errors=True)
        start = time.perf_counter()
        build_index(folder, index_dir, encoder, posterior, config)
        end_to_end.append(time.perf_counter() - start)
    in_memory, scalars, end_to_end = min(in_memory), min(scalars), min(end_to_end)
    return {
        "model": name, "images": count, "image_size": list(size), "batch_size": args.batch_size,
        "workers": args.workers, "posterior": posterior.source,
        "in_memory_encode_s": in_memory, "in_memory_images_per_s": count / in_memory,
        "end_to_end_s": end_to_end, "end_to_end_images_per_s": count / end_to_end,
        "end_to_end_over_in_memory": in_memory / end_to_end,
        "scalars_s": scalars, "scalars_over_encode": scalars / in_memory, "repeats": args.repeats,
    }


class PeakRss:
    """Samples the RSS of this process and of its children (loader workers) every 20 ms.

    ``ru_maxrss`` is not used: on Linux it keeps the parent's peak across fork + exec.
    """

    def __init__(self, interval_s: float = 0.02):
        self.process = psutil.Process()
        self.interval_s = interval_s
        self.peak_self = self.peak_total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                own = self.process.memory_info().rss
                workers = sum(c.memory_info().rss for c in self.process.children(recursive=True))
            except psutil.Error:
                continue
            self.peak_self = max(self.peak_self, own)
            self.peak_total = max(self.peak_total, own + workers)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def rss_child(image_dir: str, index_dir: str) -> None:
    """Build one index and print peak RSS (MiB) of this process and with its workers as JSON."""
    encoder, posterior = model_and_posterior(TINY_MODEL)
    before = psutil.Process().memory_info().rss
    with PeakRss() as peak:
        report = build_index(image_dir, index_dir, encoder, posterior, BuildConfig(batch_size=64, workers=1))
    print(json.dumps({
        "images": report.indexed, "seconds": report.seconds,
        "rss_before_build_mib": before / 2**20,
        "peak_rss_mib": peak.peak_self / 2**20,
        "peak_rss_with_workers_mib": peak.peak_total / 2**20,
    }))


def memory_runs(sizes: list[int], work: Path) -> list[dict]:
    """Peak RSS of indexing each of ``sizes`` images with the tiny model, each in a fresh process."""
    largest = max(sizes)
    folder = write_jpegs(work / "img-rss", largest, (160, 120), seed=1)
    results = []
    for size in sorted(sizes):
        parts = [p for p in sorted(folder.iterdir())][: max(1, size // 2000)]
        source = folder if size == largest else parts[0] if len(parts) == 1 else None
        if source is None:
            raise ValueError(f"RSS sizes must be 2000 or the largest size, got {size}")
        out = subprocess.run([sys.executable, __file__, "--rss-child", str(source), str(work / f"idx-rss-{size}")],
                             check=True, capture_output=True, text=True)
        results.append({"requested": size, **json.loads(out.stdout.strip().splitlines()[-1])})
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the speed and memory measurements, print the tables and save the record (or be one RSS child)."""
    args = parse_args(argv)
    if args.rss_child:
        rss_child(*args.rss_child)
        return 0
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        speed = [speed_run("ViT-B-32", args.vit_images, (320, 240), args, work),
                 speed_run(TINY_MODEL, args.tiny_images, (160, 120), args, work)]
        memory = memory_runs(args.rss_sizes, work)
    print(f"{'model':10} {'images':>7} {'in-mem img/s':>13} {'e2e img/s':>10} {'e2e/in-mem':>11} "
          f"{'scalars/encode':>15}")
    for row in speed:
        print(f"{row['model']:10} {row['images']:7d} {row['in_memory_images_per_s']:13.1f} "
              f"{row['end_to_end_images_per_s']:10.1f} {row['end_to_end_over_in_memory']:11.2f} "
              f"{row['scalars_over_encode']:15.2%}")
    print(f"\n{'images (tiny)':>13} {'seconds':>8} {'RSS before':>11} {'peak RSS MiB':>13} {'+ workers MiB':>14}")
    for row in memory:
        print(f"{row['images']:13d} {row['seconds']:8.1f} {row['rss_before_build_mib']:11.0f} "
              f"{row['peak_rss_mib']:13.0f} {row['peak_rss_with_workers_mib']:14.0f}")
    path = record.save("build_index_speed", __file__, args, {"speed": speed, "memory": memory}, argv, args.output)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
