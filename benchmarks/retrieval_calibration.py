"""Retrieval-calibration benchmark on the small world: does the uncertainty tell when search is wrong?

End to end, nothing downloaded: write a training world and fit the Laplace posterior of
the world-trained CLIP (``--size benchmark``: ``bayes-small``) on its pairs; write a test
gallery of clean in-distribution images plus a shifted world for every shift family and
severity; index the gallery with ``build_index``; draw text queries from the attributes
of gallery scenes (half full descriptions, half partial ones naming 1-3 attributes of
one object), labelled by the world's relevance function. Then, for the default cosine
estimator and for BayesVLM's ``published`` one, score every query against the whole
gallery through the search engine and report:

- retrieval: Recall@1/5/10, precision@10 and mAP for ``map``, ``expected``, ``lcb`` and
  ``ucb`` (kappa 0.5, 1, 2), on all queries;
- uncertainty vs error on held-out queries: Recall@1 in 10 equal-count bins of each
  uncertainty signal (Spearman and R^2 of bin index vs Recall@1), AUROC of the signal
  for "top-1 result not relevant", risk-coverage AURC; signals are the query's own
  variance, the top-1 std, std over the gap to the runner-up, the flip probability, the
  calibrated mismatch probability, and the baselines (cosine, margin, softmax);
- calibration on held-out queries: ECE (15 bins), Brier and NLL of the probit match
  probability of the top-10 pairs, against a logistic link on the plain cosine.

Queries are split at random into a held-in half (fits the probit link, the logistic
link and the softmax temperature) and a held-out half (every uncertainty number).
Writes ``benchmarks/results/retrieval_calibration.json`` and three PNGs per estimator
into ``--plots``; prints tables.

    .venv/bin/python benchmarks/retrieval_calibration.py            # ~4 min on 2 cores, plus training
                                                                    # bayes-small once (~10 min idle)
    .venv/bin/python benchmarks/retrieval_calibration.py --size test --n-clean 200 --n-shift 10 --queries 300
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import record
from tqdm import tqdm

from bayesretrieval.encoders import ClipEncoder
from bayesretrieval.evaluation import evaluate, failure_auroc, query_relative_variance, split_queries, sweep
from bayesretrieval.evaluation.plots import plot_evaluation
from bayesretrieval.indexing.pipeline import BuildConfig, build_index
from bayesretrieval.posterior import PairReader, PosteriorFitter, PosteriorPair
from bayesretrieval.queries import Searcher
from bayesretrieval.queries.uncertainty import QuerySide
from bayesretrieval.similarity import CosineEstimator
from bayesretrieval.training import ModelSize, get_trained_model, model_name
from bayesretrieval.world import (
    MAX_SEVERITY,
    Shift,
    full_query,
    make_world,
    partial_query,
    query_text,
    relevance_matrix,
    write_world,
)
from bayesretrieval.world.io import IMAGES_DIR, read_world_table
from bayesretrieval.world.world import scenes_from_table

ATTRIBUTES = ("shape", "colour", "size", "position")
CLEAN = "clean"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the model size, seeds, world and gallery sizes, queries, estimators and output paths."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=[s.value for s in ModelSize], default=ModelSize.BENCHMARK.value)
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the worlds")
    parser.add_argument("--n-fit", type=int, default=4096, help="training-world pairs for the posterior fit")
    parser.add_argument("--chunk-size", type=int, default=512, help="C, pairs per InfoNCE chunk of the fit")
    parser.add_argument("--n-clean", type=int, default=600, help="clean gallery images")
    parser.add_argument("--n-shift", type=int, default=40, help="gallery images per shift family and severity")
    parser.add_argument("--severities", type=int, nargs="+", default=list(range(1, MAX_SEVERITY + 1)))
    parser.add_argument("--queries", type=int, default=1200, help="text queries (half full, half partial)")
    parser.add_argument("--estimators", nargs="+", choices=[e.value for e in CosineEstimator],
                        default=[CosineEstimator.SECOND_ORDER.value, CosineEstimator.PUBLISHED.value])
    parser.add_argument("--split-seed", type=int, default=1, help="seed of the held-in / held-out query split")
    parser.add_argument("--work", type=Path, default=Path("results/retrieval_calibration_work"),
                        help="worlds, posterior and index (reused when present)")
    parser.add_argument("--output", type=Path, default=record.default_output("retrieval_calibration"),
                        help="result JSON")
    parser.add_argument("--plots", type=Path, default=Path("results"), help="PNG folder (default: %(default)s)")
    return parser.parse_args(argv)


def fit_posterior_on_world(encoder: ClipEncoder, work: Path, args: argparse.Namespace) -> PosteriorPair:
    """Fit (once; reused from ``work/posterior``) the posterior on a written training world."""
    saved = work / "posterior"
    if (saved / "posterior.json").is_file():
        return PosteriorPair.load(saved)
    root = write_training_world(work, args)
    reader = PairReader(root / "world.parquet", image_root=root / IMAGES_DIR)
    posterior = PosteriorFitter(chunk_size=args.chunk_size, batch_size=256, progress_bar=True).fit(
        encoder, reader).posterior_
    posterior.save(saved)
    return posterior


def write_training_world(work: Path, args: argparse.Namespace) -> Path:
    """Write (once) the world the posterior is fitted on; returns its folder."""
    root = work / "train-world"
    if not (root / "world.json").is_file():
        write_world(make_world(args.n_fit, seed=args.seed + 1, part="train"), root, overwrite=True)
    return root


def gallery_worlds(args: argparse.Namespace) -> dict:
    """``{folder name: world}``: the clean world and one world per (family, severity), independent seeds."""
    worlds = {CLEAN: lambda: make_world(args.n_clean, seed=args.seed + 2)}
    for i, shift in enumerate(Shift):
        for severity in args.severities:
            seed = args.seed + 100 + 10 * i + severity
            worlds[f"{shift.value}-{severity}"] = (
                lambda shift=shift, severity=severity, seed=seed: make_world(args.n_shift, seed=seed, shift=shift,
                                                                             severity=severity))
    return worlds


def write_gallery(root: Path, args: argparse.Namespace) -> pd.DataFrame:
    """Write the gallery worlds under ``root``; one row per image: ``path`` (relative to root), scene, shift."""
    tables = []
    for name, make in tqdm(gallery_worlds(args).items(), desc="write gallery", unit="world"):
        if not (root / name / "world.json").is_file():
            write_world(make(), root / name, overwrite=True)
        table, _ = read_world_table(root / name)
        tables.append(pd.DataFrame({
            "path": f"{name}/{IMAGES_DIR}/" + table["path"], "scene": scenes_from_table(table),
            "world": name, "shifted": table["shifted"].to_numpy(bool)}))
    return pd.concat(tables, ignore_index=True)


def draw_queries(scenes: list, count: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Query texts from random gallery scenes: even positions full, odd positions partial (1-3 attributes).

    Returns:
        ``(texts, is_full)``.
    """
    rng = np.random.default_rng(seed)
    sources = rng.choice(len(scenes), size=count, replace=True)
    texts, is_full = [], np.arange(count) % 2 == 0
    for full, source in zip(is_full, sources):
        scene = scenes[source]
        if full:
            query = full_query(scene)
        else:
            kept = rng.choice(ATTRIBUTES, size=rng.integers(1, 4), replace=False)
            query = partial_query(scene, [a for a in ATTRIBUTES if a in kept])
        texts.append(query_text(query))
    return texts, is_full


def engine_check(searcher: Searcher, texts: list[str], relevant: np.ndarray, records, count: int = 100) -> dict:
    """Precision@10 of ``lcb`` through ``Searcher.search`` (certified top-k) vs the dense sweep, first queries."""
    results = searcher.search(texts[:count], k=records.top, score="lcb", kappa=1.0)
    hits = np.zeros(count, dtype=np.int64)
    for qi, ids in results.groupby("query_index")["item_id"]:
        hits[qi] = relevant[qi, ids.to_numpy()].sum()
    dense = records.rankings["lcb(kappa=1)"]["hits"][:count]
    return {"queries": count, "agree": int((hits == dense).sum()), "all_exact": bool(results.attrs["exact"])}


def shift_analysis(records, fit: np.ndarray, shifted: np.ndarray) -> dict:
    """Held-out top results under ``expected``: how often shifted images appear and whether the std sees them.

    Args:
        records: the sweep.
        fit: held-in mask.
        shifted: ``(max id + 1,)`` bool, whether each item id is a shifted image.
    """
    held = ~fit
    top1_shifted = shifted[records.pair_item[held, 0]]
    correct = records.pair_relevant[held, 0]
    std = np.sqrt(records.pair_var[held, 0])
    return {"top1_shifted_fraction": float(top1_shifted.mean()),
            "top10_shifted_fraction": float(shifted[records.pair_item[held]].mean()),
            "top1_recall_when_shifted": float(correct[top1_shifted].mean()),
            "top1_recall_when_clean": float(correct[~top1_shifted].mean()),
            "auroc_top1_std_for_shifted_top1": (failure_auroc(std, top1_shifted)
                                                if 0 < top1_shifted.sum() < top1_shifted.size else float("nan")),
            "top10_precision_shifted_items":
                float(records.pair_relevant[held][shifted[records.pair_item[held]]].mean()),
            "top10_precision_clean_items":
                float(records.pair_relevant[held][~shifted[records.pair_item[held]]].mean())}


def run_estimator(index_dir: Path, encoder: ClipEncoder, estimator: str, texts: list[str], relevant: np.ndarray,
                  fit: np.ndarray, item_ids: np.ndarray, out: Path, groups: dict, shifted: np.ndarray) -> dict:
    """Sweep, evaluate and plot one estimator; returns its summary."""
    searcher = Searcher.open(index_dir, encoder, estimator=estimator)
    encoded = searcher.encode(texts)
    engine = searcher.engine("text")
    query = QuerySide.build(encoded.means, encoded.scales, engine.covs)
    variance = query_relative_variance(encoded.means, encoded.scales, searcher.posterior.text)
    bar = tqdm(total=len(texts), desc=f"sweep {estimator}", unit="query")
    records = sweep(engine, query, variance, item_ids, lambda rows: relevant[rows], encoder.logit_scale,
                    progress=lambda done: bar.update(done - bar.n))
    bar.close()
    evaluation = evaluate(records, fit, encoder.logit_scale, groups=groups)
    evaluation.summary["shift"] = shift_analysis(records, fit, shifted)
    evaluation.summary["engine_check"] = engine_check(searcher, texts, _by_id(relevant, item_ids), records)
    evaluation.summary["plots"] = [str(p) for p in plot_evaluation(
        evaluation, out, f"retrieval_calibration_{estimator}", f"small world, {estimator}")]
    return evaluation.summary


def _by_id(relevant: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
    """Relevance re-indexed so that column ``item_id`` holds that item (ids may have gaps)."""
    wide = np.zeros((relevant.shape[0], int(item_ids.max()) + 1), dtype=bool)
    wide[:, item_ids] = relevant
    return wide


def main(argv: list[str] | None = None) -> dict:
    """Build the worlds, posterior, index and queries, evaluate every estimator, then save and print the results."""
    args = parse_args(argv)
    started = time.perf_counter()
    work = args.work / args.size
    gallery = write_gallery(work / "gallery", args)
    write_training_world(work, args)
    encoder = ClipEncoder.from_pretrained(model_name(args.size), get_trained_model(args.size, args.seed))
    posterior = fit_posterior_on_world(encoder, work, args)
    report = build_index(work / "gallery", work / "index", encoder, posterior, BuildConfig(workers=0))
    reader = Searcher.open(work / "index", encoder).reader
    item_ids = np.asarray(reader.item_ids, dtype=np.int64)
    paths = reader.paths(item_ids)
    scenes = gallery.set_index("path").loc[list(paths)]
    texts, is_full = draw_queries(list(scenes["scene"]), args.queries, args.seed + 7)
    relevant = relevance_matrix(texts, list(scenes["scene"]))
    fit = split_queries(len(texts), args.split_seed)
    results = {
        "model": model_name(args.size), "logit_scale": encoder.logit_scale,
        "posterior": {"lambda": [posterior.image.prior_precision, posterior.text.prior_precision]},
        "gallery": {"items": len(item_ids), "shifted": int(scenes["shifted"].sum()),
                    "worlds": int(gallery["world"].nunique()), "indexed": report.indexed},
        "queries": {"total": len(texts), "full": int(is_full.sum()),
                    "mean_relevant_full": float(relevant[is_full].sum(1).mean()),
                    "mean_relevant_partial": float(relevant[~is_full].sum(1).mean())},
        "estimators": {},
    }
    for estimator in args.estimators:
        results["estimators"][estimator] = run_estimator(work / "index", encoder, estimator, texts, relevant, fit,
                                                         item_ids, args.plots, {"full": is_full, "partial": ~is_full},
                                                         _by_id(scenes["shifted"].to_numpy(bool)[None, :], item_ids)[0])
    results["seconds"] = time.perf_counter() - started
    path = record.save("retrieval_calibration", __file__, args, results, argv, args.output)
    print_tables(results)
    print(f"wrote {path}")
    return results


def print_tables(results: dict) -> None:
    """Markdown tables of the numbers, one block per estimator."""
    for estimator, summary in results["estimators"].items():
        print(f"\n### {estimator} ({results['model']}, {results['gallery']['items']} gallery items, "
              f"{results['queries']['total']} queries)\n")
        print("| score | R@1 | R@5 | R@10 | P@10 | mAP |\n|---|---|---|---|---|---|")
        for label, r in summary["retrieval"].items():
            print(f"| {label} | {r['recall@1']:.3f} | {r['recall@5']:.3f} | {r['recall@10']:.3f} | "
                  f"{r['precision@10']:.3f} | {r['map']:.3f} |")
        print("\n| signal | failure AUROC | AURC | Spearman bin vs R@1 | R^2 |\n|---|---|---|---|---|")
        for name, s in summary["signals"].items():
            b = s["binned_recall@1"]
            print(f"| {name}{' (baseline)' if s['baseline'] else ''} | {s['failure_auroc']:.3f} "
                  f"± {s['failure_auroc_stderr']:.3f} | {s['aurc']:.3f} | "
                  f"{b['spearman']:+.3f} | {b['r2']:.3f} |")
        print("\nfailure AUROC within query kinds: " + "; ".join(
            f"{kind} (top-1 recall {g['top1_recall']:.2f}): "
            + ", ".join(f"{k} {v:.2f}" for k, v in g["failure_auroc"].items())
            for kind, g in summary["groups"].items()))
        picked = summary["selected_on_held_in"]
        print("\nselected on held-in queries: " + "; ".join(
            f"{kind} {p['signal']} (held-out AUROC {p['failure_auroc']:.3f}, AURC {p['aurc']:.3f})"
            for kind, p in picked.items() if p["signal"] is not None))
        print(f"\n(oracle AURC {summary['oracle_aurc']:.3f}, "
              f"held-out top-1 recall {summary['top1_recall_held_out']:.3f})")
        print("\n| link | ECE | Brier | NLL |\n|---|---|---|---|")
        for name in ("probit", "logistic_map"):
            c = summary["calibration"][name]
            print(f"| {name} | {c['ece']:.4f} | {c['brier']:.4f} | {c['nll']:.4f} |")
        print(f"\nshifted gallery images among held-out top results: {summary['shift']}")
        print(f"\nengine check: {summary['engine_check']}")


if __name__ == "__main__":
    main()
