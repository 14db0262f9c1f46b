"""Precomputed embeddings (any probabilistic model) in, the same index out; and export."""

from dataclasses import replace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import random_posterior

from bayesretrieval.encoders import ModelIdentity
from bayesretrieval.indexing import BuildConfig
from bayesretrieval.indexing.embeddings_input import build_index_from_embeddings
from bayesretrieval.indexing.export import export_index
from bayesretrieval.similarity import side_statistics
from bayesretrieval.store import IndexReader

D, R = 16, 2
MODEL = ModelIdentity("ViT-B-32", "laion2b_s34b_b79k")


def embeddings_table(rng, n: int) -> dict:
    return {
        "path": [f"photos/p{i}.jpg" for i in range(n)],
        "embedding": [rng.normal(size=D).astype(np.float32).tolist() for _ in range(n)],
        "variance_diag": [rng.random(D).astype(np.float32).tolist() for _ in range(n)],
        "variance_lowrank": [rng.normal(size=(R, D)).astype(np.float32).tolist() for _ in range(n)],
    }


def test_precomputed_embeddings_with_lowrank_variance(tmp_path):
    rng = np.random.default_rng(0)
    posterior = random_posterior(D, 8)
    data = embeddings_table(rng, 6)
    data["path"] += ["bad/short.jpg", "bad/nan.jpg", "photos/p1.jpg"]
    data["embedding"] += [[1.0] * (D - 1), [float("nan")] * D, data["embedding"][1]]
    data["variance_diag"] += [[0.1] * D] * 3
    data["variance_lowrank"] += [[[0.0] * D] * R] * 3
    pq.write_table(pa.table(data), tmp_path / "emb.parquet")
    report = build_index_from_embeddings(tmp_path / "emb.parquet", tmp_path / "idx", posterior, MODEL)
    assert report.indexed == 6 and report.skipped == {"bad_embedding": 2, "duplicate_id": 1}
    reader = IndexReader.open(tmp_path / "idx")
    assert reader.manifest.variance == f"lowrank:{R}" and reader.manifest.source_kind == "embeddings"
    fetched = reader.fetch(reader.item_ids)
    assert reader.paths(reader.item_ids) == [f"photos/p{i}.jpg" for i in range(6)]
    np.testing.assert_allclose(fetched.means, np.array(data["embedding"][:6], np.float32))
    np.testing.assert_allclose(fetched.variance_lowrank, np.array(data["variance_lowrank"][:6], np.float32))
    np.testing.assert_allclose(fetched.variance_diag, np.array(data["variance_diag"][:6], np.float32))
    ref = side_statistics(torch.tensor(data["embedding"][:6]), torch.zeros(6), posterior.image.output_cov,
                          posterior.text.output_cov)
    np.testing.assert_allclose(fetched.scalars.quad_text, ref.other_quad.numpy(), rtol=1e-5)
    assert np.all(fetched.scalars.scale == 0)
    trace = np.square(fetched.variance_lowrank.astype(np.float64)).sum((1, 2)) + fetched.variance_diag.sum(1)
    assert reader.extremes("lowrank").plain_noise_ratio_max == pytest.approx(
        (trace / fetched.scalars.norm_sq).max(), rel=1e-5)
    # Re-run with one more row: ids by path stay, the new path gets the next id.
    more = embeddings_table(np.random.default_rng(0), 7)
    pq.write_table(pa.table(more), tmp_path / "emb.parquet")
    build_index_from_embeddings(tmp_path / "emb.parquet", tmp_path / "idx", posterior, MODEL)
    again = IndexReader.open(tmp_path / "idx")
    np.testing.assert_array_equal(again.item_ids[:6], reader.item_ids)
    assert again.paths([again.item_ids[-1]]) == ["photos/p6.jpg"] and again.item_ids[-1] == 6


def test_explicit_ids_scale_and_mismatch(tmp_path):
    posterior = random_posterior(D, 8)
    rng = np.random.default_rng(1)
    activations = rng.normal(size=(3, 8))
    table = pa.table({"id": [30, 10, 20], "mean": [rng.normal(size=D).tolist() for _ in range(3)],
                      "activation": activations.tolist()})
    pq.write_table(table, tmp_path / "emb.parquet")
    build_index_from_embeddings(tmp_path / "emb.parquet", tmp_path / "idx", posterior, MODEL)
    reader = IndexReader.open(tmp_path / "idx")
    assert reader.item_ids.tolist() == [10, 20, 30] and reader.manifest.next_item_id == 31
    q = posterior.image.activation_scale(torch.tensor(activations)).numpy()
    np.testing.assert_allclose(reader.fetch_scalars([30, 10, 20]).scale, q, rtol=1e-10)
    assert reader.paths([20]) == ["20"] and reader.variance_diag is None
    with pytest.raises(ValueError, match="variance diag requested"):
        build_index_from_embeddings(tmp_path / "emb.parquet", tmp_path / "idx", posterior, MODEL,
                                    BuildConfig(variance="diag"))
    with pytest.raises(ValueError, match="model: index has ViT-B-32/laion2b_s34b_b79k, command uses ViT-B-16/x"):
        other = ModelIdentity("ViT-B-16", "x")
        build_index_from_embeddings(tmp_path / "emb.parquet", tmp_path / "idx", replace(posterior, model=other), other)
    pq.write_table(pa.table({"vector": [[1.0] * D]}), tmp_path / "wrong.parquet")
    with pytest.raises(ValueError, match=r"expected an embedding column \(embedding, mean, mu\)"):
        build_index_from_embeddings(tmp_path / "wrong.parquet", tmp_path / "idx2", posterior, MODEL)


def test_export_clip_retrieval_layout(tmp_path):
    rng = np.random.default_rng(2)
    posterior = random_posterior(D, 8)
    data = embeddings_table(rng, 5)
    pq.write_table(pa.table(data), tmp_path / "emb.parquet")
    build_index_from_embeddings(tmp_path / "emb.parquet", tmp_path / "idx", posterior, MODEL)
    written = export_index(tmp_path / "idx", tmp_path / "out", "clip-retrieval", rows_per_file=2)
    assert len(written) == 6
    reader = IndexReader.open(tmp_path / "idx")
    rows = 0
    for number in range(3):
        emb = np.load(tmp_path / "out" / "img_emb" / f"img_emb_{number}.npy")
        meta = pd.read_parquet(tmp_path / "out" / "metadata" / f"metadata_{number}.parquet")
        assert emb.dtype == np.float16 and len(emb) == len(meta)
        np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1, atol=2e-3)
        fetched = reader.fetch(meta["item_id"].to_numpy())
        assert list(meta["image_path"]) == reader.paths(meta["item_id"].to_numpy())
        unit = fetched.means / np.linalg.norm(fetched.means, axis=1, keepdims=True)
        np.testing.assert_allclose(emb.astype(np.float32), unit, atol=2e-3)
        assert {"scale", "quad_text", "expected_norm", "variance_diag", "variance_lowrank"} <= set(meta.columns)
        rows += len(meta)
    assert rows == 5
