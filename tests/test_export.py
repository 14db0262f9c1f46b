"""``bayesretrieval export`` replaces its folder whole: no stale shards, no mixes, no foreign folders."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import random_posterior

from bayesretrieval.encoders import ModelIdentity
from bayesretrieval.indexing import export as export_module
from bayesretrieval.indexing.embeddings_input import build_index_from_embeddings
from bayesretrieval.indexing.export import EXPORT_MARKER, export_index
from bayesretrieval.store import IndexReader

D, N = 8, 5
MODEL = ModelIdentity("ViT-B-32", "laion2b_s34b_b79k")


@pytest.fixture
def index_dir(tmp_path):
    rng = np.random.default_rng(0)
    data = {"path": [f"photos/p{i}.jpg" for i in range(N)],
            "embedding": [rng.normal(size=D).astype(np.float32).tolist() for _ in range(N)]}
    pq.write_table(pa.table(data), tmp_path / "emb.parquet")
    build_index_from_embeddings(tmp_path / "emb.parquet", tmp_path / "idx", random_posterior(D, 4), MODEL)
    return tmp_path / "idx"


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def exported_ids(folder):
    return np.concatenate([pd.read_parquet(f)["item_id"].to_numpy()
                           for f in sorted((folder / "metadata").glob("*.parquet"))])


def test_reexport_replaces_earlier_shards(index_dir, tmp_path):
    out = tmp_path / "out"
    first = export_index(index_dir, out, rows_per_file=2)
    assert len(first) == 6 and all(path.is_file() and out in path.parents for path in first)
    written = export_index(index_dir, out, rows_per_file=1000)
    assert written == [out / "img_emb" / "img_emb_0.npy", out / "metadata" / "metadata_0.parquet"]
    assert files_under(out) == sorted([EXPORT_MARKER, "img_emb/img_emb_0.npy", "metadata/metadata_0.parquet"])
    ids = exported_ids(out)
    assert len(ids) == N and len(set(ids.tolist())) == N
    assert len(np.load(out / "img_emb" / "img_emb_0.npy")) == N
    marker = json.loads((out / EXPORT_MARKER).read_text())
    reader = IndexReader.open(index_dir)
    assert marker["format"] == "clip-retrieval" and marker["index_version"] == reader.manifest.version
    assert marker["item_count"] == N and marker["rows_per_file"] == 1000
    assert marker["files"] == ["img_emb/img_emb_0.npy", "metadata/metadata_0.parquet"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


def test_foreign_folder_is_refused_and_untouched(index_dir, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"photos is not empty and not an earlier bayesretrieval export"):
        export_index(index_dir, out)
    assert files_under(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="afile is a file"):
        export_index(index_dir, tmp_path / "afile")


def test_empty_existing_folder_is_used(index_dir, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    export_index(index_dir, out, rows_per_file=2)
    assert len(exported_ids(out)) == N and (out / EXPORT_MARKER).is_file()


@pytest.mark.parametrize("target", ["np.save", "pq.write_table"])
def test_failure_midway_keeps_earlier_export(index_dir, tmp_path, monkeypatch, target):
    out = tmp_path / "out"
    export_index(index_dir, out, rows_per_file=1000)
    before = {name: (out / name).read_bytes() for name in files_under(out)}
    module_name, function_name = target.split(".")
    module = getattr(export_module, module_name)
    real = getattr(module, function_name)
    calls = []

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, function_name, fail_second)
    with pytest.raises(OSError, match="disk full"):
        export_index(index_dir, out, rows_per_file=2)
    assert {name: (out / name).read_bytes() for name in files_under(out)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.parquet", "idx", "out"]


def test_cli_refuses_foreign_folder(index_dir, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    done = subprocess.run([sys.executable, "-m", "bayesretrieval.cli", "export", str(index_dir), str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0] and lines[0].startswith("bayesretrieval export: error:")
    assert files_under(out) == ["keep.txt"]
