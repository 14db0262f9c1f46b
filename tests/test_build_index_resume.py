"""A build killed with SIGKILL at any point, then re-run, equals a clean build."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import random_posterior, save_tiny_checkpoint, write_images

from bayesretrieval.encoders import ClipEncoder
from bayesretrieval.indexing import BuildConfig, build_index
from bayesretrieval.options import TINY_MODEL
from bayesretrieval.store import IndexReader

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BATCH, IMAGES = 4, 40

# Runs one build in a child process and, depending on CRASH, SIGKILLs itself at a chosen
# point: after N batches, half-way through writing the N-th shard, while writing the new
# version folder, or after the version folder is in place but before manifest.json moves.
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from bayesretrieval.encoders import ClipEncoder
    from bayesretrieval.indexing import BuildConfig, build_index
    from bayesretrieval.indexing import work
    from bayesretrieval.posterior import PosteriorPair
    from bayesretrieval.store import writer

    image_dir, index_dir, checkpoint, posterior_dir, crash, shard_batches = sys.argv[1:7]
    die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    kind, _, count = crash.partition(":")
    calls = [0]

    def counted(real):
        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] == int(count or 1):
                if kind == "mid-shard-write":
                    args[1].write(b"PAR1" + bytes(200)); args[1].flush()
                die()
            return real(*args, **kwargs)
        return wrapper

    progress = None
    if kind == "after-batch":
        progress = counted(lambda p: None)
    elif kind == "mid-shard-write":
        real_write = work.pq.write_table
        shard_write = counted(real_write)
        work.pq.write_table = lambda table, where, **k: (
            shard_write(table, where, **k) if hasattr(where, "write") else real_write(table, where, **k))
    elif kind == "mid-version-write":
        writer.faiss.write_index = counted(writer.faiss.write_index)
    elif kind == "before-manifest-swap":
        writer.write_text_atomic = counted(writer.write_text_atomic)
    elif kind == "before-cleanup":
        work.WorkFolder.clear = counted(work.WorkFolder.clear)
    encoder = ClipEncoder.from_pretrained("bayes-tiny", checkpoint)
    config = BuildConfig(batch_size=4, workers=0, shard_batches=int(shard_batches))
    build_index(image_dir, index_dir, encoder, PosteriorPair.load(posterior_dir), config, on_progress=progress)
    """
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    write_images(root / "img", [f"g{i % 4}/im {i:03d}.png" for i in range(IMAGES)])
    (root / "img" / "bad.jpg").write_bytes(b"")
    checkpoint = save_tiny_checkpoint(root / "tiny.pt")
    encoder = ClipEncoder.from_pretrained(TINY_MODEL, checkpoint)
    posterior = random_posterior(64, 64, model=encoder.identity)
    posterior.save(root / "posterior")
    build_index(root / "img", root / "clean", encoder, posterior, BuildConfig(batch_size=BATCH, workers=0))
    return root, encoder, posterior


def child(root: Path, index_dir: Path, crash: str, shard_batches: int = 1) -> subprocess.Popen:
    script = root / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    argv = [sys.executable, str(script), str(root / "img"), str(index_dir), str(root / "tiny.pt"),
            str(root / "posterior"), crash, str(shard_batches)]
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def assert_same_index(got_dir: Path, want_dir: Path) -> None:
    got, want = IndexReader.open(got_dir), IndexReader.open(want_dir)
    np.testing.assert_array_equal(got.item_ids, want.item_ids)
    assert got.paths(got.item_ids) == want.paths(want.item_ids)
    np.testing.assert_array_equal(got.means, want.means)
    # float64 products may differ in the last bit between processes (BLAS blocking).
    np.testing.assert_allclose(got.scalars, want.scalars, rtol=1e-12)
    assert got.read_skipped().to_pylist() == want.read_skipped().to_pylist()
    got_faiss, want_faiss = got.faiss_index, want.faiss_index
    query = np.random.default_rng(0).normal(size=(3, 64)).astype(np.float32)
    np.testing.assert_array_equal(got_faiss.search(query, 10)[1], want_faiss.search(query, 10)[1])
    got.verify()
    assert not (got_dir / "work").exists()
    assert [p.name for p in (got_dir / "versions").iterdir()] == [got.manifest.version]


@pytest.mark.parametrize(
    "crash, resumed",
    [("after-batch:3", 3 * BATCH), ("mid-shard-write:4", 3 * BATCH), ("mid-version-write", IMAGES + 1),
     ("before-manifest-swap", IMAGES + 1), ("before-cleanup", None)],
)
def test_sigkill_then_rerun_equals_clean_build(setup, tmp_path, crash, resumed):
    root, encoder, posterior = setup
    process = child(root, tmp_path / "idx", crash)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    assert (tmp_path / "idx" / "manifest.json").exists() == (crash == "before-cleanup")
    report = build_index(root / "img", tmp_path / "idx", encoder, posterior, BuildConfig(batch_size=BATCH, workers=0))
    if resumed is None:
        assert not report.published
    else:
        assert report.resumed == resumed and report.encoded == IMAGES + 1 - resumed
    assert_same_index(tmp_path / "idx", root / "clean")


def test_external_sigkill_while_encoding(setup, tmp_path):
    root, encoder, posterior = setup
    process = child(root, tmp_path / "idx", "none")
    shards = tmp_path / "idx" / "work" / "shards"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if len(list(shards.glob("shard-*.parquet"))) >= 2:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    process.wait(timeout=60)
    if process.returncode != -signal.SIGKILL:
        pytest.skip("the child finished before it could be killed")
    report = build_index(root / "img", tmp_path / "idx", encoder, posterior, BuildConfig(batch_size=BATCH, workers=0))
    assert report.resumed >= 2 * BATCH
    assert_same_index(tmp_path / "idx", root / "clean")
