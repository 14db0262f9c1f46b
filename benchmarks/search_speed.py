"""Search speed of the query engine against plain FAISS over the same vectors, in one run.

Builds two index directories over the same random collection (``--items`` items of
dimension ``--dim``; clustered means, per-item noise scales that vary by cluster and
item, a posterior with a decaying spectrum): one ``Flat`` and one ``IVF<nlist>,Flat``.
Then, for batches of ``--batch`` text queries (precomputed embeddings, so the text tower
is not timed), it measures queries per second of

- plain FAISS top-``k``: the stored inner-product index itself (``IndexFlatIP`` /
  ``IndexIVFFlat`` with ``--nprobe``), no ids, no rerank;
- the same plain search asked for the engine's default first-round count
  (``plain_k<count>``, :func:`~bayesretrieval.queries.candidates.default_candidates`, or
  ``--candidates``): what asking FAISS for that many candidates costs by itself. A score
  keeps the default while its hardest query needs more than half of it (``lcb`` on the
  1M collection);
- ``Searcher.search(score="expected")`` and ``score="lcb"`` (``--kappa``): FAISS candidates,
  gather of the candidates' stored rows (means from whichever of the FAISS lists and
  ``means.npy`` has been cheaper, scalars from the memory-mapped arrays), exact float64
  rerank, certificate, result table, with the time of each stage (the result's
  ``attrs["seconds"]``);

and prints the ratios (engine / plain) with the candidate-set sizes the certificates
needed and the fraction of queries certified. It also times fetching the stored means of
a fresh batch's top ``k`` right after its plain search, from ``means.npy`` and from the
FAISS index: the least an exact rerank reads, and so the ratio it can reach at best on
this machine reading them either way. The untimed first search
of each mode (warm-up) also records its candidate sizes: later searches start from
twice what its hardest query needed (``needed``: the fewest FAISS candidates whose
certificate holds). Modes are interleaved batch by batch, in forward and reverse order on
alternate repeats: whatever runs right after plain FAISS pays for the caches it emptied,
so each engine mode follows it in half the repeats. Each batch's best time over the
repeats counts (the machine may be shared); the ratio of the per-batch median times is
printed beside it, and so is the median (with quartiles) of the paired ratios: plain over
the mode for the same batch in the same repeat, which run side by side and so share the
machine's state.

    .venv/bin/python benchmarks/search_speed.py                       # 200k items
    .venv/bin/python benchmarks/search_speed.py --items 1000000       # the 1M run
    .venv/bin/python benchmarks/search_speed.py --fixed-sources       # plus each source of candidate means alone
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from bayesretrieval.encoders import Encoded
from bayesretrieval.indexing.scalars import ScalarComputer
from bayesretrieval.posterior import KroneckerPosterior, PosteriorPair
from bayesretrieval.queries import Searcher
from bayesretrieval.queries.candidates import default_candidates
from bayesretrieval.queries.rows import FROM_FAISS, FROM_FILE
from bayesretrieval.queries.uncertainty import QuerySide
from bayesretrieval.store import IndexReader, ItemArrays, VarianceSpec, VersionInfo, write_version
from bayesretrieval.store.format import SKIPPED_SCHEMA

ACTIVATION_WIDTH = 16
CHUNK = 65_536
FETCH_TRIALS = 5
"""Fresh query batches per source in :func:`mean_fetch_cost`."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=100, help="queries per search call")
    parser.add_argument("--batches", type=int, default=5, help="distinct query batches per repeat")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--kappa", type=float, default=1.0)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=15, help="timed passes; each batch counts its best")
    parser.add_argument("--candidates", type=int, help="first-round candidates (default: the engine's)")
    parser.add_argument("--indexes", nargs="+", choices=["flat", "ivf"], default=["flat", "ivf"],
                        help="which index kinds to build and time")
    parser.add_argument("--fixed-sources", action="store_true",
                        help="also time `expected` and `lcb` reading candidate means from one source only "
                             "(the FAISS lists, or means.npy), beside the engine's own choice")
    parser.add_argument("--workdir", type=Path, help="where to write the indexes (default: a temp dir)")
    parser.add_argument("--output", type=Path, default=Path("results/search_speed.json"))
    return parser.parse_args(argv)


def spectrum_covariance(dim: int, rng: np.random.Generator, trace: float) -> torch.Tensor:
    """A random SPD ``(dim, dim)`` matrix with eigenvalues ``~ 1/(1 + j/16)``, scaled to ``trace``."""
    basis, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    eigvals = 1.0 / (1.0 + np.arange(dim) / 16.0)
    cov = (basis * (eigvals * trace / eigvals.sum())) @ basis.T
    return torch.from_numpy((cov + cov.T) / 2)


def make_posterior(dim: int, rng: np.random.Generator) -> PosteriorPair:
    """Posterior pair with structured output covariances (unit trace) and identity-like ``A^-1``."""
    eye = torch.eye(ACTIVATION_WIDTH, dtype=torch.float64)
    image = KroneckerPosterior(eye / ACTIVATION_WIDTH, spectrum_covariance(dim, rng, 1.0), "image")
    text = KroneckerPosterior(eye / ACTIVATION_WIDTH, spectrum_covariance(dim, rng, 1.0), "text")
    return PosteriorPair(image, text, source="search-speed-benchmark")


def make_items(args, posterior: PosteriorPair, centres: np.ndarray, rng: np.random.Generator) -> ItemArrays:
    """Clustered unit-ish means; noise ratio ``q tr Sigma_I / |mu|^2`` log-normal around 0.1, by cluster."""
    n, d = args.items, args.dim
    cluster_noise = np.exp(rng.normal(math.log(0.1), 0.6, args.clusters))
    computer = ScalarComputer(posterior)
    means = np.empty((n, d), np.float32)
    scalars = np.empty((n, 6))
    for start in range(0, n, CHUNK):
        rows = slice(start, min(start + CHUNK, n))
        size = rows.stop - rows.start
        cluster = rng.integers(0, args.clusters, size)
        block = centres[cluster] + rng.normal(size=(size, d)) * (1.2 / math.sqrt(d))
        means[rows] = block
        ratio = cluster_noise[cluster] * np.exp(rng.normal(0, 0.4, size))
        q = ratio * (block.astype(np.float64) ** 2).sum(1)  # tr Sigma_I = 1
        scalars[rows] = computer.from_scales(torch.from_numpy(means[rows]).double(), torch.from_numpy(q)).scalars
    ids = np.arange(n, dtype=np.int64)
    unknown = np.full(n, -1, np.int64)
    return ItemArrays(ids, [f"c/{i}.jpg" for i in range(n)], unknown, unknown, unknown.astype(np.int32),
                      unknown.astype(np.int32), means, scalars)


def make_queries(args, posterior: PosteriorPair, centres: np.ndarray, rng: np.random.Generator) -> list[Encoded]:
    """Batches of text queries near random cluster centres, noise ratio around 0.1."""
    batches = []
    for _ in range(args.batches):
        embeds = centres[rng.integers(0, args.clusters, args.batch)] + rng.normal(size=(args.batch, args.dim)) * (
            1.5 / math.sqrt(args.dim))
        ratio = np.exp(rng.normal(math.log(0.1), 0.4, args.batch)) * (embeds**2).sum(1)
        # q = a^T A^-1 a = |a|^2 / width for A^-1 = I / width: choose |a|^2 = q * width along one axis
        activations = np.zeros((args.batch, ACTIVATION_WIDTH))
        activations[:, 0] = np.sqrt(ratio * ACTIVATION_WIDTH)
        batches.append(Encoded(torch.from_numpy(embeds), torch.from_numpy(activations)))
    return batches


def build(directory: Path, items: ItemArrays, posterior: PosteriorPair, factory: str) -> float:
    start = time.perf_counter()
    info = VersionInfo("embeddings", "benchmark", {"model_name": "none", "pretrained": None,
                                                   "checkpoint_sha256": None}, VarianceSpec(), factory, len(items))
    write_version(directory, items, SKIPPED_SCHEMA.empty_table(), posterior, info)
    return time.perf_counter() - start


def plain_index(reader: IndexReader, nprobe: int) -> faiss.Index:
    """The FAISS index inside the stored ``IDMap2`` (the same vectors), for the baseline."""
    inner = faiss.downcast_index(reader.faiss_index.index)
    if isinstance(inner, faiss.IndexIVF):
        inner.nprobe = nprobe
    return inner


def time_modes(searcher: Searcher, plain: faiss.Index, batches, fresh, args, nprobe) -> dict:
    """Seconds per mode (per batch the best of the interleaved repeats, summed; medians too), plus candidate sizes.

    ``fresh``: query batches never searched before, for :func:`mean_fetch_cost`.
    """
    xq = [_faiss_queries(searcher, b) for b in batches]
    first_round = args.candidates or default_candidates(args.k)
    modes = {"plain": lambda i: plain.search(xq[i], args.k),
             f"plain_k{first_round}": lambda i: plain.search(xq[i], first_round),
             "expected": _engine_mode(searcher, batches, "expected", args, nprobe),
             "lcb": _engine_mode(searcher, batches, "lcb", args, nprobe)}
    if args.fixed_sources and searcher.rows.indexed_means is not None:
        for source in (FROM_FAISS, FROM_FILE):
            fixed = Searcher(searcher.reader, None, searcher.index_dir)
            fixed.rows.fix_mean_source(source)
            for score in ("expected", "lcb"):
                modes[f"{score}_{source}"] = _engine_mode(fixed, batches, score, args, nprobe)
    compared = [name for name in modes if name != "plain"]
    engine_modes = [name for name in compared if not name.startswith("plain")]
    cold = {name: run(0) for name, run in modes.items()}  # warm-up: page in the arrays, learn candidate counts
    times = {name: np.full((args.repeats, len(batches)), math.inf) for name in modes}
    outputs, stages = {}, {}
    forward = list(modes)
    for repeat in range(args.repeats):
        order = forward if repeat % 2 == 0 else forward[:1] + forward[:0:-1]
        for i in range(len(batches)):
            for name in order:
                start = time.perf_counter()
                outputs[name, i] = modes[name](i)
                seconds = time.perf_counter() - start
                if seconds < times[name][:, i].min():
                    stages[name, i] = getattr(outputs[name, i], "attrs", {}).get("seconds")
                times[name][repeat, i] = seconds
    stats = {}
    for name in engine_modes:
        frames = [outputs[name, i] for i in range(len(batches))]
        sizes = np.concatenate([f.attrs["candidates"] for f in frames])
        needed = np.concatenate([f.attrs["needed"] for f in frames])
        stats[name] = {"candidates_mean": float(sizes.mean()), "candidates_median": float(np.median(sizes)),
                       "candidates_max": int(sizes.max()), "needed_mean": float(needed.mean()),
                       "needed_max": int(needed.max()),
                       "exact_fraction": float(np.mean([f.attrs["exact"] for f in frames])),
                       "certified_fraction": float(np.mean([f.attrs["certified"] for f in frames])),
                       "first_search_candidates_mean": float(np.mean(cold[name].attrs["candidates"])),
                       "first_search_candidates_max": int(np.max(cold[name].attrs["candidates"])),
                       "stage_ms_per_batch": {stage: 1000 * float(np.mean([stages[name, i][stage]
                                                                            for i in range(len(batches))]))
                                              for stage in stages[name, 0]}}
    total = args.batch * len(batches)
    best = {name: float(times[name].min(axis=0).sum()) for name in modes}
    out = {name: {"qps": total / best[name], "seconds": best[name],
                  "qps_median": total / float(np.median(times[name], axis=0).sum())} for name in modes}
    for name in compared:
        paired = times["plain"] / times[name]  # the same batch in the same repeat, run side by side
        out[name].update(stats.get(name, {}), ratio=out[name]["qps"] / out["plain"]["qps"],
                         ratio_median=out[name]["qps_median"] / out["plain"]["qps_median"],
                         ratio_paired=float(np.median(paired)),
                         ratio_paired_quartiles=[float(q) for q in np.percentile(paired, [25, 75])])
    sources = searcher.rows.mean_sources
    out["mean_sources"] = {"us_per_row": {name: 1e6 * cost for name, cost in sources.costs.items()},
                           "reads": dict(sources.uses)}
    out["mean_fetch"] = mean_fetch_cost(searcher.reader, plain, [_faiss_queries(searcher, b) for b in fresh], args)
    return out


def _engine_mode(searcher: Searcher, batches, score: str, args, nprobe):
    """A timed mode: ``searcher.search`` of batch ``i`` by ``score``."""
    return lambda i: searcher.search(batches[i], k=args.k, score=score, kappa=args.kappa, nprobe=nprobe,
                                     candidates=args.candidates)


def mean_fetch_cost(reader: IndexReader, plain: faiss.Index, xq: list[np.ndarray], args) -> dict:
    """Milliseconds to fetch the stored means of a plain search's own top-``k``, right after it.

    An exact rerank reads at least these ``batch * k`` means. From ``means.npy`` they are
    random rows of a large memory-mapped file; from the FAISS index
    (:class:`~bayesretrieval.store.reader.IndexedMeans`) they sit in the lists the search
    has just scanned. Each fresh batch (never searched before) serves one source, the
    sources taking turns. ``plain / (plain + fetch)`` per batch bounds the ratio an exact
    rerank that fetches them that way can reach.
    """
    sources = {FROM_FILE: lambda rows: np.asarray(reader.means[rows])}
    if reader.indexed_means is not None:
        sources[FROM_FAISS] = lambda rows: reader.indexed_means(rows, np.asarray(reader.scalars[rows]))
    names = list(sources)
    times = {name: [] for name in names}
    for trial, queries in enumerate(xq):
        name = names[trial % len(names)]
        rows = plain.search(queries, args.k)[1].reshape(-1)  # the stored index's inner ids are row positions
        start = time.perf_counter()
        sources[name](rows)
        times[name].append(time.perf_counter() - start)
    return {"batch": args.batch, "rows": args.batch * args.k,
            **{f"{name}_ms": 1000 * float(np.median(t)) for name, t in times.items()}}


def _faiss_queries(searcher: Searcher, batch: Encoded) -> np.ndarray:
    """The exact vectors the engine hands FAISS (``mu_y / sqrt(E|y|^2)``) for the baseline."""
    encoded = searcher.encode(batch, "text")
    return QuerySide.build(encoded.means, encoded.scales, searcher.engine("text").covs).faiss_queries()


def main(argv=None) -> dict:
    args = parse_args(argv)
    rng = np.random.default_rng(0)
    posterior = make_posterior(args.dim, rng)
    centres = rng.normal(size=(args.clusters, args.dim)) / math.sqrt(args.dim)
    start = time.perf_counter()
    items = make_items(args, posterior, centres, rng)
    batches = make_queries(args, posterior, centres, rng)
    fresh = make_queries(argparse.Namespace(**{**vars(args), "batches": 2 * FETCH_TRIALS}), posterior, centres, rng)
    print(f"generated {args.items} items x {args.dim} in {time.perf_counter() - start:.0f} s", flush=True)
    nlist = 2 ** round(math.log2(math.sqrt(args.items)))
    results = {"items": args.items, "dim": args.dim, "batch": args.batch, "batches": args.batches, "k": args.k,
               "kappa": args.kappa, "nprobe": args.nprobe, "nlist": nlist, "threads": faiss.omp_get_max_threads()}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for label, factory, nprobe in (("flat", "Flat", None), ("ivf", f"IVF{nlist},Flat", args.nprobe)):
            if label not in args.indexes:
                continue
            seconds = build(Path(tmp) / label, items, posterior, factory)
            print(f"built {label} ({factory}) in {seconds:.0f} s", flush=True)
            reader = IndexReader.open(Path(tmp) / label)
            searcher = Searcher(reader, None, Path(tmp) / label)
            results[label] = time_modes(searcher, plain_index(reader, args.nprobe), batches, fresh, args, nprobe)
            report(label, results[label])
            del searcher, reader
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.output}")
    return results


def report(label: str, timing: dict) -> None:
    plain = timing["plain"]["qps"]
    print(f"{label}: plain {plain:.0f} q/s")
    fetch = timing["mean_fetch"]
    batch_ms = 1000 * fetch["batch"] / plain
    print(f"  fetching the means of a fresh batch's top results ({fetch['rows']}) right after its search: "
          f"plain FAISS {batch_ms:.1f} ms per batch; " + "; ".join(
              f"from {source}: {fetch[source + '_ms']:.1f} ms, so an exact rerank reaches at most "
              f"{batch_ms / (batch_ms + fetch[source + '_ms']):.3f}" for source in (FROM_FILE, FROM_FAISS)
              if source + "_ms" in fetch))
    sources = timing["mean_sources"]
    print("  candidate means: " + ", ".join(f"{name} {us:.2f} us per row, {sources['reads'][name]} reads"
                                            for name, us in sources["us_per_row"].items()))
    for name in [name for name in timing if "ratio" in timing[name]]:
        t = timing[name]
        print(f"  {name:8s} {t['qps']:.0f} q/s  ratio {t['ratio']:.3f} (of medians {t['ratio_median']:.3f}; "
              f"paired {t['ratio_paired']:.3f}, quartiles {t['ratio_paired_quartiles'][0]:.3f}-"
              f"{t['ratio_paired_quartiles'][1]:.3f})")
        if "candidates_mean" not in t:
            continue
        print(f"           candidates mean {t['candidates_mean']:.0f} median {t['candidates_median']:.0f} max {t['candidates_max']}  (needed mean {t['needed_mean']:.1f} "
              f"max {t['needed_max']})  certified {t['certified_fraction']:.2f} "
              f"exact {t['exact_fraction']:.2f}  (first search: mean {t['first_search_candidates_mean']:.0f}, "
              f"max {t['first_search_candidates_max']})")
        print("           ms per batch (best runs): " + ", ".join(
            f"{stage} {ms:.1f}" for stage, ms in t["stage_ms_per_batch"].items()))


if __name__ == "__main__":
    main()
