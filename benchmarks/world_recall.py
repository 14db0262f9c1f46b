"""Text-to-image recall of the world-trained CLIPs, clean and under every shift.

Trains (or fetches from the cache) the requested model sizes, draws a held-out test
world of ``--n-images`` images (seed ``--world-seed``, never used in training) and its
shifted versions, and measures Recall@k of full-caption queries labelled by the
world's relevance function. Prints a Markdown table; ``--output`` also writes JSON.

    .venv/bin/python benchmarks/world_recall.py --sizes test benchmark --output recall.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from bayesretrieval.encoders import ClipEncoder
from bayesretrieval.training import (
    ModelSize,
    StepInfo,
    get_trained_model,
    model_name,
    read_checkpoint_metadata,
)
from bayesretrieval.world import MAX_SEVERITY, Shift, make_world, partial_query, query_text, world_recall

KS = (1, 5, 10)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        nargs="+",
        choices=[s.value for s in ModelSize],
        default=[s.value for s in ModelSize],
        help="model sizes to evaluate (default: all)",
    )
    parser.add_argument("--train-seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument("--world-seed", type=int, default=0, help="test world seed (default 0)")
    parser.add_argument("--n-images", type=int, default=1000, help="test world size (default 1000)")
    parser.add_argument(
        "--severities",
        nargs="+",
        type=int,
        default=list(range(1, MAX_SEVERITY + 1)),
        help="shift severities (default 1-5)",
    )
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON")
    return parser.parse_args(argv)


def conditions(severities: list[int]) -> list[tuple[str | None, int]]:
    """(shift, severity) pairs to evaluate, clean first."""
    return [(None, 0)] + [(s.value, v) for s in Shift for v in severities]


def train_or_fetch(size: str, seed: int) -> Path:
    """Fetch the cached checkpoint or train it with a progress bar."""
    with tqdm(desc=f"training {size}", unit="step", leave=False) as bar:

        def progress(info: StepInfo) -> None:
            bar.total = info.steps
            bar.update(info.step - bar.n)
            bar.set_postfix(loss=f"{info.loss:.3f}", img_s=f"{info.images_per_s:.0f}")

        return get_trained_model(size, seed, progress=progress)


def evaluate(size: str, args: argparse.Namespace) -> dict:
    """Recall of one model size under every condition."""
    path = train_or_fetch(size, args.train_seed)
    encoder = ClipEncoder.from_pretrained(model_name(size), path)
    rows = []
    todo = conditions(args.severities)
    for shift, severity in tqdm(todo, desc=f"evaluating {size}", unit="world"):
        world = make_world(args.n_images, seed=args.world_seed, shift=shift, severity=severity)
        recall = world_recall(encoder, world, ks=KS)
        rows.append({"shift": shift, "severity": severity, "queries": "full", "recall": recall})
        if shift is None:
            texts = [query_text(partial_query(s, ["colour", "shape"])) for s in world.scenes]
            recall = world_recall(encoder, world, texts, ks=KS)
            rows.append({"shift": None, "severity": 0, "queries": "colour+shape", "recall": recall})
    return {
        "size": size,
        "model_name": model_name(size),
        "checkpoint": str(path),
        "training": read_checkpoint_metadata(path),
        "rows": rows,
    }


def markdown(results: list[dict]) -> str:
    """One row per condition, R@1 / R@10 per model size."""
    header = "| shift | severity | queries | " + " | ".join(
        f"{r['size']} R@1 | {r['size']} R@10" for r in results
    )
    lines = [header + " |", "|" + "---|" * (3 + 2 * len(results))]
    for i, row in enumerate(results[0]["rows"]):
        cells = [row["shift"] or "clean", str(row["severity"]), row["queries"]]
        for result in results:
            recall = result["rows"][i]["recall"]
            cells += [f"{recall[1]:.3f}", f"{recall[10]:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    for result in results:
        t = result["training"]
        lines.append(
            f"\n{result['size']}: {result['model_name']}, {t['train_config']['steps']} steps of "
            f"{t['train_config']['batch_size']}, trained in {t['train_seconds']} s "
            f"({t['images_per_s']} images/s, {t['torch_threads']} threads), "
            f"final loss {t['final_loss']:.3f}, logit scale {t['logit_scale']:.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = [evaluate(size, args) for size in args.sizes]
    print(markdown(results))
    if args.output is not None:
        payload = {"n_images": args.n_images, "world_seed": args.world_seed, "results": results}
        args.output.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
