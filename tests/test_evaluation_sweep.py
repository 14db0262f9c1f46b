"""The dense sweep agrees with the engine's certified search; evaluate and the plots run on its records."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import random_posterior

from bayesretrieval.encoders import Encoded, ModelIdentity
from bayesretrieval.evaluation import DEFAULT_SCORES, evaluate, query_relative_variance, split_queries, sweep
from bayesretrieval.evaluation.plots import plot_evaluation
from bayesretrieval.indexing.embeddings_input import build_index_from_embeddings
from bayesretrieval.queries import Searcher
from bayesretrieval.queries.uncertainty import QuerySide
from bayesretrieval.store import IndexReader

D, H, NB, NQ = 16, 8, 40, 50


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    rng = np.random.default_rng(0)
    posterior = random_posterior(D, H, model=ModelIdentity("bayes-tiny", None))
    centres = rng.normal(size=(5, D))
    labels = rng.integers(0, 5, NB)
    items = centres[labels] + 0.8 * rng.normal(size=(NB, D))
    ids = np.arange(3, 3 + 2 * NB, 2)  # gaps: ids are not positions
    pq.write_table(pa.table({"item_id": ids, "embedding": items.tolist(),
                             "activation": rng.normal(size=(NB, H)).tolist()}), folder / "emb.parquet")
    build_index_from_embeddings(folder / "emb.parquet", folder / "idx", posterior, ModelIdentity("bayes-tiny", None))
    reader = IndexReader.open(folder / "idx")
    query_labels = rng.integers(0, 5, NQ)
    texts = Encoded(torch.tensor(centres[query_labels] + 0.8 * rng.normal(size=(NQ, D)), dtype=torch.float32),
                    torch.tensor(rng.normal(size=(NQ, H)), dtype=torch.float32))
    relevant = query_labels[:, None] == labels[None, :]  # columns in sorted-id order
    return reader, folder / "idx", texts, relevant, ids


def run_sweep(setup, estimator):
    reader, index_dir, texts, relevant, ids = setup
    searcher = Searcher(reader, None, index_dir, estimator=estimator, logit_scale=20.0)
    encoded = searcher.encode(texts, "text")
    engine = searcher.engine("text")
    query = QuerySide.build(encoded.means, encoded.scales, engine.covs)
    variance = query_relative_variance(encoded.means, encoded.scales, searcher.posterior.text)
    done = []
    records = sweep(engine, query, variance, np.asarray(reader.item_ids), lambda rows: relevant[rows], 20.0,
                    chunk_size=7, progress=done.append)
    assert done[-1] == NQ and len(done) == 8
    return searcher, records


@pytest.mark.parametrize("estimator", ["second_order", "published"])
def test_sweep_matches_certified_search(setup, estimator):
    _, _, texts, relevant, ids = setup
    searcher, records = run_sweep(setup, estimator)
    column = {int(i): c for c, i in enumerate(ids)}
    assert set(records.rankings) == {spec.label for spec in DEFAULT_SCORES}
    for score, label, kappa in (("expected", "expected", 1.0), ("lcb", "lcb(kappa=2)", 2.0), ("map", "map", 1.0)):
        found = searcher.search(texts, k=NB, score=score, kappa=kappa, modality="text")
        for qi, group in found.groupby("query_index"):
            hits = relevant[qi, [column[i] for i in group["item_id"]]]
            assert records.rankings[label]["first_hit"][qi] == np.argmax(hits)
            assert records.rankings[label]["hits"][qi] == hits[:10].sum()
            if score == "expected":
                np.testing.assert_allclose(records.pair_mean[qi], group["cosine_mean"].to_numpy()[:10], rtol=1e-9)
                np.testing.assert_allclose(np.sqrt(records.pair_var[qi]), group["cosine_std"].to_numpy()[:10],
                                           rtol=1e-9)
                assert records.pair_relevant[qi].tolist() == hits[:10].tolist()
                assert records.pair_item[qi].tolist() == group["item_id"].tolist()[:10]


def test_evaluate_and_plots(setup, tmp_path):
    _, records = run_sweep(setup, "second_order")
    fit = split_queries(NQ, seed=0)
    first_half = np.arange(NQ) < NQ // 2
    evaluation = evaluate(records, fit, logit_scale=20.0, groups={"a": first_half, "b": ~first_half})
    group = evaluation.summary["groups"]["a"]
    assert group["held_out"] == (first_half & ~fit).sum()
    assert group["top1_recall"] == pytest.approx(np.mean(records.pair_relevant[first_half & ~fit, 0]))
    summary = json.loads(json.dumps(evaluation.summary))  # JSON-ready
    assert summary["queries"] == {"total": NQ, "held_in": 25, "held_out": 25}
    assert summary["calibration"]["pairs"]["held_out"] == 250
    picked = summary["selected_on_held_in"]["bayesian"]
    best = max((v["failure_auroc_held_in"], k) for k, v in summary["signals"].items() if not v["baseline"])
    assert picked["signal"] == best[1]
    np.testing.assert_equal(picked["failure_auroc"], summary["signals"][best[1]]["failure_auroc"])
    for name, signal in summary["signals"].items():
        assert 0 <= signal["aurc"] <= 1 and len(signal["binned_recall@1"]["recall"]) == 10
    first_hit = records.rankings["map"]["first_hit"]
    assert summary["retrieval"]["map"]["recall@1"] == pytest.approx(np.mean(first_hit == 0))
    assert summary["top1_recall_held_out"] == pytest.approx(np.mean(records.pair_relevant[~fit, 0]))
    paths = plot_evaluation(evaluation, tmp_path, "t", "test")
    assert [p.name for p in paths] == ["t_reliability.png", "t_binned_recall.png", "t_risk_coverage.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    with pytest.raises(ValueError, match="fit mask has shape"):
        evaluate(records, fit[:-1], logit_scale=20.0)
