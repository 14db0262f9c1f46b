"""build-index on Ray Data (``--engine ray``) against the local engine, and what each stage costs.

1. Images per second of ``build_index`` over the same JPEG folder and model with the
   local engine and with the Ray engine on a local Ray instance holding every core of
   this machine, in interleaved pairs (each pair rebuilds both indexes from scratch);
   the paired ratio Ray / local, median and quartiles. Ray starts once, before the
   pairs: its start-up is reported, not counted.
2. Per-stage costs, from which docs/scaling.md works out larger builds: decoding plus
   preprocessing per image on one core; encoding per image (torch on one thread, as in
   a CPU actor, and on every thread, as in the local engine); the posterior scalars per
   image; writing and reading back the work shards per image; assembling and publishing
   a version (Parquet, arrays, FAISS) per item; and the fixed cost of a Ray build (a
   build of one batch: actor start, model load, pipeline start).

Model: open_clip ``ViT-B-32`` at random weights saved as a checkpoint (the Ray actors load
the weights from a file), with BayesVLM's published posterior from ../shared when present,
else a random one. Writes ``benchmarks/results/ray_build_speed.json``.

    .venv/bin/python benchmarks/ray_build_speed.py
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import record
import torch
from build_index_speed import model_and_posterior, write_jpegs

from bayesretrieval.encoders import ClipEncoder
from bayesretrieval.indexing import BuildConfig, build_index
from bayesretrieval.indexing.assemble import items_from_results, skipped_table
from bayesretrieval.indexing.encode import DecodeDataset, draft_size_for, encode_samples
from bayesretrieval.indexing.scalars import ScalarComputer
from bayesretrieval.indexing.sources import walk_images
from bayesretrieval.indexing.work import WorkFolder, result_schema
from bayesretrieval.posterior import PosteriorPair
from bayesretrieval.store import VarianceSpec, VersionInfo, write_version

MODEL = "ViT-B-32"
RAY_OBJECT_STORE = 512 * 2**20
"""Bytes of Ray's object store (a few shards of decoded 224 x 224 images)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the image count and size, batch size, decode workers, repeats, quick mode and output."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=640)
    parser.add_argument("--image-size", type=int, nargs=2, default=[320, 240], metavar=("W", "H"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-batches", type=int, default=2, help="batches per shard (both engines)")
    parser.add_argument("--workers", type=int, default=1, help="decode processes of the local engine")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved (local, ray) pairs")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--publish-items", type=int, default=50_000, help="items of the publish-cost version")
    parser.add_argument("--quick", action="store_true", help="a smoke run: the tiny model, 24 images, 1 pair")
    parser.add_argument("--output", type=Path, default=record.default_output("ray_build_speed"))
    return record.apply_quick(parser.parse_args(argv), {"images": 24, "repeats": 1, "model": "bayes-tiny",
                                                         "batch_size": 8, "image_size": [96, 72],
                                                         "publish_items": 1000})


def saved_model(name: str, work: Path) -> tuple[ClipEncoder, PosteriorPair]:
    """``name`` at random weights, saved as a checkpoint and loaded from it, and its posterior bound to it."""
    encoder, posterior = model_and_posterior(name)
    checkpoint = work / f"{name}.pt"
    torch.save(encoder.model.state_dict(), checkpoint)
    loaded = ClipEncoder.from_pretrained(name, checkpoint)
    return loaded, dataclasses.replace(posterior, model=loaded.identity)


def timed_build(folder: Path, index_dir: Path, encoder, posterior, config: BuildConfig) -> float:
    """Seconds of one build from scratch."""
    shutil.rmtree(index_dir, ignore_errors=True)
    start = time.perf_counter()
    build_index(folder, index_dir, encoder, posterior, config)
    return time.perf_counter() - start


def quartiles(values: list[float]) -> dict:
    """Median and quartiles."""
    q1, median, q3 = np.quantile(np.asarray(values, float), [0.25, 0.5, 0.75])
    return {"median": float(median), "q1": float(q1), "q3": float(q3)}


def paired_runs(folder: Path, encoder, posterior, args, work: Path) -> dict:
    """Interleaved (local, ray) builds: seconds, images per second and the paired ratio."""
    local = BuildConfig(batch_size=args.batch_size, shard_batches=args.shard_batches, workers=args.workers)
    ray = BuildConfig(batch_size=args.batch_size, shard_batches=args.shard_batches, engine="ray")
    runs = []
    for repeat in range(args.repeats):
        local_s = timed_build(folder, work / "idx-local", encoder, posterior, local)
        ray_s = timed_build(folder, work / "idx-ray", encoder, posterior, ray)
        runs.append({"repeat": repeat, "local_s": local_s, "ray_s": ray_s, "local_images_per_s": args.images / local_s,
                     "ray_images_per_s": args.images / ray_s, "ratio": local_s / ray_s})
    return {"runs": runs, "ratio": quartiles([r["ratio"] for r in runs]),
            "local_images_per_s": quartiles([r["local_images_per_s"] for r in runs]),
            "ray_images_per_s": quartiles([r["ray_images_per_s"] for r in runs]),
            "extra_s_per_build": quartiles([r["ray_s"] - r["local_s"] for r in runs])}


def stage_costs(folder: Path, encoder, posterior, args, work: Path) -> dict:
    """Seconds per image of each stage, measured alone in this process."""
    files, _ = walk_images(folder)
    threads = torch.get_num_threads()
    dataset = DecodeDataset(folder, files, encoder.preprocess, 10**9, draft_size_for(encoder))
    torch.set_num_threads(1)
    start = time.perf_counter()
    samples = [dataset[i] for i in range(len(files))]
    decode = (time.perf_counter() - start) / len(files)
    pixels = torch.stack([s.pixels for s in samples])
    encode = {}
    for count in sorted({1, threads}):
        torch.set_num_threads(count)
        encoder.encode_image_batch(pixels[: args.batch_size])  # warm-up
        start = time.perf_counter()
        encoded = [encoder.encode_image_batch(b) for b in pixels.split(args.batch_size)]
        encode[f"threads_{count}"] = (time.perf_counter() - start) / len(files)
    torch.set_num_threads(threads)
    computer = ScalarComputer(posterior)
    start = time.perf_counter()
    for batch in encoded:
        computer.from_activations(batch.embeds, batch.activations)
    scalars = (time.perf_counter() - start) / len(files)
    schema = result_schema(computer.embed_dim, computer.variance)
    tables = [encode_samples(samples[i:i + args.batch_size], encoder, computer, schema)
              for i in range(0, len(samples), args.batch_size)]
    shards = WorkFolder(work / "shard-cost", {"benchmark": True})
    shards.open()
    start = time.perf_counter()
    for table in tables:
        shards.append(table)
    shards.read(schema)
    shard_io = (time.perf_counter() - start) / len(files)
    return {"decode_preprocess_s_per_image_one_core": decode, "encode_s_per_image": encode,
            "scalars_s_per_image": scalars, "shard_write_read_s_per_image": shard_io,
            "rows_per_shard": args.batch_size * args.shard_batches,
            "shard_bytes_per_image": sum(p.stat().st_size for p in shards.shards.iterdir()) / len(files),
            "publish_items": args.publish_items,
            "publish_s_per_item": publish_cost(folder, encoder, posterior, work, pa.concat_tables(tables),
                                               args.publish_items)}


def publish_cost(folder: Path, encoder, posterior, work: Path, table: pa.Table, items: int) -> float:
    """Seconds per item of assembling and publishing a version of ``items`` rows (``table``'s, repeated).

    What the driver does after the workers: arrays from the shard rows, Parquet, the
    memory-mappable copies, checksums and a Flat FAISS index.
    """
    rows = table.take(pa.array(np.arange(items) % len(table)))
    embed_dim = encoder.embed_dim
    arrays = items_from_results(rows, np.arange(items), embed_dim, VarianceSpec())
    arrays.paths = [f"{i:09d}/{path}" for i, path in enumerate(arrays.paths)]
    info = VersionInfo("images", str(folder), encoder.identity.to_dict(), VarianceSpec(), "Flat", items)
    start = time.perf_counter()
    write_version(work / "idx-publish", arrays, skipped_table([]), posterior, info)
    return (time.perf_counter() - start) / items


def ray_fixed_cost(folder: Path, encoder, posterior, args, work: Path) -> float:
    """Seconds of a Ray build of one batch of images (actor start, model load, pipeline start)."""
    small = work / "img-one-batch"
    for path in sorted(folder.rglob("*.jpg"))[: args.batch_size]:
        target = small / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    config = BuildConfig(batch_size=args.batch_size, shard_batches=args.shard_batches, engine="ray")
    return min(timed_build(small, work / "idx-one-batch", encoder, posterior, config) for _ in range(2))


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print its summary and save its record."""
    import ray

    args = parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory(prefix="ray-build-") as tmp:
        work = Path(tmp)
        encoder, posterior = saved_model(args.model, work)
        folder = write_jpegs(work / "img", args.images, tuple(args.image_size))
        start = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=RAY_OBJECT_STORE,
                 log_to_driver=False)
        ray_start = time.perf_counter() - start
        try:
            timed_build(folder, work / "idx-warm", encoder, posterior, BuildConfig(  # workers' first import
                batch_size=args.batch_size, shard_batches=args.shard_batches, engine="ray"))
            figures = {"model": args.model, "cpus": os.cpu_count(), "ray_start_s": ray_start,
                       **paired_runs(folder, encoder, posterior, args, work),
                       "ray_fixed_s_per_build": ray_fixed_cost(folder, encoder, posterior, args, work)}
        finally:
            ray.shutdown()
        figures["stages"] = stage_costs(folder, encoder, posterior, args, work)
    ratio = figures["ratio"]
    print(f"ray / local images per second: {ratio['median']:.3f} (quartiles {ratio['q1']:.3f}-{ratio['q3']:.3f}); "
          f"fixed Ray cost per build {figures['ray_fixed_s_per_build']:.1f} s")
    record.save("ray_build_speed", __file__, args, figures, argv, args.output)
    return figures


if __name__ == "__main__":
    main()
