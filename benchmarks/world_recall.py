"""Text-to-image recall of the world-trained CLIPs, clean and under every shift.

Trains (or fetches from the cache) the requested model sizes, draws a held-out test
world of ``--n-images`` images (seed ``--world-seed``, never used in training) and its
shifted versions, and measures Recall@k of full-caption queries (and, for the clean
and held-out worlds, of "a {colour} {shape}" queries) labelled by the world's
relevance function, over all queries and over the queries drawn from shifted images.
Prints a Markdown table and writes ``benchmarks/results/world_recall.json``.

    .venv/bin/python benchmarks/world_recall.py --sizes test benchmark
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import record
from tqdm import tqdm

from bayesretrieval.encoders import ClipEncoder
from bayesretrieval.training import (
    ModelSize,
    StepInfo,
    get_trained_model,
    model_name,
    read_checkpoint_metadata,
)
from bayesretrieval.world import (
    MAX_SEVERITY,
    Shift,
    World,
    make_world,
    partial_query,
    query_text,
    recall_at_ks,
    relevance_matrix,
    similarity_scores,
)

KS = (1, 5, 10)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the model sizes, training and test-world seeds, test-world size, severities and output."""
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
    parser.add_argument("--output", type=Path, default=record.default_output("world_recall"), help="result JSON")
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


def measure(encoder: ClipEncoder, world: World, texts: list[str]) -> dict:
    """Recall over all queries, and over the queries drawn from shifted images."""
    scores = similarity_scores(encoder, world.images, texts)
    relevant = relevance_matrix(texts, world.scenes)
    shifted = world.shifted
    subset = recall_at_ks(scores[shifted], relevant[shifted], KS) if shifted.any() else None
    return {
        "recall": recall_at_ks(scores, relevant, KS),
        "recall_shifted": subset,
        "n_shifted": int(shifted.sum()),
    }


def evaluate(size: str, args: argparse.Namespace) -> dict:
    """Recall of one model size under every condition."""
    path = train_or_fetch(size, args.train_seed)
    encoder = ClipEncoder.from_pretrained(model_name(size), path)
    rows = []
    todo = conditions(args.severities)
    for shift, severity in tqdm(todo, desc=f"evaluating {size}", unit="world"):
        world = make_world(args.n_images, seed=args.world_seed, shift=shift, severity=severity)
        condition = {"shift": shift, "severity": severity}
        rows.append({**condition, "queries": "full", **measure(encoder, world, world.captions)})
        if shift is None or not Shift(shift).is_pixel:
            texts = [query_text(partial_query(s, ["colour", "shape"])) for s in world.scenes]
            rows.append({**condition, "queries": "colour+shape", **measure(encoder, world, texts)})
    return {
        "size": size,
        "model_name": model_name(size),
        "checkpoint": str(path),
        "training": read_checkpoint_metadata(path),
        "rows": rows,
    }


def markdown(results: list[dict]) -> str:
    """One row per condition: R@1 / R@10 over all queries and over shifted images' queries."""
    header = "| shift | severity | queries | " + " | ".join(
        f"{r['size']} R@1 | {r['size']} R@10 | {r['size']} R@1 / R@10 shifted" for r in results
    )
    lines = [header + " |", "|" + "---|" * (3 + 3 * len(results))]
    for i, row in enumerate(results[0]["rows"]):
        cells = [row["shift"] or "clean", str(row["severity"]), row["queries"]]
        for result in results:
            measured = result["rows"][i]
            shifted = measured["recall_shifted"]
            cells += [
                f"{measured['recall'][1]:.3f}",
                f"{measured['recall'][10]:.3f}",
                f"{shifted[1]:.3f} / {shifted[10]:.3f} (n={measured['n_shifted']})"
                if shifted
                else "-",
            ]
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
    """Evaluate recall for every requested model size, print the Markdown table and save the record."""
    args = parse_args(argv)
    results = [evaluate(size, args) for size in args.sizes]
    print(markdown(results))
    print(f"wrote {record.save('world_recall', __file__, args, {'models': results}, argv, args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
