"""Query-warning benchmark: does a search warn about queries with words the model never saw?

End to end, nothing downloaded: write a training world and fit the Laplace posterior of
the world-trained CLIP on its pairs (``--size benchmark``: ``bayes-small``; the fitted
posterior keeps the percentiles of its fitting captions' relative variance
``q tr(Sigma_T) / |mu|^2``, the query-warning reference); index a clean test gallery with
``build_index``; then search with in-distribution queries and with out-of-vocabulary
variants of them, through ``Searcher.search``.

Queries. The in-distribution queries are captions of clean test scenes, written by the
world's caption generator (``world.captions``, random templates). Every caption gets one
variant per kind, each replacing one word of its first object (or of the background) by
a word drawn at random from the kind's list:

- slot ``colour``: the colour word by one the world never uses (turquoise, magenta, beige, ...);
- slot ``shape``: the shape word by a held-out shape of the split
  (``DEFAULT_SPLIT.held_out_shapes``: "star", never in a training caption), kind
  ``held_out_shape``; or by a shape word outside the world's vocabulary (oval, heart,
  ...), kind ``new_shape``;
- slot ``other``: the texture word (wavy, plaid, ...), the size word (tiny, huge, ...) or
  the position noun ("on the left" becomes "on the corner", ...), kinds ``texture``,
  ``size`` and ``position``.

Every replacement word is checked against the fitting captions (the same generator and
vocabulary the model was trained on): it must not occur as a word, and none of its BPE
tokens (CLIP's tokenizer, 49,408 entries) may occur in the tokenized captions, so its
token embedding never received a gradient. All listed words are single tokens of that
tokenizer; a word that fails either check is dropped and the record says so
(``words``).

Scores, per query (higher = more suspicious): ``query_percentile``, the query-warning
percentile of its relative variance among the fitting captions' (``attrs
["query_percentile"]``, clipped to [0, 100]); ``relative_variance``, the same unclipped;
``query_scale``, the posterior's ``q = a^T A^-1 a`` alone (what ``audit`` ranks items by);
the max-cosine baselines ``neg_top1_expected`` (negated top-1 ``E[cos]``, ``score=
"expected"``) and ``neg_top1_map`` (negated top-1 cosine of the means, ``score="map"``);
for reference the centred Mahalanobis and kNN distances of the query's pre-projection
activation to the fitting captions' (``query_mahalanobis``, ``query_knn``).

Figures: the AUROC of every score for unseen vs in-distribution queries, per slot and
per kind, with percentile-bootstrap 95% intervals over queries and the paired difference
to the better max-cosine baseline with its interval (``evaluation.strata``); the warning
rate at ``--percentile`` (default 99, the search default) for the in-distribution queries
(false alarms) and for each slot and kind (hits), with bootstrap intervals. Writes
``benchmarks/results/query_warnings.json`` and prints its tables (``formatters.query_warnings``,
also in ``benchmarks/RESULTS.md`` through ``benchmarks/report.py``).

    .venv/bin/python benchmarks/query_warnings.py            # bayes-small; ~1.5 min on 2 cores once the
                                                             # training world, posterior and index are cached
    .venv/bin/python benchmarks/query_warnings.py --quick    # bayes-tiny, small sizes, ~10 s
"""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import formatters
import numpy as np
import record
import retrieval_calibration
import torch

from bayesretrieval.encoders import ClipEncoder
from bayesretrieval.evaluation import KnnDistance, MahalanobisDistance, stratified_auroc
from bayesretrieval.indexing.pipeline import BuildConfig, build_index
from bayesretrieval.posterior import PosteriorPair
from bayesretrieval.queries import Searcher
from bayesretrieval.training import ModelSize, get_trained_model, model_name
from bayesretrieval.world import DEFAULT_SPLIT, Scene, make_world, read_world, write_world

IN_DISTRIBUTION = "in_distribution"
SLOTS = ("colour", "shape", "other")
BASELINES = ("neg_top1_expected", "neg_top1_map")
"""The max-cosine baselines; the better one per slot is the comparison."""
QUICK = {"size": ModelSize.TEST.value, "n_fit": 512, "n_gallery": 80, "queries": 80, "bootstrap": 200}
"""What ``--quick`` sets (with the work folder and output under ``results/``)."""


@dataclass(frozen=True)
class Variant:
    """One kind of out-of-vocabulary query: which word of a scene's caption is replaced, and by what.

    Attributes:
        slot: ``colour``, ``shape`` or ``other``.
        word: the caption word replaced (first occurrence), from the scene.
        replacements: candidate unseen words.
    """

    slot: str
    word: Callable[[Scene], str]
    replacements: tuple[str, ...]


VARIANTS: dict[str, Variant] = {
    "colour": Variant("colour", lambda s: s.objects[0].colour.value,
                      ("turquoise", "magenta", "beige", "brown", "black", "white", "gold", "silver", "violet",
                       "maroon", "navy", "olive", "teal", "lime", "indigo", "crimson")),
    "held_out_shape": Variant("shape", lambda s: s.objects[0].shape.value,
                              tuple(shape.value for shape in DEFAULT_SPLIT.held_out_shapes)),
    "new_shape": Variant("shape", lambda s: s.objects[0].shape.value,
                         ("oval", "heart", "arrow", "crescent", "pentagon", "octagon", "spiral", "moon")),
    "texture": Variant("other", lambda s: s.texture.value, ("wavy", "spotted", "plaid", "woven")),
    "size": Variant("other", lambda s: s.objects[0].size.value, ("tiny", "huge", "medium", "giant")),
    "position": Variant("other", lambda s: s.objects[0].position.value, ("corner", "edge", "middle")),
}
"""The out-of-vocabulary kinds, by name (the position noun is the position's value: "on the left")."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the model size, seeds, world and gallery sizes, query count, bootstrap, percentile and paths."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="test model and small sizes: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--size", choices=[s.value for s in ModelSize], default=ModelSize.BENCHMARK.value)
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the worlds")
    parser.add_argument("--n-fit", type=int, default=4096, help="training-world pairs for the posterior fit")
    parser.add_argument("--chunk-size", type=int, default=512, help="C, pairs per InfoNCE chunk of the fit")
    parser.add_argument("--n-gallery", type=int, default=1000, help="clean gallery images")
    parser.add_argument("--queries", type=int, default=1000,
                        help="in-distribution captions; each gets one variant per kind")
    parser.add_argument("--percentile", type=float, default=99.0, help="warning threshold (search default 99)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates of every interval")
    parser.add_argument("--knn", type=int, default=10, help="k of the kNN-distance reference score")
    parser.add_argument("--work", type=Path, default=None,
                        help="worlds, posterior and index, reused when present "
                             "(default results/query_warnings_work, results/query_warnings_quick_work)")
    parser.add_argument("--output", type=Path, default=None,
                        help="result JSON (default benchmarks/results/query_warnings.json; "
                             "--quick: results/query_warnings_quick.json)")
    args = record.apply_quick(parser.parse_args(argv), QUICK)
    suffix = "_quick" if args.quick else ""
    args.work = args.work or Path(f"results/query_warnings{suffix}_work")
    args.output = args.output or (Path("results/query_warnings_quick.json") if args.quick
                                  else record.default_output("query_warnings"))
    return args


def word_check(encoder: ClipEncoder, captions: list[str]) -> dict:
    """Per kind, each candidate word: seen as a word in ``captions``, its tokens, how many of them are seen.

    Returns:
        ``{kind: {word: {"in_captions": bool, "tokens": [str], "tokens_in_captions": int, "kept": bool}}}``;
        a word is kept when it and all its tokens are unseen.
    """
    tokenizer = encoder.tokenizer  # open_clip's SimpleTokenizer (CLIP's BPE) for the world-trained models
    seen_words = set(re.findall(r"[a-z]+", " ".join(captions).lower()))
    seen_tokens = {t for caption in set(captions) for t in tokenizer.encode(caption)}
    checks = {}
    for kind, variant in VARIANTS.items():
        checks[kind] = {}
        for word in variant.replacements:
            ids = tokenizer.encode(word)
            in_captions = word in seen_words
            overlap = sum(t in seen_tokens for t in ids)
            checks[kind][word] = {"in_captions": in_captions, "tokens": [tokenizer.decoder[t] for t in ids],
                                  "tokens_in_captions": overlap, "kept": not in_captions and overlap == 0}
        if not any(c["kept"] for c in checks[kind].values()):
            raise ValueError(f"kind {kind!r}: every candidate word occurs in the fitting captions")
    return checks


def make_queries(scenes: list[Scene], captions: list[str], checks: dict, seed: int) -> dict:
    """The in-distribution captions and one variant per kind of each.

    Returns:
        ``{"texts": [str], "kind": (n,) object, "slot": (n,) object, "source": (n,) int}``:
        ``kind`` and ``slot`` are ``in_distribution`` for the captions themselves, ``source``
        the caption a query came from.
    """
    rng = np.random.default_rng(seed)
    n = len(captions)
    texts, kinds, slots, sources = list(captions), [IN_DISTRIBUTION] * n, [IN_DISTRIBUTION] * n, list(range(n))
    for kind, variant in VARIANTS.items():
        words = [w for w, c in checks[kind].items() if c["kept"]]
        for i, (scene, text) in enumerate(zip(scenes, captions)):
            old, new = variant.word(scene), words[rng.integers(len(words))]
            replaced, count = re.subn(rf"\b{old}\b", new, text, count=1)
            if count != 1:
                raise ValueError(f"caption {text!r} has no word {old!r} to replace")
            texts.append(replaced)
            kinds.append(kind)
            slots.append(variant.slot)
            sources.append(i)
    return {"texts": texts, "kind": np.array(kinds, dtype=object), "slot": np.array(slots, dtype=object),
            "source": np.array(sources)}


def score_queries(searcher: Searcher, texts: list[str], percentile: float) -> dict:
    """Per query ``(n,)``: the warning percentile and flag, the relative variance and the negated top-1 cosines."""
    encoded = searcher.encoder.encode_texts(texts)
    expected = searcher.search(encoded, k=1, score="expected")
    mapped = searcher.search(encoded, k=1, score="map")
    side = searcher.posterior.text
    queries = searcher.encode(encoded)
    relative = side.relative_variance_from_scale(queries.scales, queries.means).numpy()
    reference = np.asarray(searcher.posterior.reference["text"])
    limit = float(np.interp(percentile, np.linspace(0, 100, len(reference)), reference))
    return {"query_percentile": np.asarray(expected.attrs["query_percentile"]),
            "relative_variance": relative,
            "query_scale": queries.scales.numpy(),
            "neg_top1_expected": -_top1(expected, "cosine_mean", len(texts)),
            "neg_top1_map": -_top1(mapped, "score", len(texts)),
            "warned": np.array([w is not None for w in expected.attrs["query_warning"]]),
            "warned_at_percentile": relative > limit,
            "activations": encoded.activations}


def _top1(frame, column: str, n: int) -> np.ndarray:
    """``(n,)`` the rank-0 value of ``column`` per query index."""
    top = frame[frame["rank"] == frame.groupby("query_index")["rank"].transform("min")]
    values = np.full(n, np.nan)
    values[top["query_index"].to_numpy()] = top[column].to_numpy()
    return values


def groups(queries: dict) -> dict:
    """``{name: (n,) bool}``: every slot and every kind, each with the in-distribution queries."""
    base = queries["kind"] == IN_DISTRIBUTION
    masks = {slot: base | (queries["slot"] == slot) for slot in SLOTS}
    masks.update({f"{VARIANTS[kind].slot}/{kind}": base | (queries["kind"] == kind) for kind in VARIANTS})
    return masks


def warning_rates(warned: np.ndarray, queries: dict, n_boot: int, seed: int) -> dict:
    """Warning rate with a bootstrap 95% interval: in-distribution (false alarms), per slot and kind (hits)."""
    rng = np.random.default_rng(seed)
    sets = {IN_DISTRIBUTION: queries["kind"] == IN_DISTRIBUTION,
            **{slot: queries["slot"] == slot for slot in SLOTS},
            **{f"{VARIANTS[kind].slot}/{kind}": queries["kind"] == kind for kind in VARIANTS}}
    rates = {}
    for name, mask in sets.items():
        flags = warned[mask]
        draws = flags[rng.integers(0, flags.size, size=(n_boot, flags.size))].mean(axis=1)
        rates[name] = {"queries": int(flags.size), "warned": int(flags.sum()), "rate": float(flags.mean()),
                       "ci": [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]}
    return rates


def reference_scores(encoder: ClipEncoder, work: Path, activations: torch.Tensor, k: int) -> dict:
    """Centred Mahalanobis and kNN distances ``(n,)`` of query activations to the fitting captions'."""
    fitting = encoder.encode_texts(read_world(work / "train-world").captions).activations
    return {"query_mahalanobis": MahalanobisDistance().fit(fitting).score(activations),
            "query_knn": KnnDistance(k).fit(fitting).score(activations)}


def fit_posterior(encoder: ClipEncoder, work: Path, args: argparse.Namespace) -> PosteriorPair:
    """The posterior fitted on the training world (cached in ``work``), which must hold the query-warning reference."""
    posterior = retrieval_calibration.fit_posterior_on_world(encoder, work, args)
    if not (posterior.reference or {}).get("text"):
        raise ValueError(f"the posterior cached in {work / 'posterior'} has no query-warning reference "
                         "(fitted before it existed); delete that folder to refit")
    return posterior


def build_gallery_index(encoder: ClipEncoder, posterior: PosteriorPair, work: Path, args: argparse.Namespace) -> dict:
    """Write (once) the clean gallery world and index it; returns the gallery's figures."""
    root = work / "gallery"
    if not (root / "world.json").is_file():
        write_world(make_world(args.n_gallery, seed=args.seed + 2), root, overwrite=True)
    report = build_index(root, work / "index", encoder, posterior, BuildConfig(workers=0))
    return {"items": args.n_gallery, "indexed": report.indexed}


def main(argv: list[str] | None = None) -> dict:
    """Fit, index, query, score; save the record and print the tables."""
    args = parse_args(argv)
    started = time.perf_counter()
    work = args.work / args.size
    retrieval_calibration.write_training_world(work, args)
    encoder = ClipEncoder.from_pretrained(model_name(args.size), get_trained_model(args.size, args.seed))
    posterior = fit_posterior(encoder, work, args)
    gallery = build_gallery_index(encoder, posterior, work, args)
    checks = word_check(encoder, read_world(work / "train-world").captions)
    world = make_world(args.queries, seed=args.seed + 3)
    queries = make_queries(world.scenes, list(world.captions), checks, args.seed + 4)
    searcher = Searcher.open(work / "index", encoder, query_warning_percentile=args.percentile)
    scores = score_queries(searcher, queries["texts"], args.percentile)
    searcher.close()
    values = {name: scores[name] for name in ("query_percentile", "relative_variance", "query_scale", *BASELINES)}
    values.update(reference_scores(encoder, work, scores.pop("activations"), args.knn))
    unseen = queries["kind"] != IN_DISTRIBUTION
    auroc = stratified_auroc(values, BASELINES, unseen, groups(queries), args.bootstrap, seed=args.seed)
    figures = {
        "model": model_name(args.size), "logit_scale": encoder.logit_scale,
        "posterior": {"lambda": [posterior.image.prior_precision, posterior.text.prior_precision],
                      "reference_pairs": posterior.reference.get("pairs")},
        "gallery": gallery, "percentile": args.percentile,
        "queries": {"in_distribution": int((~unseen).sum()),
                    **{kind: int((queries["kind"] == kind).sum()) for kind in VARIANTS},
                    "examples": {kind: queries["texts"][int(np.flatnonzero(queries["kind"] == kind)[0])]
                                 for kind in [IN_DISTRIBUTION, *VARIANTS]}},
        "words": checks,
        "signals": {name: {"baseline": name in BASELINES} for name in values},
        "auroc": auroc["strata"],
        "warning_rates": warning_rates(scores["warned"], queries, args.bootstrap, args.seed),
        "search_flag_matches_threshold": bool((scores["warned"] == scores["warned_at_percentile"]).all()),
        "seconds": time.perf_counter() - started,
    }
    path = record.save("query_warnings", __file__, args, figures, argv, args.output)
    print("\n\n".join(formatters.query_warnings({"figures": figures})))
    print(f"wrote {path}")
    return figures


if __name__ == "__main__":
    main()
