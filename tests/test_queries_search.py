"""Certified search equals a brute-force rerank over the whole collection (ties by item id)."""

import time

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from conftest import SEARCH_DIM as D
from conftest import SEARCH_TEXT_WIDTH as H_TEXT
from conftest import clustered_index, random_queries
from reference import brute_force_top_k

from bayesretrieval.encoders import Encoded
from bayesretrieval.queries import ItemFilter, ProbitCalibration, Searcher
from bayesretrieval.queries.calibration import save_calibration
from bayesretrieval.queries.searcher import RESULT_COLUMNS
from bayesretrieval.queries.uncertainty import ModelCovariances, QuerySide, pair_moments
from bayesretrieval.similarity import best_match_probabilities, cosine_moment_parts
from bayesretrieval.store import IndexReader

SCORE_RTOL = 1e-7
"""The dense references sum the same float64 terms in another order."""


@pytest.fixture(scope="module")
def flat_index(tmp_path_factory):
    return clustered_index(tmp_path_factory.mktemp("flat"))


def reference_scores(reader, encoded, score, kappa=1.0, modality="text", calibration=None, estimator="second_order"):
    """All-pairs scores ``(nq, N)`` from the dense covariances (independent of the engine)."""
    posterior = reader.posterior
    query_post = posterior.text if modality == "text" else posterior.image
    means = torch.from_numpy(np.asarray(reader.means, dtype=np.float64))
    q = torch.from_numpy(np.array(reader.scalars[:, 0]))
    moments = cosine_moment_parts(means, q, posterior.image.output_cov, encoded.embeds.double(),
                                  query_post.activation_scale(encoded.activations), query_post.output_cov, estimator)
    mean, var, var_item = (part.T.numpy() for part in (moments.mean, moments.var, moments.var_item.clamp_min(0)))
    y = encoded.embeds.double().numpy()
    plain = y @ means.numpy().T / np.outer(np.linalg.norm(y, axis=1), np.linalg.norm(means.numpy(), axis=1))
    return {"expected": mean, "lcb": mean - kappa * np.sqrt(var), "ucb": mean + kappa * np.sqrt(var), "map": plain,
            "lcb_item": mean - kappa * np.sqrt(var_item),
            "probability": None if calibration is None else calibration.probability(mean, var)}[score]


def assert_same_ranking(frame, ref_ids, ref_values, nq):
    for qi in range(nq):
        rows = frame[frame.query_index == qi].sort_values("rank")
        got_ids, got_values = rows.item_id.to_numpy(), rows.score.to_numpy()
        assert len(got_ids) == len(ref_ids[qi])
        np.testing.assert_allclose(got_values, ref_values[qi], rtol=SCORE_RTOL, atol=1e-12)
        for got, want, value in zip(got_ids, ref_ids[qi], ref_values[qi]):
            if got != want:  # only tied scores may swap
                assert np.sum(np.isclose(ref_values[qi], value, rtol=SCORE_RTOL, atol=1e-12)) > 1


@pytest.mark.parametrize("score,kappa", [("expected", 1.0), ("lcb", 1.0), ("lcb", 3.0), ("ucb", 1.0), ("map", 1.0),
                                         ("lcb_item", 1.0), ("lcb_item", 8.0)])
def test_search_equals_brute_force(flat_index, score, kappa):
    reader = IndexReader.open(flat_index)
    searcher = Searcher(reader, None, flat_index)
    queries = random_queries()
    frame = searcher.search(queries, k=10, score=score, kappa=kappa)
    ref_ids, ref_values = brute_force_top_k(reference_scores(reader, queries, score, kappa), reader.item_ids, 10)
    assert_same_ranking(frame, ref_ids, ref_values, 6)
    assert frame.attrs["exact"] and frame.exact.all()
    assert list(frame.columns) == list(RESULT_COLUMNS)
    if score == "lcb" and kappa == 3.0:
        assert max(frame.attrs["candidates"]) > 168  # the certificate needed a grown set
    assert np.allclose(frame.groupby("query_index").best_match_probability.sum(), 1.0)
    for qi, rows in frame.groupby("query_index"):
        scale = searcher.logit_scale
        want = best_match_probabilities(np.zeros(len(rows)), scale * rows.cosine_mean.to_numpy(),
                                        (scale * rows.cosine_std.to_numpy()) ** 2)
        np.testing.assert_allclose(rows.best_match_probability, want, rtol=1e-9)


def test_search_reports_where_its_time_went(flat_index):
    searcher = Searcher(IndexReader.open(flat_index), None, flat_index)
    start = time.perf_counter()
    frame = searcher.search(random_queries(), k=10, score="lcb", kappa=3.0)  # grows the candidate set: two rounds
    wall = time.perf_counter() - start
    seconds = frame.attrs["seconds"]
    assert set(seconds) == {"queries", "faiss", "rerank", "table"}
    assert all(value > 0 for value in seconds.values())
    assert sum(seconds.values()) <= wall


@pytest.mark.parametrize("estimator", ["published", "kronecker", "delta"])
@pytest.mark.parametrize("score", ["lcb", "ucb"])
def test_other_estimators_equal_brute_force(flat_index, estimator, score):
    reader = IndexReader.open(flat_index)
    searcher = Searcher(reader, None, flat_index, estimator=estimator)
    queries = random_queries(4, seed=8)
    frame = searcher.search(queries, k=10, score=score, kappa=2.0)
    ref = reference_scores(reader, queries, score, 2.0, estimator=estimator)
    ref_ids, ref_values = brute_force_top_k(ref, reader.item_ids, 10)
    assert_same_ranking(frame, ref_ids, ref_values, 4)
    assert frame.attrs["exact"] and frame.attrs["estimator"] == estimator


def test_duplicates_tie_and_break_by_item_id(flat_index):
    reader = IndexReader.open(flat_index)
    searcher = Searcher(reader, None, flat_index)
    pos = np.asarray(reader.positions(reader.item_ids))
    means = np.asarray(reader.means, dtype=np.float64)
    _, first = np.unique(means, axis=0, return_inverse=True)
    twins = [p for p in pos if np.sum(first == first[p]) > 1][:1]
    query = Encoded(torch.from_numpy(means[twins]), torch.zeros(1, H_TEXT))
    frame = searcher.search(query, k=4)
    top = frame.sort_values("rank")
    assert top.score.iloc[0] == top.score.iloc[1]
    assert top.item_id.iloc[0] < top.item_id.iloc[1]


def test_probability_score_and_threshold(flat_index, tmp_path):
    reader = IndexReader.open(flat_index)
    searcher = Searcher(reader, None, flat_index)
    with pytest.raises(ValueError, match="calibration"):
        searcher.search(random_queries(), k=5, score="probability")
    link = ProbitCalibration.from_dict({"threshold": 0.5, "noise_std": 0.05})
    save_calibration(flat_index, "text", link, searcher._calibration_tags())
    queries = random_queries()
    frame = searcher.search(queries, k=10, score="probability")
    ref = reference_scores(reader, queries, "probability", calibration=link)
    ref_ids, ref_values = brute_force_top_k(ref, reader.item_ids, 10)
    assert_same_ranking(frame, ref_ids, ref_values, 6)
    kept = searcher.search(queries, k=10, score="expected", threshold=0.9)
    assert (kept.probability >= 0.9).all() and len(kept) < 60
    (flat_index / "calibration.json").unlink()


@pytest.mark.parametrize("variance,form", [("diag", "diag"), ("lowrank:3", "lowrank")])
@pytest.mark.parametrize("score", ["lcb", "ucb", "expected"])
def test_per_item_forms_equal_brute_force(tmp_path, variance, form, score):
    path = clustered_index(tmp_path, n=10_000, variance=variance, seed=2)
    reader = IndexReader.open(path)
    searcher = Searcher(reader, None, path)
    assert searcher.form.value == form
    queries = random_queries(4, seed=3)
    frame = searcher.search(queries, k=10, score=score, kappa=2.0)
    covs = ModelCovariances.from_posterior(reader.posterior, "text", "second_order")
    query = QuerySide.build(queries.embeds, reader.posterior.text.activation_scale(queries.activations), covs)
    n = len(reader)
    every = reader.fetch(np.tile(np.asarray(reader.item_ids), 4))
    moments = pair_moments(query, np.repeat(np.arange(4), n), every, covs, form)
    sign = {"lcb": -2.0, "ucb": 2.0, "expected": 0.0}[score]
    ref = (moments.mean + sign * moments.var.sqrt()).numpy().reshape(4, n)
    ref_ids, ref_values = brute_force_top_k(ref, reader.item_ids, 10)
    assert_same_ranking(frame, ref_ids, ref_values, 4)
    assert frame.attrs["exact"]


def test_filters_are_exact(flat_index):
    reader = IndexReader.open(flat_index)
    searcher = Searcher(reader, None, flat_index)
    queries = random_queries(3, seed=5)
    ref = reference_scores(reader, queries, "lcb", 2.0)
    items = reader.read_items(columns=["item_id", "path", "width"]).to_pandas()
    some_ids = set(items.item_id.iloc[::7].tolist())
    cases = [
        (ItemFilter(item_ids=sorted(some_ids)), some_ids),
        (ItemFilter(path_prefix="cats/"), set(items.item_id[items.path.str.startswith("cats/")])),
        (ItemFilter(path_glob="*/img_*1.png"), set(items.item_id[items.path.str.endswith("1.png")])),
        (ItemFilter(where="width >= 80"), set(items.item_id[items.width >= 80])),
        (ItemFilter(where=pc.field("width") < 48, path_prefix="dogs/"),
         set(items.item_id[(items.width < 48) & items.path.str.startswith("dogs/")])),
    ]
    for item_filter, allowed in cases:
        assert 0 < len(allowed) < len(items)
        frame = searcher.search(queries, k=10, score="lcb", kappa=2.0, where=item_filter)
        assert set(frame.item_id) <= allowed
        ref_ids, ref_values = brute_force_top_k(ref, reader.item_ids, 10, allowed)
        assert_same_ranking(frame, ref_ids, ref_values, 3)
        assert frame.attrs["exact"]


def test_image_queries_use_image_posterior_on_both_sides(flat_index):
    reader = IndexReader.open(flat_index)
    searcher = Searcher(reader, None, flat_index)
    queries = random_queries(3, seed=6, modality="image")
    frame = searcher.search(queries, k=10, score="lcb", modality="image")
    ref = reference_scores(reader, queries, "lcb", modality="image")
    ref_ids, ref_values = brute_force_top_k(ref, reader.item_ids, 10)
    assert_same_ranking(frame, ref_ids, ref_values, 3)


def test_ivf_is_exact_only_when_every_list_is_probed(tmp_path):
    path = clustered_index(tmp_path, n=10_000, factory="IVF16,Flat", seed=4)
    reader = IndexReader.open(path)
    searcher = Searcher(reader, None, path)
    queries = random_queries(4, seed=7)
    probed = searcher.search(queries, k=10, score="lcb", nprobe=2)
    assert not probed.attrs["exact"]
    full = searcher.search(queries, k=10, score="lcb", nprobe=16)
    assert full.attrs["exact"]
    ref_ids, ref_values = brute_force_top_k(reference_scores(reader, queries, "lcb"), reader.item_ids, 10)
    assert_same_ranking(full, ref_ids, ref_values, 4)


def test_k_larger_than_collection_returns_everything(tmp_path):
    path = clustered_index(tmp_path, n=30, duplicates=2)
    searcher = Searcher(IndexReader.open(path), None, path)
    frame = searcher.search(random_queries(2), k=1000, score="ucb")
    assert len(frame) == 60 and frame.attrs["exact"]
    assert sorted(frame[frame.query_index == 0].item_id) == sorted(IndexReader.open(path).item_ids.tolist())
    assert len(searcher.search(random_queries(1), k=5, where=ItemFilter(item_ids=[-99]))) == 0


@pytest.mark.parametrize("kwargs,message", [
    ({"k": 0}, "k must be"), ({"k": 2.5}, "k must be"), ({"score": "best"}, "unknown score"),
    ({"kappa": -1.0, "score": "lcb"}, "kappa"), ({"threshold": 1.5}, "threshold"),
])
def test_bad_arguments_raise(flat_index, kwargs, message):
    searcher = Searcher(IndexReader.open(flat_index), None, flat_index)
    with pytest.raises(ValueError, match=message):
        searcher.search(random_queries(1), **kwargs)


def test_queries_without_encoder_or_wrong_dim_raise(flat_index):
    searcher = Searcher(IndexReader.open(flat_index), None, flat_index)
    with pytest.raises(ValueError, match="no encoder"):
        searcher.search("a red circle")
    with pytest.raises(ValueError, match="dim"):
        searcher.search(Encoded(torch.zeros(1, D + 1), torch.zeros(1, H_TEXT)))


def test_a_search_does_not_depend_on_earlier_searches(flat_index):
    queries = random_queries(6, seed=12)
    fresh = Searcher(IndexReader.open(flat_index), None, flat_index).search(queries, k=10, score="lcb", kappa=3.0)
    searcher = Searcher(IndexReader.open(flat_index), None, flat_index)
    searcher.search(queries, k=10, score="lcb", kappa=3.0, candidates=42)
    searcher.search(random_queries(3, seed=2), k=5, score="expected")
    again = searcher.search(queries, k=10, score="lcb", kappa=3.0)
    for key in ("candidates", "needed", "exact", "certified"):
        assert again.attrs[key] == fresh.attrs[key]
    assert (again[["item_id", "score"]].to_numpy() == fresh[["item_id", "score"]].to_numpy()).all()


def test_expected_needs_one_round_of_about_2k_candidates(flat_index):
    frame = Searcher(IndexReader.open(flat_index), None, flat_index).search(random_queries(6, seed=12), k=10)
    assert frame.attrs["candidates"] == [20] * 6 and frame.attrs["exact"]


@pytest.mark.parametrize("score,kappa", [("expected", 1.0), ("lcb", 1.0), ("lcb", 3.0), ("ucb", 1.0)])
def test_needed_is_the_fewest_candidates_that_certify(flat_index, score, kappa):
    queries = random_queries(6, seed=5)
    searcher = Searcher(IndexReader.open(flat_index), None, flat_index)
    reference = searcher.search(queries, k=10, score=score, kappa=kappa)
    needed = reference.attrs["needed"]
    enough = Searcher(IndexReader.open(flat_index), None, flat_index).search(
        queries, k=10, score=score, kappa=kappa, candidates=max(needed))
    assert enough.attrs["candidates"] == [max(needed)] * 6 and enough.attrs["needed"] == needed
    assert (enough[["item_id", "score"]].to_numpy() == reference[["item_id", "score"]].to_numpy()).all()
    short = Searcher(IndexReader.open(flat_index), None, flat_index).search(
        queries, k=10, score=score, kappa=kappa, candidates=max(needed) - 1)
    hardest = int(np.argmax(needed))
    assert short.attrs["candidates"][hardest] > max(needed) - 1  # one fewer: its certificate fails, the set grows


def test_pair_moments_in_any_order_equal_the_dense_moments(flat_index):
    reader = IndexReader.open(flat_index)
    searcher = Searcher(reader, None, flat_index)
    encoded = searcher.encode(random_queries(5, seed=3), "text")
    engine = searcher.engine("text")
    query = QuerySide.build(encoded.means, encoded.scales, engine.covs)
    I = np.asarray(reader.item_ids)[np.random.default_rng(0).integers(0, len(reader), (5, 7))]
    I[1, 3:] = I[4, :] = -1
    dense = engine.moments(query, I)
    rows, columns = np.nonzero(I >= 0)
    shuffle = np.random.default_rng(1).permutation(len(rows))
    flat = engine.pair_moments(query, rows[shuffle], I[rows, columns][shuffle])
    for name in ("mean", "var", "map_cosine"):
        torch.testing.assert_close(getattr(flat, name), getattr(dense, name)[rows[shuffle], columns[shuffle]],
                                   rtol=0, atol=0)
        assert getattr(dense, name)[torch.from_numpy(I < 0)].isnan().all()


def test_a_filter_whose_items_sit_in_unprobed_lists_returns_nothing(tmp_path):
    path = clustered_index(tmp_path, n=3000, factory="IVF16,Flat", seed=4)
    reader = IndexReader.open(path)
    searcher = Searcher(reader, None, path)
    sizes = [len(searcher.search(random_queries(1, seed=7), k=3, nprobe=1, where=ItemFilter(item_ids=[int(i)])))
             for i in np.asarray(reader.item_ids)[::30]]
    assert set(sizes) == {0, 1}  # some single items were in the probed list, some were not


def test_pair_moments_refuse_query_rows_out_of_range(flat_index):
    searcher = Searcher(IndexReader.open(flat_index), None, flat_index)
    encoded = searcher.encode(random_queries(2), "text")
    engine = searcher.engine("text")
    query = QuerySide.build(encoded.means, encoded.scales, engine.covs)
    ids = np.asarray(searcher.reader.item_ids[:3])
    with pytest.raises(ValueError, match=r"query rows must be in \[0, 2\)"):
        engine.pair_moments(query, np.array([1, -1, 0]), ids)


def test_quantised_storage_scores_every_candidate_and_is_never_exact(tmp_path):
    path = clustered_index(tmp_path, n=3000, factory="IVF4,SQ8", seed=5)
    reader = IndexReader.open(path)
    searcher = Searcher(reader, None, path)
    queries = random_queries(3, seed=8)
    frame = searcher.search(queries, k=5, score="lcb", nprobe=4, candidates=3000)
    assert not frame.attrs["exact"]
    ref_ids, ref_values = brute_force_top_k(reference_scores(reader, queries, "lcb"), reader.item_ids, 5)
    assert_same_ranking(frame, ref_ids, ref_values, 3)  # every item a candidate: the rerank alone decides
