"""On the small world, the calibrated ``probability`` score has held-out ECE <= 0.05 (15 bins).

The whole path: the trained tiny CLIP (cached per machine), a posterior fitted on
training pairs, an index built over a test gallery, labelled pairs from the world's
ground-truth relevance; the probit link is fitted on half of the queries and scored on
the other half, next to the usual baseline (a logistic link on the plain cosine).
"""

import numpy as np
import pytest
from benchmark_scripts import benchmark_module

from bayesretrieval.encoders import ClipEncoder
from bayesretrieval.indexing.pipeline import BuildConfig, build_index
from bayesretrieval.queries import Searcher
from bayesretrieval.queries.calibration import evaluate_links
from bayesretrieval.queries.uncertainty import PairMoments
from bayesretrieval.training import ModelSize, get_trained_model, model_name
from bayesretrieval.world import make_world, partial_query, query_text, relevance_matrix, write_world
from bayesretrieval.world.io import IMAGES_DIR, read_world_table

ATTRIBUTE_SETS = (("shape",), ("colour",), ("colour", "shape"), ("size", "shape"), ("colour", "shape", "size"),
                  ("colour", "shape", "position"))


def world_queries(scenes, count: int, seed: int) -> list[str]:
    """Distinct partial queries drawn from gallery scenes (each matches at least its source)."""
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    while len(texts) < count:
        scene = scenes[rng.integers(len(scenes))]
        text = query_text(partial_query(scene, ATTRIBUTE_SETS[rng.integers(len(ATTRIBUTE_SETS))]))
        if text not in texts:
            texts.append(text)
    return texts


@pytest.fixture(scope="module")
def world_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    encoder = ClipEncoder.from_pretrained(model_name(ModelSize.TEST), get_trained_model(ModelSize.TEST))
    with benchmark_module("posterior_shift_auroc") as script:
        posterior = script.fit_on_world(encoder, n_fit=2048, seed=11, chunk_size=512).posterior_
    gallery = make_world(600, seed=12, part="test")
    write_world(gallery, root / "gallery")
    build_index(root / "gallery", root / "index", encoder, posterior, BuildConfig(workers=0))
    return root / "index", gallery, encoder


def all_pairs(searcher, gallery, queries):
    """Texts, item ids, moments and labels of every (query, gallery image) pair, query-major."""
    items = searcher.reader.read_items(columns=["item_id", "path"]).to_pandas()
    table, _ = read_world_table(searcher.reader.manifest.source_root)
    position = {IMAGES_DIR + "/" + p: i for i, p in enumerate(table["path"])}
    scenes = [gallery.scenes[position[p]] for p in items.path]
    labels = relevance_matrix(queries, scenes).reshape(-1)
    texts = np.repeat(np.asarray(queries, dtype=object), len(items)).tolist()
    ids = np.tile(items.item_id.to_numpy(), len(queries))
    return texts, ids, searcher.pair_moments(texts, ids), labels


def subset(moments: PairMoments, mask) -> PairMoments:
    return PairMoments(moments.mean[mask], moments.var[mask], moments.map_cosine[mask])


@pytest.mark.slow
def test_probability_score_is_calibrated_on_held_out_queries(world_index):
    index_dir, gallery, encoder = world_index
    searcher = Searcher.open(index_dir, encoder=encoder)
    queries = world_queries(gallery.scenes, 160, seed=3)
    texts, ids, moments, labels = all_pairs(searcher, gallery, queries)
    fit = np.repeat(np.arange(len(queries)) % 2 == 0, len(labels) // len(queries))
    report = evaluate_links(subset(moments, fit), labels[fit], subset(moments, ~fit), labels[~fit], bins=15)
    print(f"\nheld-out pairs {int((~fit).sum())}, positives {int(labels[~fit].sum())}: "
          f"probit ECE {report['probit']['ece']:.4f} NLL {report['probit']['nll']:.4f}, "
          f"logistic-on-map ECE {report['logistic_map']['ece']:.4f} NLL {report['logistic_map']['nll']:.4f}, "
          f"tau {report['probit']['threshold']:.4f} noise_std {report['probit']['noise_std']:.4f}")
    assert report["probit"]["ece"] <= 0.05
    link = searcher.calibrate(np.asarray(texts, dtype=object)[fit].tolist(), ids[fit], labels[fit])
    assert link.threshold_ == pytest.approx(report["probit"]["threshold"], abs=1e-3)
    assert searcher.calibration("text").threshold_ == pytest.approx(link.threshold_)
    results = searcher.search(queries[1::2][:5], k=10, score="probability")
    assert results.probability.between(0, 1).all() and results.attrs["exact"]
