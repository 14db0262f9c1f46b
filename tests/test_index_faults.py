"""Readers search while a writer publishes updates and is SIGKILLed: no search fails or mixes versions.

Three reader processes (one opening a searcher per round, one keeping a single searcher
for the whole run, one with ``auto_refresh``) search continuously while a writer process
applies updates to the image folder (adds, deletes, modified files), rebuilds after each,
and is killed at random points; a killed writer is started again and resumes. Every
search must succeed and equal, result for result, what a fresh searcher returns on the
version that answered it, and the final index must equal a clean build.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import random_posterior, save_tiny_checkpoint
from index_faults import base_images, record_expected

from bayesretrieval.encoders import ClipEncoder
from bayesretrieval.indexing import BuildConfig, build_index
from bayesretrieval.options import TINY_MODEL
from bayesretrieval.store import IndexReader
from bayesretrieval.store.leases import collect_garbage

SCRIPT = Path(__file__).with_name("index_faults.py")
READERS = ("reopen", "long", "auto")
KILL_DELAY_S = (0.0, 1.2)


def start(*argv) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SCRIPT.parent)}
    process = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, argv)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    if line.strip() != "ready":
        raise AssertionError(f"{argv[0]} did not start: {line}{process.stderr.read()}")
    return process


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def run_writer(root: Path, updates: int, kills: int, rng: random.Random) -> int:
    """Run the writer until every update is done, SIGKILLing it ``kills`` times; returns the kills made."""
    made = 0
    while not (root / "progress").is_file() or int((root / "progress").read_text()) < updates:
        writer = start("writer", root, updates)
        if made < kills:
            time.sleep(rng.uniform(*KILL_DELAY_S))
            if writer.poll() is None:
                writer.send_signal(signal.SIGKILL)
                made += 1
        _, err = writer.communicate(timeout=300)
        assert writer.returncode in (0, -signal.SIGKILL), err
    return made


def by_path(reader: IndexReader) -> dict:
    rows = reader.fetch(reader.item_ids)
    return {p: (rows.means[i], np.asarray(reader.scalars[i])) for i, p in enumerate(reader.paths(reader.item_ids))}


def fault_run(root: Path, updates: int, kills: int, seed: int) -> dict:
    base_images(root / "images")
    encoder = ClipEncoder.from_pretrained(TINY_MODEL, save_tiny_checkpoint(root / "tiny.pt"))
    posterior = random_posterior(64, 64, model=encoder.identity)
    posterior.save(root / "posterior")
    config = BuildConfig(batch_size=4, workers=0)
    build_index(root / "images", root / "index", encoder, posterior, config)
    record_expected(root, encoder)
    readers = {kind: start("reader", kind, root) for kind in READERS}
    kills_made = run_writer(root, updates, kills, random.Random(seed))
    time.sleep(0.5)  # the readers see the last version too
    (root / "stop").touch()
    for kind, process in readers.items():
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, f"reader {kind}: {err}"

    expected = {}
    for record in read_lines(root / "expected.jsonl"):
        key = (record["version"], record["label"])
        assert expected.setdefault(key, record) == record, f"two answers for {key}"
    searches = {kind: read_lines(root / f"searches-{kind}.jsonl") for kind in READERS}
    failures = [r["error"] for records in searches.values() for r in records if "error" in r]
    mismatches = [r for records in searches.values() for r in records
                  if "error" not in r and expected.get((r["version"], r["label"])) != r]
    seen = {kind: sorted({r["version"] for r in records if "error" not in r}) for kind, records in searches.items()}

    clean = root / "clean"
    build_index(root / "images", clean, encoder, posterior, config)
    final, rebuilt = by_path(IndexReader.open(root / "index")), by_path(IndexReader.open(clean))
    assert sorted(final) == sorted(rebuilt)
    for path, (mean, scalars) in rebuilt.items():
        np.testing.assert_allclose(final[path][0], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(final[path][1], scalars, rtol=1e-5, atol=1e-9)
    current = IndexReader.open(root / "index")
    current.verify()
    current.close()
    collect_garbage(root / "index", current.manifest.version)
    left = sorted(p.name for p in (root / "index" / "versions").iterdir())
    return {"updates": updates, "kills": kills_made, "searches": sum(map(len, searches.values())),
            "failures": failures, "mismatches": mismatches, "versions_published": len({v for v, _ in expected}),
            "versions_seen": seen, "versions_left": left, "current": current.manifest.version,
            "leases_left": sorted(p.name for p in (root / "index" / "readers").glob("*.lease"))}


def check(figures: dict) -> None:
    print(json.dumps({k: v for k, v in figures.items() if k != "mismatches"}, indent=None))
    assert figures["failures"] == [] and figures["mismatches"] == []
    assert figures["kills"] > 0 and figures["searches"] > 0
    assert len(figures["versions_seen"]["long"]) == 1  # a long-lived searcher keeps its snapshot
    assert len(figures["versions_seen"]["auto"]) > 1 and len(figures["versions_seen"]["reopen"]) > 1
    assert figures["versions_left"] == [figures["current"]] and figures["leases_left"] == []


def test_readers_survive_a_killed_writer(tmp_path):
    check(fault_run(tmp_path, updates=20, kills=5, seed=0))


@pytest.mark.slow
def test_soak_readers_survive_a_killed_writer(tmp_path):
    check(fault_run(tmp_path, updates=90, kills=30, seed=1))
