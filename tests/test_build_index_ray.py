"""build-index --engine ray on a local Ray instance equals the local engine, survives dead workers and drivers."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import PROJECT_ROOT, make_bad_corpus, random_posterior, save_tiny_checkpoint, write_images
from PIL import Image

from bayesretrieval.cli import main
from bayesretrieval.encoders import ClipEncoder
from bayesretrieval.indexing import BuildConfig, build_index, build_index_from_embeddings
from bayesretrieval.indexing.ray_engine import INSTALL_HINT, RayUnavailableError
from bayesretrieval.options import TINY_MODEL
from bayesretrieval.posterior.lastblock_fit import LastBlockFitter
from bayesretrieval.posterior.lastblock_posterior import item_covariance
from bayesretrieval.store import IndexReader

IMAGES = 240
RAY_OBJECT_STORE = 100 * 2**20
"""Bytes of Ray's object store in these tests (/dev/shm may be small)."""


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray instance on 2 CPUs for this module: its GCS address."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    context = ray.init(num_cpus=2, include_dashboard=False, object_store_memory=RAY_OBJECT_STORE,
                       ignore_reinit_error=True, log_to_driver=False)
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """``(root, encoder, posterior)``: IMAGES noise images plus awkward files, a checkpoint and a saved posterior."""
    root = tmp_path_factory.mktemp("ray")
    write_images(root / "img", [f"g{i % 5}/im {i:03d}.png" for i in range(IMAGES)])
    make_bad_corpus(root / "img" / "odd")
    encoder = ClipEncoder.from_pretrained(TINY_MODEL, save_tiny_checkpoint(root / "tiny.pt"))
    posterior = random_posterior(64, 64, model=encoder.identity)
    posterior.save(root / "posterior")
    return root, encoder, posterior


def local_build(root: Path, image_dir: Path, encoder, posterior) -> Path:
    """A local-engine build of ``image_dir`` (the reference a Ray build must equal)."""
    index_dir = root / f"local-{image_dir.name}-{time.monotonic_ns()}"
    build_index(image_dir, index_dir, encoder, posterior, BuildConfig(batch_size=8, workers=0))
    return index_dir


def ray_config(**kwargs) -> BuildConfig:
    return BuildConfig(**{"batch_size": 4, "shard_batches": 2, "engine": "ray", **kwargs})


def assert_same_index(got_dir: Path, want_dir: Path) -> None:
    """Same items, ids, paths and skips; means and scalars within float tolerance; same FAISS ranking."""
    got, want = IndexReader.open(got_dir), IndexReader.open(want_dir)
    np.testing.assert_array_equal(got.item_ids, want.item_ids)
    assert got.paths(got.item_ids) == want.paths(want.item_ids)
    np.testing.assert_allclose(got.means, want.means, rtol=1e-5, atol=1e-6)  # other batches, other processes
    np.testing.assert_allclose(got.scalars, want.scalars, rtol=1e-5, atol=1e-9)
    meta = ["item_id", "path", "file_size", "mtime_ns", "width", "height"]
    assert got.read_items(columns=meta).to_pylist() == want.read_items(columns=meta).to_pylist()
    assert got.read_skipped().to_pylist() == want.read_skipped().to_pylist()
    query = np.random.default_rng(0).normal(size=(3, 64)).astype(np.float32)
    np.testing.assert_array_equal(got.faiss_index.search(query, 10)[1], want.faiss_index.search(query, 10)[1])
    got.verify()
    assert not (got_dir / "work").exists()


def test_ray_build_equals_the_local_build_then_updates_like_it(ray_address, setup, tmp_path):
    root, encoder, posterior = setup
    images = tmp_path / "img"
    shutil.copytree(root / "img", images)
    progress = []
    report = build_index(images, tmp_path / "ray", encoder, posterior, ray_config(), on_progress=progress.append)
    build_index(images, tmp_path / "local", encoder, posterior, BuildConfig(batch_size=8, workers=0))
    assert_same_index(tmp_path / "ray", tmp_path / "local")
    assert report.encoded == IMAGES + 15 and set(report.skipped) == {"empty_file", "not_an_image", "too_large",
                                                                     "truncated"}
    assert [p.done for p in progress] == sorted(p.done for p in progress) and progress[-1].done == progress[-1].total
    assert progress[-1].skipped == sum(report.skipped.values()) and len(progress) > 5
    write_images(images, [f"new {i}.png" for i in range(6)], seed=9)
    (images / "g0" / "im 000.png").unlink()
    write_images(images, ["g1/im 001.png"], seed=10)
    report = build_index(images, tmp_path / "ray", encoder, posterior, ray_config())
    want = build_index(images, tmp_path / "local", encoder, posterior, BuildConfig(batch_size=8, workers=0))
    assert_same_index(tmp_path / "ray", tmp_path / "local")
    counts = lambda r: (r.encoded, r.removed, r.reused, r.skipped)  # noqa: E731
    assert counts(report) == counts(want) and report.removed == 1 and report.encoded >= 7


def test_a_last_block_build_on_ray_equals_the_local_one(ray_address, setup, tmp_path):
    root, encoder, posterior = setup
    pixels = torch.rand(32, 3, 64, 64)
    captions = [f"a photo number {i}" for i in range(32)]
    lastblock = LastBlockFitter(chunk_size=16).fit_batches(encoder, [(pixels, captions)]).posterior_
    images = tmp_path / "img"
    write_images(images, [f"im {i:02d}.png" for i in range(24)])
    build_index(images, tmp_path / "ray", encoder, posterior, ray_config(variance="diag"), lastblock=lastblock)
    build_index(images, tmp_path / "local", encoder, posterior, BuildConfig(batch_size=8, workers=0,
                                                                            variance="diag"), lastblock=lastblock)
    assert_same_index(tmp_path / "ray", tmp_path / "local")
    got, want = IndexReader.open(tmp_path / "ray"), IndexReader.open(tmp_path / "local")
    np.testing.assert_allclose(got.variance_diag, want.variance_diag, rtol=1e-4, atol=1e-9)
    assert got.manifest.lastblock == want.manifest.lastblock and got.manifest.lastblock["scope"] == "mlp"
    files = torch.stack([encoder.preprocess(Image.open(images / p).convert("RGB")) for p in got.paths(got.item_ids)])
    _, _, factors = item_covariance(encoder, lastblock, files, "diag")
    np.testing.assert_allclose(got.variance_diag, factors.variance_diag, rtol=1e-4, atol=1e-9)


def test_a_killed_encoder_worker_is_retried_and_the_index_is_complete(ray_address, setup, tmp_path):
    root, encoder, posterior = setup
    shards, killed = tmp_path / "idx" / "work" / "shards", []

    def kill_encoder_once_shards_appear():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            if len(list(shards.glob("shard-*.parquet"))) >= 2:
                for process in encoder_processes():
                    killed.append((process.pid, len(list(shards.glob("shard-*.parquet")))))
                    process.kill()
            time.sleep(0.01)

    watcher = threading.Thread(target=kill_encoder_once_shards_appear)
    watcher.start()
    report = build_index(root / "img", tmp_path / "idx", encoder, posterior, ray_config(batch_size=2, shard_batches=1))
    watcher.join()
    assert killed, "no encoder actor was found to kill"
    assert killed[0][1] < (IMAGES + 15) // 2, "the build finished before the kill"
    assert not psutil.pid_exists(killed[0][0]) or psutil.Process(killed[0][0]).status() == psutil.STATUS_ZOMBIE
    assert report.encoded == IMAGES + 15 and report.resumed == 0
    assert_same_index(tmp_path / "idx", local_build(tmp_path, root / "img", encoder, posterior))


def encoder_processes() -> list:
    """The live Ray worker processes holding a :class:`ShardEncoder` actor."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        if command.startswith("ray::") and "ShardEncoder" in command:
            found.append(process)
    return found


def test_a_killed_driver_leaves_the_version_and_a_rerun_reuses_its_shards(ray_address, setup, tmp_path):
    root, encoder, posterior = setup
    images = tmp_path / "img"
    write_images(images, [f"first {i:02d}.png" for i in range(30)], seed=3)
    build_index(images, tmp_path / "idx", encoder, posterior, BuildConfig(batch_size=8, workers=0))
    before = (tmp_path / "idx" / "manifest.json").read_bytes()
    write_images(images, [f"second {i:03d}.png" for i in range(200)], seed=4)
    argv = [sys.executable, "-m", "bayesretrieval.cli", "build-index", str(images), str(tmp_path / "idx"),
            "--engine", "ray", "--ray-address", ray_address, "--batch-size", "2", "--no-progress"]
    driver = subprocess.Popen(argv, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    shards = tmp_path / "idx" / "work" / "shards"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and driver.poll() is None and len(list(shards.glob("shard-*.parquet"))) < 3:
        time.sleep(0.01)
    driver.send_signal(signal.SIGKILL)
    _, stderr = driver.communicate(timeout=60)
    assert driver.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    assert (tmp_path / "idx" / "manifest.json").read_bytes() == before
    current = IndexReader.open(tmp_path / "idx")
    assert len(current) == 30 and current.verify()
    written = len(list(shards.glob("shard-*.parquet")))
    assert written >= 3
    report = build_index(images, tmp_path / "idx", encoder, posterior, ray_config(batch_size=2, shard_batches=8))
    assert report.resumed >= 3 * 16 and report.resumed + report.encoded == 200 and report.reused == 30
    assert_same_index(tmp_path / "idx", local_build(tmp_path, images, encoder, posterior))


def test_precomputed_embeddings_through_ray_equal_the_local_build(ray_address, setup, tmp_path):
    _, encoder, posterior = setup
    rng = np.random.default_rng(5)
    n = 300
    embeddings = rng.normal(size=(n, 64))
    embeddings[7, 3] = np.nan  # bad_embedding
    activations = rng.normal(size=(n, 64)).tolist()
    activations[11] = activations[11][:10]  # bad_embedding: wrong width
    paths = [f"remote/{i:04d}.jpg" for i in range(n)]
    paths[250], paths[40] = paths[20], paths[7]  # duplicates across row groups; the NaN row's path stays free
    table = pa.table({"image_path": paths, "embedding": embeddings.tolist(), "activation": activations,
                      "variance_diag": rng.random((n, 64)).tolist()})
    pq.write_table(table, tmp_path / "emb.parquet", row_group_size=64)
    ray_report = build_index_from_embeddings(tmp_path / "emb.parquet", tmp_path / "ray", posterior, encoder.identity,
                                             ray_config(store_activations=True))
    local_report = build_index_from_embeddings(tmp_path / "emb.parquet", tmp_path / "local", posterior,
                                               encoder.identity, BuildConfig(store_activations=True))
    assert ray_report.skipped == local_report.skipped == {"bad_embedding": 2, "duplicate_id": 1}
    got, want = IndexReader.open(tmp_path / "ray"), IndexReader.open(tmp_path / "local")
    np.testing.assert_array_equal(got.item_ids, want.item_ids)
    assert got.paths(got.item_ids) == want.paths(want.item_ids) and "remote/0007.jpg" in got.paths(got.item_ids)
    for name in ("means", "scalars", "variance_diag", "activations"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    assert got.read_skipped().to_pylist() == want.read_skipped().to_pylist()


def test_without_ray_the_engine_says_how_to_install_it(setup, tmp_path, monkeypatch, capsys):
    root, encoder, posterior = setup
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RayUnavailableError, match=INSTALL_HINT.replace("[", r"\[").replace("]", r"\]")):
        build_index(root / "img", tmp_path / "idx", encoder, posterior, ray_config())
    assert not (tmp_path / "idx").exists()
    code = main(["build-index", str(root / "img"), str(tmp_path / "idx"), "--engine", "ray", "--model", TINY_MODEL,
                 "--pretrained", str(root / "tiny.pt"), "--posterior", str(root / "posterior")])
    assert code == 2 and INSTALL_HINT in capsys.readouterr().err
