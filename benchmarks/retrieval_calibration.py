"""Retrieval-calibration benchmark on the small world: does the uncertainty tell when search is wrong?

End to end, nothing downloaded: write a training world and fit the Laplace posterior of
the world-trained CLIP (``--size benchmark``: ``bayes-small``) on its pairs; write a test
gallery of clean in-distribution images plus a shifted world for every shift family and
severity; index the gallery with ``build_index``; draw text queries from the attributes
of gallery scenes (half full descriptions, half partial ones naming 1-3 attributes of
one object). A pair is relevant when the image still *shows* what the query names
(``visible_relevance_matrix``: a blur-5 blob is no "diamond", a contrast-5 image no
"red ..."); the scene-only labels are a second, reported view. Then, for the default
cosine estimator and for BayesVLM's ``published`` one, score every query against the
whole gallery through the search engine and report:

- retrieval: Recall@1/5/10, precision@10 and mAP for ``map``, ``expected``, ``lcb`` and
  ``ucb`` (kappa 0.5, 1, 2), on all queries;
- does an uncertainty tell when the top-1 result (under ``expected``) is wrong, on the
  held-out queries: the failure AUROC of every signal *within* each stratum (queries:
  full descriptions and partial ones by number of attributes; top-1 results: clean or
  shifted, by family), pooled only as the n-weighted mean of within-stratum AUROCs,
  with bootstrap 95% intervals over queries (``evaluation.strata``). The Bayesian
  signals (top-1 std, std over gap, flip probability, mismatch probability, query
  variance, the top-1 item's ``q``, ``lcb`` flip, ``E[cos]``) are each compared with the
  best baseline of the stratum (top-1 cosine, margin, temperature-scaled softmax,
  centred Mahalanobis and kNN distances of the top-1 item's and the query's
  pre-projection activation to the fitting set); one is *useful* only where the
  interval of its difference excludes zero;
- the held-out failures by kind: knowable (unseen query word, shifted top-1, only
  shifted relevant images) or in-distribution confusions (``evaluation.failures``);
- calibration on held-out queries: ECE (15 bins), Brier and NLL of the probit match
  probability of the top-10 pairs, against a logistic link on the plain cosine;
- the options of docs/math.md sections 13-15 in the same run: the posterior with ``n``
  and ``lambda`` chosen by the held-out retrieval likelihood (``second_order, task
  prior``), the last-block posterior's index with per-item diagonal covariances
  (``second_order, last block``), and the aleatoric head's item std (signals
  ``aleatoric_std``, ``total_std``), the head and the task prior fitted on the pairs of a
  fresh training world;
- precision@10 of ``lcb`` and ``lcb_item`` minus ``expected``, kappa chosen on held-in queries;
- image-side shift detection: per family, the AUROC of each per-image score (``q``, the
  last-block ``tr S / |mu|^2``, the aleatoric variance; the activation distances as
  baselines) for its images at the top severity against the clean ones.

Queries are split at random into a held-in half (fits the probit link, the logistic
link and the softmax temperature) and a held-out half (every uncertainty number).
Writes ``benchmarks/results/retrieval_calibration.json``; prints the stratum tables.

    .venv/bin/python benchmarks/retrieval_calibration.py            # ~3.5 min on 2 cores once the worlds,
                                                                    # posterior and index are cached
    .venv/bin/python benchmarks/retrieval_calibration.py --size test --n-clean 200 --n-shift 10 --queries 300
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import formatters
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import record
import torch
from tqdm import tqdm

from bayesretrieval.encoders import ClipEncoder
from bayesretrieval.evaluation import (
    Fitted,
    KnnDistance,
    MahalanobisDistance,
    Signal,
    TopResults,
    available_signals,
    evaluate,
    failure_auroc,
    fit_temperature,
    query_relative_variance,
    signal_values,
    split_queries,
    stratified_auroc,
    stratified_mean_difference,
    sweep,
)
from bayesretrieval.evaluation.failures import failure_kinds, unseen_word_queries
from bayesretrieval.indexing.embeddings_input import build_index_from_embeddings
from bayesretrieval.indexing.pipeline import BuildConfig, build_index
from bayesretrieval.posterior import PairReader, PosteriorFitter, PosteriorPair
from bayesretrieval.posterior.aleatoric import AleatoricHead
from bayesretrieval.posterior.fit import EncodedPairs
from bayesretrieval.posterior.lastblock import BlockScope
from bayesretrieval.posterior.lastblock_fit import LastBlockFitter
from bayesretrieval.posterior.lastblock_posterior import LastBlockPosterior, item_covariance
from bayesretrieval.posterior.task_prior import tune_prior
from bayesretrieval.queries import Searcher
from bayesretrieval.queries.calibration import ProbitCalibration
from bayesretrieval.queries.uncertainty import QuerySide
from bayesretrieval.similarity import CosineEstimator
from bayesretrieval.training import ModelSize, get_trained_model, model_name
from bayesretrieval.world import (
    MAX_SEVERITY,
    Colour,
    Shape,
    Shift,
    Size,
    Texture,
    full_query,
    images_to_tensor,
    make_world,
    partial_query,
    query_text,
    read_world,
    relevance_matrix,
    write_world,
)
from bayesretrieval.world.io import IMAGES_DIR, read_world_table
from bayesretrieval.world.relevance import visible_relevance_matrix

ATTRIBUTES = ("shape", "colour", "size", "position")
VOCABULARY = [w for enum in (Shape, Colour, Size, Texture) for member in enum for w in member.value.split()]
"""Content words of the queries (positions are phrases of common words, always seen)."""
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
    parser.add_argument("--queries", type=int, default=2400, help="text queries (half full, half partial)")
    parser.add_argument("--estimators", nargs="+", choices=[e.value for e in CosineEstimator],
                        default=[CosineEstimator.SECOND_ORDER.value, CosineEstimator.PUBLISHED.value])
    parser.add_argument("--split-seed", type=int, default=1, help="seed of the held-in / held-out query split")
    parser.add_argument("--work", type=Path, default=Path("results/retrieval_calibration_work"),
                        help="worlds, posterior and index (reused when present)")
    parser.add_argument("--output", type=Path, default=record.default_output("retrieval_calibration"),
                        help="result JSON")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates of every interval")
    parser.add_argument("--knn", type=int, default=10, help="k of the kNN-distance baseline")
    parser.add_argument("--held-out-pairs", type=int, default=2048,
                        help="pairs of a fresh training world that choose the task prior and fit the aleatoric head "
                             "(0: skip both)")
    parser.add_argument("--lastblock-scope", choices=[*(s.value for s in BlockScope), "none"],
                        default=BlockScope.MLP.value,
                        help="layers of the last-block posterior whose index is compared ('none': skip it)")
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


def fit_lastblock(encoder: ClipEncoder, work: Path, args: argparse.Namespace,
                  scope: str) -> tuple[LastBlockPosterior, float | None]:
    """Fit (once; reused from ``work/lastblock-<scope>``) on the training world; returns it and the fit seconds."""
    saved = work / f"lastblock-{scope}"
    if saved.is_dir():
        return LastBlockPosterior.load(saved), None
    root = write_training_world(work, args)
    started = time.perf_counter()
    fitter = LastBlockFitter(scope, chunk_size=args.chunk_size, batch_size=256, progress_bar=True)
    posterior = fitter.fit(encoder, PairReader(root / "world.parquet", image_root=root / IMAGES_DIR)).posterior_
    seconds = time.perf_counter() - started
    posterior.save(saved)
    return posterior, seconds


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


def write_gallery(root: Path, args: argparse.Namespace) -> tuple[pd.DataFrame, np.ndarray]:
    """Write the gallery worlds under ``root``.

    Returns:
        ``(table, images)``: one row per image with ``path`` (relative to root), ``scene``,
        ``world``, ``shifted``, ``family`` (the shift family, ``None`` for a clean image or
        an unchanged image of a content shift) and ``severity``; images ``(N, H, W, 3)`` uint8.
    """
    tables, images = [], []
    for name, make in tqdm(gallery_worlds(args).items(), desc="write gallery", unit="world"):
        if not (root / name / "world.json").is_file():
            write_world(make(), root / name, overwrite=True)
        world = read_world(root / name)
        table, _ = read_world_table(root / name)
        shifted = table["shifted"].to_numpy(bool)
        family = None if name == CLEAN else name.rsplit("-", 1)[0]
        severity = None if name == CLEAN else int(name.rsplit("-", 1)[1])
        tables.append(pd.DataFrame({
            "path": f"{name}/{IMAGES_DIR}/" + table["path"], "scene": world.scenes, "world": name,
            "shifted": shifted, "family": [family if s else None for s in shifted],
            "severity": [severity if s else None for s in shifted]}))
        images.append(world.images)
    return pd.concat(tables, ignore_index=True), np.concatenate(images)


def draw_queries(scenes: list, count: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Query texts from random gallery scenes: even positions full, odd positions partial (1-3 attributes).

    Returns:
        ``(texts, attributes)``: ``attributes`` ``(count,)`` is 0 for a full description, else
        the number of attributes a partial query names.
    """
    rng = np.random.default_rng(seed)
    sources = rng.choice(len(scenes), size=count, replace=True)
    texts, attributes = [], np.zeros(count, dtype=np.int64)
    for i, source in enumerate(sources):
        scene = scenes[source]
        if i % 2 == 0:
            query = full_query(scene)
        else:
            kept = rng.choice(ATTRIBUTES, size=rng.integers(1, 4), replace=False)
            query = partial_query(scene, [a for a in ATTRIBUTES if a in kept])
            attributes[i] = len(kept)
        texts.append(query_text(query))
    return texts, attributes


def encode_activations(encoder: ClipEncoder, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """Pre-projection image activations ``(N, h)`` of uint8 images at the model's resolution."""
    cfg = encoder.model.visual.preprocess_cfg
    return torch.cat([encoder.encode_images(images_to_tensor(part, cfg["mean"], cfg["std"]), batch_size).activations
                      for part in np.array_split(images, max(1, len(images) // 1024))])


def fitting_activations(encoder: ClipEncoder, work: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Image and caption activations of the training world the posterior was fitted on (cached), and its captions."""
    world = read_world(work / "train-world")
    cached = work / "fitting_activations.pt"
    if cached.is_file():
        saved = torch.load(cached)
        return saved["image"], saved["text"], world.captions
    image = encode_activations(encoder, world.images)
    text = encoder.encode_texts(world.captions).activations
    torch.save({"image": image, "text": text}, cached)
    return image, text, world.captions


def held_out_pairs(encoder: ClipEncoder, args: argparse.Namespace) -> EncodedPairs:
    """Encoded pairs of a fresh training world, unseen by the posterior fit."""
    world = make_world(args.held_out_pairs, seed=args.seed + 9, part="train")
    cfg = encoder.model.visual.preprocess_cfg
    images = encoder.encode_images(images_to_tensor(world.images, cfg["mean"], cfg["std"]))
    texts = encoder.encode_texts(world.captions)
    return EncodedPairs(images.activations, images.embeds, texts.activations, texts.embeds)


def task_prior_index(encoder: ClipEncoder, posterior: PosteriorPair, pairs: EncodedPairs, work: Path,
                     args: argparse.Namespace) -> dict:
    """Choose ``(n, lambda)`` on held-out pairs by the retrieval likelihood, and index the gallery with it.

    Returns:
        The choice (:func:`~bayesretrieval.posterior.task_prior.tune_prior`'s report, its grid
        as ``factors`` and a ``log_likelihood`` matrix ``[n factor][lambda factor]``).
    """
    tuned, report = tune_prior(posterior, pairs, encoder.logit_scale)
    build_index(work / "gallery", work / "index-task-prior", encoder, tuned, BuildConfig(workers=0))
    cells = report.pop("grid")
    factors = sorted({cell["n_factor"] for cell in cells})
    grid = {(cell["n_factor"], cell["lambda_factor"]): cell["log_likelihood"] for cell in cells}
    return {**report, "pairs": args.held_out_pairs, "factors": factors,
            "log_likelihood_grid": [[grid[(fn, fl)] for fl in factors] for fn in factors],
            "lambda": [tuned.image.prior_precision, tuned.text.prior_precision],
            "n": [tuned.image.pseudo_data_count, tuned.text.pseudo_data_count]}


def aleatoric_variance(encoder: ClipEncoder, pairs: EncodedPairs, item_activations: torch.Tensor
                       ) -> tuple[np.ndarray, dict]:
    """Fit the aleatoric head on held-out pairs; returns the gallery items' variances ``(nb,)`` and a summary."""
    head = AleatoricHead.fit(pairs.image_activations, pairs.image_embeds, pairs.text_embeds, encoder.logit_scale)
    variance = head.variance(item_activations).numpy()
    return variance, {"pairs": len(pairs.image_embeds), "bias": head.bias, "weight_norm": float(head.weight.norm()),
                      "temperature": head.temperature,
                      "item_std_quartiles": np.quantile(np.sqrt(variance), [0.25, 0.5, 0.75]).tolist()}


def lastblock_index(encoder: ClipEncoder, posterior: PosteriorPair, images: np.ndarray, reader, work: Path,
                    args: argparse.Namespace) -> tuple[dict, np.ndarray]:
    """Index the gallery with the last-block posterior's per-item diagonal embedding covariance.

    The means and ``diag`` columns (:func:`~bayesretrieval.posterior.lastblock_posterior.item_covariance`)
    go through the precomputed-embeddings path with the image index's ids and paths, so both
    indexes hold the same items under the same ids; the text side is the projection posterior's.

    Returns:
        ``(summary, relative_trace)``: the fit and cost, and every item's ``tr S / |mu|^2`` ``(nb,)``.
    """
    lastblock, fit_seconds = fit_lastblock(encoder, work, args, args.lastblock_scope)
    cfg = encoder.model.visual.preprocess_cfg
    started = time.perf_counter()
    means, _, factors = item_covariance(encoder, lastblock, images_to_tensor(images, cfg["mean"], cfg["std"]), "diag")
    seconds = time.perf_counter() - started
    item_ids = np.asarray(reader.item_ids, dtype=np.int64)
    table = pa.table({"item_id": item_ids, "path": list(reader.paths(item_ids)), "embedding": list(means.numpy()),
                      "variance_diag": list(factors.variance_diag)})
    pq.write_table(table, work / "lastblock-embeddings.parquet")
    build_index_from_embeddings(work / "lastblock-embeddings.parquet", work / "index-lastblock", posterior,
                                encoder.identity, BuildConfig(rebuild=True))
    trace = factors.variance_diag.astype(np.float64).sum(1)
    summary = {"scope": args.lastblock_scope, "fit_seconds": fit_seconds, "seconds_per_item": seconds / len(images),
               "lambda": next(iter(lastblock.layers.values())).prior_precision, "items": len(images),
               "trace_quartiles": np.quantile(trace, [0.25, 0.5, 0.75]).tolist()}
    return summary, trace / np.square(means.numpy().astype(np.float64)).sum(1)


def image_shift_detection(scores: dict, labels: Labels, severity: list, n_boot: int) -> dict:
    """Per shift family, how well each per-image score tells its images at the top severity from clean ones.

    Args:
        scores: ``{name: (nb,)}`` per-item scores, higher meaning "less sure of this image".
        labels: the item families.
        severity: ``(nb,)`` each item's severity (``None`` for clean or unchanged images).
        n_boot: bootstrap replicates.

    Returns:
        :func:`~bayesretrieval.evaluation.stratified_auroc`'s strata (one per family: its
        images at the top severity and every clean image) and ``useful``, plus ``severity``.
    """
    top = max(s for s in severity if s is not None)
    clean = np.array([f is None for f in labels.family])
    shifted = np.array([s == top for s in severity])
    strata = {family: clean | (shifted & (labels.family == family))
              for family in sorted({f for f, s in zip(labels.family, shifted) if s})}
    baselines = [name for name in scores if name in ("item_mahalanobis", "item_knn")]
    result = stratified_auroc(scores, baselines, shifted, strata, n_boot)
    return {"severity": top, "strata": result["strata"],
            "useful": {name: signals for name, signals in result["useful"].items() if name != "pooled"}}


def activation_baselines(encoder: ClipEncoder, work: Path, images: np.ndarray, texts: list[str], k: int) -> dict:
    """Per item ``(nb,)`` and per query ``(nq,)`` centred Mahalanobis and kNN distances to the fitting set."""
    fit_image, fit_text, captions = fitting_activations(encoder, work)
    items = encode_activations(encoder, images)
    queries = encoder.encode_texts(texts).activations
    return {"item_activations": items, "captions": captions,
            "item_mahalanobis": MahalanobisDistance().fit(fit_image).score(items),
            "item_knn": KnnDistance(k).fit(fit_image).score(items),
            "query_mahalanobis": MahalanobisDistance().fit(fit_text).score(queries),
            "query_knn": KnnDistance(k).fit(fit_text).score(queries)}


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


@dataclass
class Labels:
    """Everything the stratified analysis needs besides the sweep, item columns in ``item_ids`` order.

    Attributes:
        visible: ``(nq, nb)`` visible-attribute relevance (the primary labels, swept).
        scene: ``(nq, nb)`` scene-only relevance.
        family: ``(nb,)`` object array, shift family per item or ``None``.
        attributes: ``(nq,)`` 0 for full descriptions, else attributes named.
        unseen_word: ``(nq,)`` whether the query has a word no fitting caption has.
        item: per-item ``(nb,)`` arrays ``item_scale``, ``item_mahalanobis``, ``item_knn``.
        query: per-query ``(nq,)`` arrays ``query_mahalanobis``, ``query_knn``.
    """

    visible: np.ndarray
    scene: np.ndarray
    family: np.ndarray
    attributes: np.ndarray
    unseen_word: np.ndarray
    item: dict
    query: dict


def query_strata(attributes: np.ndarray) -> dict:
    """``{"full": mask, "partial-1": ..., ...}`` from the attribute counts (0 = full)."""
    strata = {"full": attributes == 0}
    strata.update({f"partial-{n}": attributes == n for n in sorted(set(attributes.tolist()) - {0})})
    return strata


def top1_strata(family: np.ndarray) -> dict:
    """``{"clean": mask, "<family>": ...}`` from the top-1 items' shift families."""
    strata = {CLEAN: np.array([f is None for f in family])}
    strata.update({s.value: family == s.value for s in Shift if (family == s.value).any()})
    return strata


def stratified(records, fit: np.ndarray, summary: dict, logit_scale: float, labels: Labels,
               item_ids: np.ndarray, n_boot: int) -> dict:
    """Within-stratum failure AUROCs under both label views, and the failures by kind, on held-out queries."""
    held = ~fit
    column = np.searchsorted(item_ids, records.pair_item[:, :2])  # (n, 2) gallery columns of the top two
    t_index = int(np.flatnonzero(records.temperatures == summary["softmax_temperature"])[0])
    probit_temperature, p_index = fit_temperature(records.probit_log_normaliser[fit],
                                                  records.probit_relevant_log_mass[fit], records.temperatures)
    summary["probit_softmax_temperature"] = probit_temperature
    probit = summary["calibration"]["probit"]
    fitted = Fitted(ProbitCalibration.from_dict({"threshold": probit["threshold"], "noise_std": probit["noise_std"]}),
                    summary["softmax_temperature"], logit_scale, probit_temperature)
    top1 = column[:, 0]
    top = TopResults(records.pair_mean[:, :2], records.pair_var[:, :2], records.pair_map[:, :2],
                     records.pair_relevant[:, :2], records.query_variance, records.log_normaliser[:, t_index],
                     **{name: values[top1] for name, values in labels.item.items()}, **labels.query,
                     item_var=records.pair_var_item[:, 0],
                     probit_log_normaliser=records.probit_log_normaliser[:, p_index]).take(held)
    values = {s.value: signal_values(s, top, fitted) for s in available_signals(top)}
    baselines = [s.value for s in Signal if s.is_baseline and s.value in values]
    rows = np.flatnonzero(held)
    family = labels.family[top1[rows]]
    views = {"visible": ~top.relevant[:, 0], "scene": ~labels.scene[rows, top1[rows]]}
    partitions = {"query": query_strata(labels.attributes[rows]), "top1": top1_strata(family)}
    shifted_item = np.array([f is not None for f in labels.family])
    relevant_only_shifted = ~(labels.visible[rows] & ~shifted_item).any(axis=1)
    return {
        "signals": {name: {"baseline": name in baselines} for name in values},
        "views": {view: {part: stratified_auroc(values, baselines, failed, strata, n_boot, seed=i)
                         for i, (part, strata) in enumerate(partitions.items())}
                  for view, failed in views.items()},
        "failures": failure_kinds(views["visible"], labels.unseen_word[rows], family != None,  # noqa: E711
                                  relevant_only_shifted),
    }


def ranking_gains(records, fit: np.ndarray, strata: dict, n_boot: int) -> dict:
    """Held-out precision@10 of each risk-averse score minus ``expected``'s, kappa chosen on held-in queries.

    For ``lcb`` and ``lcb_item``: the kappa with the best held-in mean precision (ties to the
    smallest), then the held-out per-query difference to ``expected`` within ``strata``
    (disjoint query strata), with paired bootstrap intervals.
    """
    precision = {label: r["hits"] / records.top for label, r in records.rankings.items()}
    gains = {}
    for family in ("lcb", "lcb_item"):
        labels = sorted((label for label in precision if label.startswith(f"{family}(")),
                        key=lambda label: float(label.split("=")[1].rstrip(")")))
        chosen = max(labels, key=lambda label: (precision[label][fit].mean(), -labels.index(label)))
        held = {name: mask[~fit] for name, mask in strata.items()}
        gains[family] = {"label": chosen, "held_in_precision": float(precision[chosen][fit].mean()),
                         **stratified_mean_difference(precision[chosen][~fit], precision["expected"][~fit],
                                                      held, n_boot)}
    return gains


def run_estimator(index_dir: Path, encoder: ClipEncoder, estimator: str, texts: list[str], labels: Labels,
                  fit: np.ndarray, item_ids: np.ndarray, n_boot: int) -> dict:
    """Sweep and evaluate one estimator; returns its summary."""
    searcher = Searcher.open(index_dir, encoder, estimator=estimator)
    encoded = searcher.encode(texts)
    engine = searcher.engine("text")
    query = QuerySide.build(encoded.means, encoded.scales, engine.covs)
    variance = query_relative_variance(encoded.means, encoded.scales, searcher.posterior.text)
    bar = tqdm(total=len(texts), desc=f"sweep {estimator}", unit="query")
    records = sweep(engine, query, variance, item_ids, lambda rows: labels.visible[rows], encoder.logit_scale,
                    progress=lambda done: bar.update(done - bar.n))
    bar.close()
    summary = evaluate(records, fit, encoder.logit_scale).summary
    for pooled in ("signals", "groups", "selected_on_held_in", "oracle_aurc"):  # AUROCs over mixed strata
        summary.pop(pooled)
    summary["stratified"] = stratified(records, fit, summary, encoder.logit_scale, labels, item_ids, n_boot)
    summary["ranking_gain"] = ranking_gains(records, fit, query_strata(labels.attributes), n_boot)
    shifted = _by_id(np.array([f is not None for f in labels.family])[None, :], item_ids)[0]
    summary["shift"] = shift_analysis(records, fit, shifted)
    summary["engine_check"] = engine_check(searcher, texts, _by_id(labels.visible, item_ids), records)
    return summary


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
    gallery, images = write_gallery(work / "gallery", args)
    write_training_world(work, args)
    encoder = ClipEncoder.from_pretrained(model_name(args.size), get_trained_model(args.size, args.seed))
    posterior = fit_posterior_on_world(encoder, work, args)
    report = build_index(work / "gallery", work / "index", encoder, posterior, BuildConfig(workers=0))
    reader = Searcher.open(work / "index", encoder).reader
    item_ids = np.asarray(reader.item_ids, dtype=np.int64)
    order = pd.Series(np.arange(len(gallery)), index=gallery["path"]).loc[list(reader.paths(item_ids))].to_numpy()
    scenes = gallery.iloc[order].reset_index(drop=True)
    texts, attributes = draw_queries(list(scenes["scene"]), args.queries, args.seed + 7)
    ood = activation_baselines(encoder, work, images[order], texts, args.knn)
    pairs = held_out_pairs(encoder, args) if args.held_out_pairs else None
    aleatoric, aleatoric_summary = {}, None
    if pairs is not None:
        variance, aleatoric_summary = aleatoric_variance(encoder, pairs, ood["item_activations"])
        aleatoric = {"aleatoric_var": variance}
    family = np.array([f if isinstance(f, str) else None for f in scenes["family"]], dtype=object)
    severity = [None if f is None else int(v) for f, v in zip(family, scenes["severity"])]
    labels = Labels(
        visible=visible_relevance_matrix(texts, list(scenes["scene"]), list(family), severity),
        scene=relevance_matrix(texts, list(scenes["scene"])), family=family,
        attributes=attributes, unseen_word=unseen_word_queries(texts, ood["captions"], VOCABULARY),
        item={"item_scale": posterior.image.activation_scale(ood["item_activations"]).numpy(), **aleatoric,
              "item_mahalanobis": ood["item_mahalanobis"], "item_knn": ood["item_knn"]},
        query={"query_mahalanobis": ood["query_mahalanobis"], "query_knn": ood["query_knn"]})
    fit = split_queries(len(texts), args.split_seed)
    full = attributes == 0
    results = {
        "model": model_name(args.size), "logit_scale": encoder.logit_scale,
        "posterior": {"lambda": [posterior.image.prior_precision, posterior.text.prior_precision]},
        "gallery": {"items": len(item_ids), "shifted": int(scenes["shifted"].sum()),
                    "worlds": int(gallery["world"].nunique()), "indexed": report.indexed},
        "queries": {"total": len(texts), "full": int(full.sum()),
                    **{f"partial-{n}": int((attributes == n).sum()) for n in (1, 2, 3)},
                    "unseen_word": int(labels.unseen_word.sum()),
                    "mean_relevant_full": float(labels.visible[full].sum(1).mean()),
                    "mean_relevant_partial": float(labels.visible[~full].sum(1).mean()),
                    "mean_relevant_full_scene_labels": float(labels.scene[full].sum(1).mean()),
                    "mean_relevant_partial_scene_labels": float(labels.scene[~full].sum(1).mean())},
        "estimators": {},
    }
    if aleatoric_summary:
        results["aleatoric"] = aleatoric_summary
    for estimator in args.estimators:
        results["estimators"][estimator] = run_estimator(work / "index", encoder, estimator, texts, labels, fit,
                                                         item_ids, args.bootstrap)
    if pairs is not None:
        results["task_prior"] = task_prior_index(encoder, posterior, pairs, work, args)
        results["estimators"][formatters.TASK_PRIOR] = run_estimator(
            work / "index-task-prior", encoder, CosineEstimator.SECOND_ORDER.value, texts, labels, fit, item_ids,
            args.bootstrap)
    shift_scores = {name: labels.item[name] for name in ("item_scale", "aleatoric_var", "item_mahalanobis", "item_knn")
                    if name in labels.item}
    if args.lastblock_scope != "none":
        results["lastblock"], shift_scores["lastblock_trace"] = lastblock_index(encoder, posterior, images[order],
                                                                                reader, work, args)
        results["estimators"][formatters.LAST_BLOCK] = run_estimator(
            work / "index-lastblock", encoder, CosineEstimator.SECOND_ORDER.value, texts, labels, fit, item_ids,
            args.bootstrap)
    results["image_shift_detection"] = image_shift_detection(shift_scores, labels, severity, args.bootstrap)
    results["seconds"] = time.perf_counter() - started
    path = record.save("retrieval_calibration", __file__, args, results, argv, args.output)
    print("\n\n".join(formatters.calibration_benchmark({"figures": results})))
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
