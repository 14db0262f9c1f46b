"""Search speed of the query engine against plain FAISS over the same vectors, in one run.

Builds two index directories over the same random collection (``--items`` items of
dimension ``--dim``; clustered means, per-item noise scales that vary by cluster and
item, a posterior with a decaying spectrum): one ``Flat`` and one ``IVF<nlist>,Flat``.
Then, for batches of ``--batch`` text queries (precomputed embeddings, so the text tower
is not timed), it measures queries per second of

- plain FAISS top-``k``: the stored inner-product index itself (``IndexFlatIP`` /
  ``IndexIVFFlat`` with ``--nprobe``), no ids, no rerank;
- the same plain search asked for each engine score's first-round count
  (``plain_k<count>``, :meth:`~bayesretrieval.queries.scorers.Scorer.first_round`, or
  ``--candidates``): what asking FAISS for that many candidates costs by itself;
- ``Searcher.search(score="expected")`` and ``score="lcb"`` (``--kappa``): FAISS candidates,
  gather of the candidates' stored rows (means and scalars from the memory-mapped
  arrays), exact float64 rerank, certificate, result table, with the time of each stage
  (the result's ``attrs["seconds"]``);

and prints the ratios (engine / plain) with the candidate-set sizes the certificates
needed and the fraction of queries certified. It also times fetching the stored means of
a fresh batch's top ``k`` from ``means.npy`` right after its plain search: the least an
exact rerank reads, and so the ratio it can reach at best on this machine. Each mode
runs once untimed first (warm-up: the arrays paged in). ``needed`` is the fewest FAISS
candidates whose certificate holds. Modes are interleaved batch by batch, in forward and
reverse order on alternate repeats: whatever runs right after plain FAISS pays for the
caches it emptied, so each engine mode follows it in half the repeats. Each batch's best
time over the repeats counts (the machine may be shared); the ratio of the per-batch
median times is printed beside it, and so is the median (with quartiles) of the paired
ratios: plain over the mode for the same batch in the same repeat, which run side by side
and so share the machine's state.

Writes ``benchmarks/results/search_speed.json`` (per index and mode: queries per second,
ms per batch, the ratio of the best and of the median times to plain FAISS, the paired
ratios' median and quartiles, candidate sizes and stage times).

    .venv/bin/python benchmarks/search_speed.py                       # 200k items
    .venv/bin/python benchmarks/search_speed.py --items 1000000       # the 1M run
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import record
import torch

from bayesretrieval.encoders import Encoded
from bayesretrieval.indexing.scalars import ScalarComputer
from bayesretrieval.posterior import KroneckerPosterior, PosteriorPair
from bayesretrieval.queries import Searcher
from bayesretrieval.queries.scorers import make_scorer
from bayesretrieval.queries.uncertainty import QuerySide
from bayesretrieval.store import IndexReader, ItemArrays, VarianceSpec, VersionInfo, write_version
from bayesretrieval.store.format import SKIPPED_SCHEMA

ACTIVATION_WIDTH = 16
CHUNK = 65_536
ENGINE_SCORES = ("expected", "lcb")
FETCH_TRIALS = 5
"""Fresh query batches in :func:`mean_fetch_cost`."""


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the collection shape, query batches, k, kappa, nprobe, repeats, index kinds, threads and paths."""
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
    parser.add_argument("--candidates", type=int, help="first-round candidates (default: each score's own)")
    parser.add_argument("--indexes", nargs="+", choices=["flat", "ivf"], default=["flat", "ivf"],
                        help="which index kinds to build and time")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads for the process (what Searcher.open(torch_threads=...) "
                             "sets; default 1, as a search-only process on few cores would set it)")
    parser.add_argument("--workdir", type=Path, help="where to write the indexes (default: a temp dir)")
    parser.add_argument("--output", type=Path, default=record.default_output("search_speed"))
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
    """Write ``items`` as an index version with the FAISS ``factory`` into ``directory``; returns seconds."""
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
    modes = {"plain": _plain_mode(plain, xq, args.k)}
    for count in sorted(set(first_rounds(args).values())):
        modes[f"plain_k{count}"] = _plain_mode(plain, xq, count)
    for score in ENGINE_SCORES:
        modes[score] = _engine_mode(searcher, batches, score, args, nprobe)
    for run in modes.values():
        run(0)  # warm-up: page in the arrays
    times, outputs, stages = _interleaved(modes, len(batches), args.repeats)
    out = {name: _throughput(times[name], args.batch) for name in modes}
    for name in [name for name in modes if name != "plain"]:
        if name in ENGINE_SCORES:
            out[name].update(_engine_stats([outputs[name, i] for i in range(len(batches))],
                                           [stages[name, i] for i in range(len(batches))]))
        paired = times["plain"] / times[name]  # the same batch in the same repeat, run side by side
        out[name].update(ratio=out[name]["qps"] / out["plain"]["qps"],
                         ratio_median=out[name]["qps_median"] / out["plain"]["qps_median"],
                         ratio_paired=float(np.median(paired)),
                         ratio_paired_quartiles=[float(q) for q in np.percentile(paired, [25, 75])])
    fetch_ms = mean_fetch_cost(searcher.reader, plain, [_faiss_queries(searcher, b) for b in fresh], args)
    plain_ms = out["plain"]["ms_per_batch"]
    out["mean_fetch"] = {"batch": args.batch, "rows": args.batch * args.k, "means_ms": fetch_ms,
                         "ratio_bound": plain_ms / (plain_ms + fetch_ms)}
    return out


def _interleaved(modes: dict, batch_count: int, repeats: int) -> tuple[dict, dict, dict]:
    """Time every mode on every batch, modes interleaved, forward and reverse on alternate repeats.

    Returns:
        ``(times, outputs, stages)``: seconds ``(repeats, batch_count)`` per mode; the last
        output per ``(mode, batch)``; the stage seconds (``attrs["seconds"]``) of each
        ``(mode, batch)``'s fastest run.
    """
    times = {name: np.full((repeats, batch_count), math.inf) for name in modes}
    outputs, stages = {}, {}
    forward = list(modes)
    for repeat in range(repeats):
        order = forward if repeat % 2 == 0 else forward[:1] + forward[:0:-1]
        for i in range(batch_count):
            for name in order:
                start = time.perf_counter()
                outputs[name, i] = modes[name](i)
                seconds = time.perf_counter() - start
                if seconds < times[name][:, i].min():
                    stages[name, i] = getattr(outputs[name, i], "attrs", {}).get("seconds")
                times[name][repeat, i] = seconds
    return times, outputs, stages


def first_rounds(args) -> dict[str, int]:
    """FAISS candidates of each engine score's first round: ``--candidates``, else the scorer's own."""
    return {score: args.candidates or make_scorer(score, args.kappa).first_round(args.k) for score in ENGINE_SCORES}


def _engine_stats(frames: list, stages: list[dict]) -> dict:
    """Candidate sizes, certification and stage times of one engine mode's result frames (one per batch)."""
    sizes = np.concatenate([f.attrs["candidates"] for f in frames])
    needed = np.concatenate([f.attrs["needed"] for f in frames])
    return {"candidates_mean": float(sizes.mean()), "candidates_median": float(np.median(sizes)),
            "candidates_max": int(sizes.max()), "needed_mean": float(needed.mean()),
            "needed_max": int(needed.max()),
            "exact_fraction": float(np.mean([f.attrs["exact"] for f in frames])),
            "certified_fraction": float(np.mean([f.attrs["certified"] for f in frames])),
            "stage_ms_per_batch": {stage: 1000 * float(np.mean([s[stage] for s in stages])) for stage in stages[0]}}


def _throughput(times: np.ndarray, batch: int) -> dict:
    """Queries per second and ms per batch from ``(repeats, batches)`` seconds: per batch its best, and its median."""
    best = float(times.min(axis=0).sum())
    median = float(np.median(times, axis=0).sum())
    batches = times.shape[1]
    return {"qps": batch * batches / best, "seconds": best, "ms_per_batch": 1000 * best / batches,
            "qps_median": batch * batches / median, "ms_per_batch_median": 1000 * median / batches}


def _plain_mode(plain: faiss.Index, xq: list[np.ndarray], k: int):
    """A timed mode: plain FAISS top-``k`` of batch ``i``."""
    return lambda i: plain.search(xq[i], k)


def _engine_mode(searcher: Searcher, batches, score: str, args, nprobe):
    """A timed mode: ``searcher.search`` of batch ``i`` by ``score``."""
    return lambda i: searcher.search(batches[i], k=args.k, score=score, kappa=args.kappa, nprobe=nprobe,
                                     candidates=args.candidates)


def mean_fetch_cost(reader: IndexReader, plain: faiss.Index, xq: list[np.ndarray], args) -> float:
    """Median milliseconds to fetch the stored means of a plain search's own top-``k`` from ``means.npy``.

    An exact rerank reads at least these ``batch * k`` means: random rows of a large
    memory-mapped file, fetched right after the search of a fresh batch (never searched
    before). ``plain / (plain + fetch)`` per batch bounds the ratio an exact rerank can reach.
    """
    times = []
    for queries in xq:
        rows = plain.search(queries, args.k)[1].reshape(-1)  # the stored index's inner ids are row positions
        start = time.perf_counter()
        np.asarray(reader.means[rows])
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def _faiss_queries(searcher: Searcher, batch: Encoded) -> np.ndarray:
    """The exact vectors the engine hands FAISS (``mu_y / sqrt(E|y|^2)``) for the baseline."""
    encoded = searcher.encode(batch, "text")
    return QuerySide.build(encoded.means, encoded.scales, searcher.engine("text").covs).faiss_queries()


def main(argv=None) -> dict:
    """Build both indexes, time every mode, print and write the figures."""
    args = parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    rng = np.random.default_rng(0)
    posterior = make_posterior(args.dim, rng)
    centres = rng.normal(size=(args.clusters, args.dim)) / math.sqrt(args.dim)
    start = time.perf_counter()
    items = make_items(args, posterior, centres, rng)
    batches = make_queries(args, posterior, centres, rng)
    fresh = make_queries(argparse.Namespace(**{**vars(args), "batches": FETCH_TRIALS}), posterior, centres, rng)
    print(f"generated {args.items} items x {args.dim} in {time.perf_counter() - start:.0f} s", flush=True)
    nlist = 2 ** round(math.log2(math.sqrt(args.items)))
    results = {"nlist": nlist, "threads": faiss.omp_get_max_threads(), "first_round": first_rounds(args)}
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
    print(f"wrote {record.save('search_speed', __file__, args, results, argv, args.output)}")
    return results


def report(label: str, timing: dict) -> None:
    """Print one index's figures."""
    plain = timing["plain"]
    print(f"{label}: plain {plain['qps']:.0f} q/s, {plain['ms_per_batch']:.1f} ms per batch")
    fetch = timing["mean_fetch"]
    print(f"  fetching the means of a fresh batch's top results ({fetch['rows']}) from means.npy right after "
          f"its search: {fetch['means_ms']:.1f} ms against plain FAISS's {timing['plain']['ms_per_batch']:.1f} ms "
          f"per batch, so an exact rerank reaches at most {fetch['ratio_bound']:.3f}")
    for name in [name for name in timing if "ratio" in timing[name]]:
        t = timing[name]
        print(f"  {name:8s} {t['qps']:.0f} q/s  ratio {t['ratio']:.3f} (of medians {t['ratio_median']:.3f}; "
              f"paired {t['ratio_paired']:.3f}, quartiles {t['ratio_paired_quartiles'][0]:.3f}-"
              f"{t['ratio_paired_quartiles'][1]:.3f})")
        if "candidates_mean" not in t:
            continue
        print(f"           candidates mean {t['candidates_mean']:.0f} median {t['candidates_median']:.0f} "
              f"max {t['candidates_max']}  (needed mean {t['needed_mean']:.1f} "
              f"max {t['needed_max']})  certified {t['certified_fraction']:.2f} "
              f"exact {t['exact_fraction']:.2f}")
        print("           ms per batch (best runs): " + ", ".join(
            f"{stage} {ms:.1f}" for stage, ms in t["stage_ms_per_batch"].items()))


if __name__ == "__main__":
    main()
