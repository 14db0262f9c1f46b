"""Service load benchmark: concurrent HTTP clients against ``bayesretrieval serve``, beside in-process search.

End to end, nothing downloaded: fit the Laplace posterior of the world-trained CLIP on a
training world (``--size benchmark``: ``bayes-small``), index a clean gallery world, and
start ``bayesretrieval serve`` on a loopback port, once per ``--workers`` setting (worker
processes). Queries are captions of another world, each searched with ``k``, ``score``
and no filter.

Throughput, interleaved in ``--rounds`` rounds: each round searches in this process for
``--in-process-seconds`` (one ``Searcher``, one query at a time: the library's own rate),
then, per server, ``--clients`` client threads (``httpx``, keep-alive) send queries back to
back for ``--seconds``. Figures per round: requests per second, its ratio to the round's
in-process queries per second, p50 and p99 latency (from just before sending to the
parsed answer), errors (a non-200 answer or a failed request). The summary gives each
ratio's median with quartiles over rounds. The clients run on the same cores as the
server, as a load generator on loopback does.

Updates under load: the clients run against the first server while ``--updates`` builds
(``bayesretrieval build-index`` processes, each adding ``--update-images`` new files to
the gallery folder) publish new versions. A version's publication time is its
``manifest.json``'s modification time. Per version: how long after its publication the
first request to see it started (``first_seen_s``), and the last start of a request still
answered from an older version (``last_stale_s``, negative when every request started
after the publication saw it). The target: zero errors and ``last_stale_s`` under 1 s.

Writes ``benchmarks/results/serve_load.json`` and prints its tables
(``formatters.serve_load``, also in ``benchmarks/RESULTS.md``).

    .venv/bin/python benchmarks/serve_load.py            # bayes-small, 16 clients, 3 rounds; ~5 min on 2 cores
    .venv/bin/python benchmarks/serve_load.py --quick    # bayes-tiny, 4 clients, short phases; ~1 min
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import formatters
import numpy as np
import record
import retrieval_calibration

from bayesretrieval.encoders import ClipEncoder
from bayesretrieval.indexing.pipeline import BuildConfig, build_index
from bayesretrieval.options import IMAGES_DIR
from bayesretrieval.queries import Searcher
from bayesretrieval.store.format import MANIFEST_FILE
from bayesretrieval.training import ModelSize, get_trained_model, model_name
from bayesretrieval.world import make_world, write_world

QUICK = {"size": ModelSize.TEST.value, "n_fit": 512, "n_gallery": 200, "clients": 4, "rounds": 1, "seconds": 4.0,
         "in_process_seconds": 2.0, "workers": [1], "updates": 2, "update_gap": 1.0, "update_images": 4}
"""What ``--quick`` sets (with the work folder and output under ``results/``)."""
STARTUP_S = 180.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the model, gallery, load and update settings."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="test model and short phases: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--size", choices=[s.value for s in ModelSize], default=ModelSize.BENCHMARK.value)
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the worlds")
    parser.add_argument("--n-fit", type=int, default=4096, help="training-world pairs for the posterior fit")
    parser.add_argument("--chunk-size", type=int, default=512, help="C, pairs per InfoNCE chunk of the fit")
    parser.add_argument("--n-gallery", type=int, default=1000, help="gallery images")
    parser.add_argument("--queries", type=int, default=500, help="distinct query captions, sent in turn")
    parser.add_argument("-k", type=int, default=10, help="results per query")
    parser.add_argument("--score", default="expected", help="ranking score of every query")
    parser.add_argument("--clients", type=int, default=16, help="concurrent client threads")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each HTTP load phase")
    parser.add_argument("--in-process-seconds", type=float, default=10.0, help="length of each in-process phase")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of in-process and HTTP phases")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="server worker counts to load")
    parser.add_argument("--updates", type=int, default=5, help="index updates published during the update phase")
    parser.add_argument("--update-gap", type=float, default=3.0, help="seconds between one update and the next")
    parser.add_argument("--update-images", type=int, default=10, help="new gallery images per update")
    parser.add_argument("--work", type=Path, default=None,
                        help="worlds, posterior and index (default results/serve_load_work, reused when present)")
    parser.add_argument("--output", type=Path, default=None,
                        help="result JSON (default benchmarks/results/serve_load.json; --quick: "
                             "results/serve_load_quick.json)")
    args = record.apply_quick(parser.parse_args(argv), QUICK)
    suffix = "_quick" if args.quick else ""
    args.work = args.work or Path(f"results/serve_load{suffix}_work")
    args.output = args.output or (Path("results/serve_load_quick.json") if args.quick
                                  else record.default_output("serve_load"))
    return args


@dataclass
class Load:
    """What the clients of one phase saw: per request its start (wall clock), latency, version, and errors."""

    starts: list = field(default_factory=list)
    latencies: list = field(default_factory=list)
    versions: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    seconds: float = 0.0

    def figures(self) -> dict:
        """Requests, errors, requests per second and latency percentiles (ms)."""
        latency = 1000 * np.asarray(self.latencies or [np.nan])
        return {"requests": len(self.latencies), "errors": len(self.errors), "error_examples": self.errors[:3],
                "rps": len(self.latencies) / self.seconds, "p50_ms": float(np.percentile(latency, 50)),
                "p99_ms": float(np.percentile(latency, 99))}


def run_clients(base: str, queries: list[str], args: argparse.Namespace, until) -> Load:
    """``args.clients`` threads sending searches to ``base`` until ``until()`` is true."""
    import httpx

    load, lock = Load(), threading.Lock()
    turns = itertools.count()

    def client() -> None:
        with httpx.Client(base_url=base, timeout=60) as http:
            while not until():
                query = queries[next(turns) % len(queries)]
                started, clock = time.time(), time.perf_counter()
                try:
                    response = http.post("/api/search", json={"queries": query, "k": args.k, "score": args.score})
                    answer = response.json()
                    failure = None if response.status_code == 200 else f"{response.status_code}: {answer}"
                except (httpx.HTTPError, ValueError) as err:
                    failure, answer = f"{type(err).__name__}: {err}", {}
                with lock:
                    if failure:
                        load.errors.append(failure)
                    else:
                        load.starts.append(started)
                        load.latencies.append(time.perf_counter() - clock)
                        load.versions.append(answer["version"])

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    load.seconds = time.perf_counter() - start
    return load


def for_seconds(seconds: float):
    """A stop condition that turns true ``seconds`` from now."""
    deadline = time.perf_counter() + seconds
    return lambda: time.perf_counter() >= deadline


def in_process_qps(searcher: Searcher, queries: list[str], args: argparse.Namespace) -> float:
    """Queries per second of ``searcher.search``, one query at a time, for ``args.in_process_seconds``."""
    done, start, stop = 0, time.perf_counter(), for_seconds(args.in_process_seconds)
    while not stop():
        searcher.search(queries[done % len(queries)], k=args.k, score=args.score)
        done += 1
    return done / (time.perf_counter() - start)


class Server:
    """``bayesretrieval serve`` in a child process on a free loopback port."""

    def __init__(self, index: Path, workers: int):
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "bayesretrieval.cli", "serve", str(index), "--port", str(port),
                   "--workers", str(workers), "--torch-threads", "1"]
        self.log = open(index.parent / f"serve-{workers}.log", "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "HF_HUB_OFFLINE": "1"})
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.base}/api/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server did not answer within {STARTUP_S} s; see {self.log.name}")

    def close(self) -> None:
        """Stop the server (SIGTERM) and close its log."""
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()


def throughput_rounds(searcher: Searcher, servers: dict, queries: list[str], args: argparse.Namespace) -> list:
    """Each round: in-process queries per second, then each server under load."""
    rounds = []
    for number in range(args.rounds):
        qps = in_process_qps(searcher, queries, args)
        http = {str(w): run_clients(server.base, queries, args, for_seconds(args.seconds)).figures()
                for w, server in servers.items()}
        rounds.append({"in_process_qps": qps, "http": http,
                       "ratio": {w: figures["rps"] / qps for w, figures in http.items()}})
        print(f"round {number + 1}/{args.rounds}: in-process {qps:.1f} q/s; " + "; ".join(
            f"{w} worker(s) {f['rps']:.1f} req/s, p99 {f['p99_ms']:.0f} ms, {f['errors']} errors"
            for w, f in http.items()), flush=True)
    return rounds


def quartiles(values) -> dict:
    """Median and quartiles of ``values``."""
    q1, median, q3 = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
    return {"median": float(median), "q1": float(q1), "q3": float(q3)}


def summarise(rounds: list) -> dict:
    """Per worker count: rps and rps / in-process ratio over rounds, pooled errors, p50 / p99 medians."""
    summary = {"in_process_qps": quartiles([r["in_process_qps"] for r in rounds])}
    for workers in rounds[0]["http"]:
        phases = [r["http"][workers] for r in rounds]
        summary[workers] = {"rps": quartiles([p["rps"] for p in phases]),
                            "ratio": quartiles([r["ratio"][workers] for r in rounds]),
                            "p50_ms": quartiles([p["p50_ms"] for p in phases]),
                            "p99_ms": quartiles([p["p99_ms"] for p in phases]),
                            "requests": sum(p["requests"] for p in phases),
                            "errors": sum(p["errors"] for p in phases)}
    return summary


def publish_updates(gallery: Path, index: Path, extra: list[Path], args: argparse.Namespace) -> list:
    """Add ``args.update_images`` files per update to the gallery and rebuild; each version's publication."""
    published = []
    for number in range(args.updates):
        time.sleep(args.update_gap)
        target = gallery / IMAGES_DIR / f"update-{number:02d}"
        target.mkdir(parents=True)
        for source in extra[number * args.update_images:(number + 1) * args.update_images]:
            shutil.copyfile(source, target / source.name)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bayesretrieval.cli", "build-index", str(gallery), str(index),
                        "--workers", "0"], check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        manifest = index / MANIFEST_FILE
        published.append({"version": json.loads(manifest.read_text())["version"],
                          "published_at": manifest.stat().st_mtime, "build_s": time.perf_counter() - start})
    return published


def visibility(load: Load, published: list) -> list:
    """Per published version: when requests first saw it and when the last stale one started (s after publication)."""
    starts, versions = np.asarray(load.starts, dtype=float), np.asarray(load.versions, dtype=str)
    rows = []
    for entry in published:
        at = entry["published_at"]
        seen = starts[versions >= entry["version"]]
        stale = starts[versions < entry["version"]]
        rows.append({"version": entry["version"], "build_s": entry["build_s"],
                     "first_seen_s": float(seen.min() - at) if seen.size else None,
                     "last_stale_s": float(stale.max() - at) if stale.size else None})
    return rows


def update_phase(server, gallery: Path, index: Path, extra: list[Path], queries: list[str],
                 args: argparse.Namespace) -> dict:
    """Load ``server`` while ``args.updates`` builds publish; errors, latency and per-version visibility."""
    published, done = [], threading.Event()

    def writer() -> None:
        try:
            published.extend(publish_updates(gallery, index, extra, args))
            time.sleep(2.0)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    load = run_clients(server.base, queries, args, done.is_set)
    thread.join()
    rows = visibility(load, published)
    stale = [row["last_stale_s"] for row in rows if row["last_stale_s"] is not None]
    return {**load.figures(), "seconds": load.seconds, "versions": rows,
            "all_seen": all(row["first_seen_s"] is not None for row in rows) and len(rows) == args.updates,
            "max_last_stale_s": max(stale) if stale else None}


def prepare(args: argparse.Namespace) -> tuple:
    """The encoder, the gallery folder and its index (built once), the spare images for updates, the queries."""
    work = args.work / args.size
    encoder = ClipEncoder.from_pretrained(model_name(args.size), get_trained_model(args.size, args.seed))
    posterior = retrieval_calibration.fit_posterior_on_world(encoder, work, args)
    spare_root = work / "spare"
    if not (spare_root / "world.json").is_file():
        write_world(make_world(args.updates * args.update_images, seed=args.seed + 7), spare_root, overwrite=True)
    gallery, index = work / "gallery", work / "index"
    shutil.rmtree(gallery, ignore_errors=True)
    shutil.rmtree(index, ignore_errors=True)
    write_world(make_world(args.n_gallery, seed=args.seed + 2), gallery, overwrite=True)
    build_index(gallery, index, encoder, posterior, BuildConfig(workers=0))
    queries = list(make_world(args.queries, seed=args.seed + 3).captions)
    return encoder, gallery, index, sorted((spare_root / IMAGES_DIR).rglob("*.png")), queries


def main(argv: list[str] | None = None) -> dict:
    """Prepare, load in rounds, load during updates; save the record and print the tables."""
    args = parse_args(argv)
    started = time.perf_counter()
    encoder, gallery, index, extra, queries = prepare(args)
    servers = {w: Server(index, w) for w in args.workers}
    try:
        with Searcher.open(index, encoder, torch_threads=1) as searcher:
            rounds = throughput_rounds(searcher, servers, queries, args)
        updates = update_phase(servers[args.workers[0]], gallery, index, extra, queries, args)
    finally:
        for server in servers.values():
            server.close()
    figures = {"model": model_name(args.size), "items": args.n_gallery, "queries": args.queries,
               "clients": args.clients, "k": args.k, "score": args.score, "cpus": os.cpu_count(),
               "rounds": rounds, "summary": summarise(rounds),
               "updates": {"workers": args.workers[0], **updates}, "seconds": time.perf_counter() - started}
    path = record.save("serve_load", __file__, args, figures, argv, args.output)
    print("\n\n".join(formatters.serve_load({"figures": figures})))
    print(f"wrote {path}")
    return figures


if __name__ == "__main__":
    main()
