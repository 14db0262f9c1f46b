"""The index directory format: write a version, read it back, publish atomically."""

import json
import subprocess
import sys

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import random_posterior

from bayesretrieval.store import (
    SCALAR_COLUMNS,
    IndexDamagedError,
    IndexReader,
    ItemArrays,
    VarianceSpec,
    VersionInfo,
    default_faiss_factory,
    write_version,
)
from bayesretrieval.store import format as fmt
from bayesretrieval.store.format import SKIPPED_SCHEMA


def random_items(n: int, d: int, seed: int = 0, variance: VarianceSpec = VarianceSpec()) -> ItemArrays:
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.arange(10, 10 + 3 * n, 3))[:n].astype(np.int64)
    return ItemArrays(
        item_ids=ids,
        paths=[f"dir é/img {i}.jpg" for i in ids],
        file_size=rng.integers(1, 1000, n),
        mtime_ns=rng.integers(1, 10**18, n),
        width=np.full(n, 64, np.int32),
        height=np.full(n, -1, np.int32),
        means=rng.normal(size=(n, d)).astype(np.float32),
        scalars=np.abs(rng.normal(size=(n, 6))),
        variance_diag=rng.random((n, d)).astype(np.float32) if variance.has_diag else None,
        variance_lowrank=rng.normal(size=(n, variance.rank, d)).astype(np.float32) if variance.has_lowrank else None,
    )


def info(variance=VarianceSpec(), next_id=10_000, factory=None) -> VersionInfo:
    return VersionInfo("images", "/data/images", {"model_name": "bayes-tiny", "pretrained": None,
                                                   "checkpoint_sha256": None}, variance, factory, next_id)


def empty_skipped() -> pa.Table:
    return SKIPPED_SCHEMA.empty_table()


def test_round_trip_with_lowrank(tmp_path):
    d = 8
    posterior = random_posterior(d, 6)
    spec = VarianceSpec.parse("lowrank:2")
    items = random_items(50, d, variance=spec)
    skipped = pa.table({"path": ["bad.jpg"], "reason": ["empty_file"], "detail": [""],
                        "file_size": [0], "mtime_ns": [5]})
    manifest = write_version(tmp_path, items, skipped, posterior, info(spec))
    reader = IndexReader.open(tmp_path)
    reader.verify()
    assert manifest.version == "v000001" and reader.manifest == manifest
    assert np.all(np.diff(reader.item_ids) > 0)
    want = items.item_ids[[3, 0, 3, 17]]
    got = reader.fetch(want)
    rows = [int(np.flatnonzero(items.item_ids == i)[0]) for i in want]
    np.testing.assert_array_equal(got.item_ids, want)
    np.testing.assert_array_equal(got.means, items.means[rows])  # exactly the encoder's output
    for i, name in enumerate(SCALAR_COLUMNS):
        np.testing.assert_array_equal(getattr(got.scalars, name), items.scalars[rows, i])
    np.testing.assert_array_equal(reader.fetch_scalars(want).quad_text, items.scalars[rows, 3])
    np.testing.assert_array_equal(got.variance_lowrank, items.variance_lowrank[rows])
    np.testing.assert_array_equal(got.variance_diag, items.variance_diag[rows])
    assert reader.paths(want) == [items.paths[r] for r in rows]
    embedding = np.stack(reader.read_items(columns=["embedding"]).column(0).to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(embedding, items.means[np.argsort(items.item_ids)])
    with pytest.raises(ValueError, match=r"not in index v000001: \[-1\]"):
        reader.fetch([want[0], -1])
    assert reader.read_skipped().to_pylist()[0]["reason"] == "empty_file"
    assert reader.posterior.fingerprint == posterior.fingerprint


def test_parquet_and_faiss_open_with_standard_tools(tmp_path):
    d = 8
    posterior = random_posterior(d, 6)
    items = random_items(30, d)
    write_version(tmp_path, items, empty_skipped(), posterior, info())
    reader = IndexReader.open(tmp_path)
    frame = pd.read_parquet(reader.version_dir / "items.parquet")
    assert list(frame.columns[:7]) == ["item_id", "path", "file_size", "mtime_ns", "width", "height", "embedding"]
    assert set(SCALAR_COLUMNS) <= set(frame.columns)
    assert frame["height"].isna().all() and frame["item_id"].is_monotonic_increasing
    meta = pq.read_schema(reader.version_dir / "items.parquet").metadata[fmt.PARQUET_METADATA_KEY]
    assert json.loads(meta)["embed_dim"] == d
    index = faiss.read_index(str(reader.version_dir / "index.faiss"))
    assert index.ntotal == 30 and index.metric_type == faiss.METRIC_INNER_PRODUCT
    # FAISS top-k is the ranking by mu . y / E-norm: compare with brute force.
    query = np.random.default_rng(1).normal(size=(1, d)).astype(np.float32)
    _, ids = index.search(query, 5)
    trace = float(posterior.image.output_cov.trace())
    enorm = np.sqrt(items.scalars[:, 1] + items.scalars[:, 0] * trace)
    brute = items.item_ids[np.argsort(-(items.means @ query[0]) / enorm)[:5]]
    np.testing.assert_array_equal(ids[0], brute)
    np.testing.assert_allclose(reader.expected_norm(), enorm[np.argsort(items.item_ids)])


def test_a_live_reader_pins_its_version_until_closed(tmp_path):
    d = 8
    posterior = random_posterior(d, 6)
    write_version(tmp_path, random_items(5, d, seed=1), empty_skipped(), posterior, info())
    old = IndexReader.open(tmp_path)
    old_means = np.array(old.means)
    for count, seed in ((7, 2), (9, 3), (4, 4)):
        write_version(tmp_path, random_items(count, d, seed=seed), empty_skipped(), posterior, info())
    versions = lambda: sorted(p.name for p in (tmp_path / "versions").iterdir())  # noqa: E731
    assert versions() == ["v000001", "v000004"]  # v2 and v3 were never opened: collected
    np.testing.assert_array_equal(old.fetch(old.item_ids[:2]).means, old_means[:2])
    assert old.read_items(columns=["item_id"]).num_rows == 5 and old.faiss_index.ntotal == 5
    with IndexReader.open(tmp_path) as current:
        assert len(current) == 4
        old.close()
        write_version(tmp_path, random_items(6, d, seed=5), empty_skipped(), posterior, info())
        assert versions() == ["v000004", "v000005"]
    write_version(tmp_path, random_items(3, d, seed=6), empty_skipped(), posterior, info())
    assert versions() == ["v000006"] and not list((tmp_path / "readers").glob("*.lease"))


def test_a_dead_readers_lease_is_stale(tmp_path):
    d = 8
    posterior = random_posterior(d, 6)
    write_version(tmp_path, random_items(5, d, seed=1), empty_skipped(), posterior, info())
    script = ("import sys, os; from bayesretrieval.store import IndexReader; "
              "r = IndexReader.open(sys.argv[1]); os._exit(0)")
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True)
    assert len(list((tmp_path / "readers").glob("*.lease"))) == 1  # left behind by a process that never closed it
    write_version(tmp_path, random_items(6, d, seed=2), empty_skipped(), posterior, info())
    assert sorted(p.name for p in (tmp_path / "versions").iterdir()) == ["v000002"]
    assert not list((tmp_path / "readers").glob("*.lease"))


def test_empty_index_and_errors(tmp_path):
    d = 8
    posterior = random_posterior(d, 6)
    write_version(tmp_path, random_items(0, d), empty_skipped(), posterior, info())
    reader = IndexReader.open(tmp_path)
    assert len(reader) == 0 and reader.faiss_index.ntotal == 0
    assert reader.extremes("kfac").noise_ratio_max == 0.0
    with pytest.raises(ValueError, match=r"means have shape \(4, 5\), expected \(4, 8\)"):
        items = random_items(4, 5)
        write_version(tmp_path, items, empty_skipped(), posterior, info())
    with pytest.raises(ValueError, match="variance diag: variance_diag is missing"):
        write_version(tmp_path, random_items(4, d), empty_skipped(), posterior, info(VarianceSpec.parse("diag")))
    data = json.loads((tmp_path / "manifest.json").read_text())
    for old in (1, 99):
        (tmp_path / "manifest.json").write_text(json.dumps({**data, "format_version": old}))
        with pytest.raises(ValueError, match=f"index format version {old}, this library reads version 2 "
                                             r"\(and 3 with a last-block posterior\); rebuild the index "
                                             "with .*--rebuild"):
            IndexReader.open(tmp_path)


@pytest.mark.parametrize("text", ["diag", "kfac", "lowrank:3"])
def test_variance_spec_round_trip(text):
    assert str(VarianceSpec.parse(text)) == text


@pytest.mark.parametrize("text", ["lowrank", "lowrank:0", "diag:2", "full", "none"])
def test_variance_spec_rejects(text):
    with pytest.raises(ValueError, match=repr(text)):
        VarianceSpec.parse(text)


def test_default_factory_by_size():
    assert default_faiss_factory(1000) == "Flat"
    assert default_faiss_factory(10**6).startswith("IVF") and default_faiss_factory(10**6).endswith(",Flat")
    assert default_faiss_factory(10**7).endswith(",SQ8")


def test_faiss_factory_errors_name_the_string(tmp_path):
    from bayesretrieval.store import build_faiss_index

    vectors = np.random.default_rng(0).random((20, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="FAISS factory string 'Bogus' is not valid for dim 8"):
        build_faiss_index(vectors, np.arange(20), "Bogus")
    with pytest.raises(ValueError, match="FAISS factory 'IVF64,Flat' cannot be trained on 20 vectors"):
        build_faiss_index(vectors, np.arange(20), "IVF64,Flat")
    index = build_faiss_index(vectors, np.arange(100, 120), "IVF2,Flat")
    assert index.ntotal == 20  # ids kept through IDMap2:
    assert set(faiss.vector_to_array(faiss.downcast_index(index).id_map)) == set(range(100, 120))


def test_published_files_are_readable_by_others(tmp_path):
    import os
    import stat

    mask = os.umask(0o022)
    try:
        write_version(tmp_path, random_items(3, 8), empty_skipped(), random_posterior(8, 6), info())
    finally:
        os.umask(mask)
    version = tmp_path / "versions" / "v000001"
    for path in [tmp_path / "manifest.json", version, *version.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


def test_open_retries_when_the_named_version_was_collected(tmp_path, monkeypatch):
    from bayesretrieval.store import reader as reader_module

    posterior = random_posterior(8, 6)
    write_version(tmp_path, random_items(2, 8, seed=1), empty_skipped(), posterior, info())
    real = reader_module.current_version
    calls = []

    def stale_then_real(index_dir):
        calls.append(index_dir)
        return "v000000" if len(calls) == 1 else real(index_dir)

    monkeypatch.setattr(reader_module, "current_version", stale_then_real)
    assert IndexReader.open(tmp_path).manifest.version == "v000001" and len(calls) == 2
    monkeypatch.setattr(reader_module, "current_version", lambda index_dir: "v000000")
    with pytest.raises(IndexDamagedError, match="names version v000000, but .* does not exist"):
        IndexReader.open(tmp_path)
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="missing manifest.json"):
        IndexReader.open(tmp_path / "elsewhere")


def test_fetch_reads_only_the_columns_a_form_uses(tmp_path):
    spec = VarianceSpec.parse("lowrank:2")
    items = random_items(20, 8, variance=spec)
    write_version(tmp_path, items, empty_skipped(), random_posterior(8, 6), info(spec))
    reader = IndexReader.open(tmp_path)
    ids = items.item_ids[:4]
    assert reader.fetch(ids).variance_lowrank is not None
    diag = reader.fetch(ids, "diag")
    assert diag.variance_diag is not None and diag.variance_lowrank is None
    kfac = reader.fetch(ids, "kfac")
    assert kfac.variance_diag is None and kfac.variance_lowrank is None
    np.testing.assert_array_equal(kfac.means, reader.fetch(ids).means)
