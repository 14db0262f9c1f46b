"""Several index directories searched as one equal one index built over all their folders."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import random_posterior, save_tiny_checkpoint, write_images

from bayesretrieval.cli import main
from bayesretrieval.encoders import ClipEncoder
from bayesretrieval.indexing import BuildConfig, build_index
from bayesretrieval.options import TINY_MODEL
from bayesretrieval.queries import ItemFilter, ProbitCalibration, Searcher, ShardedSearcher
from bayesretrieval.queries.calibration import save_calibration
from bayesretrieval.queries.sharded import SHARDED_RESULT_COLUMNS

D = 64
SHARDS = {"a": 14, "b": 9, "c": 3}
QUERIES = ["a red circle", "a blue square", "two green triangles", "noise"]
SCORE_RTOL = 1e-5
"""The shards encode their images in other batches than the union's build does."""


@pytest.fixture(scope="module")
def built(tmp_path_factory, encoder, posterior):
    """``(union_index, [shard_index, ...], image_root)``: one build per folder, one over all of them."""
    root = tmp_path_factory.mktemp("sharded")
    for seed, (name, count) in enumerate(SHARDS.items()):
        write_images(root / "images" / name, [f"img_{i:02d}.png" for i in range(count)], seed=seed)
    (root / "images" / "a" / "broken.jpg").write_bytes(b"not a picture")
    config = BuildConfig(batch_size=5, workers=0)
    shards = []
    for name in SHARDS:
        build_index(root / "images" / name, root / f"index-{name}", encoder, posterior, config)
        shards.append(root / f"index-{name}")
    build_index(root / "images", root / "index-all", encoder, posterior, config)
    return root / "index-all", shards, root / "images"


def absolute_paths(searcher, frame) -> list[str]:
    """Each row's file, from its shard's (or the index's) indexed folder."""
    shards = frame.shard if "shard" in frame else np.zeros(len(frame), int)
    readers = searcher.searchers if isinstance(searcher, ShardedSearcher) else [searcher]
    roots = [Path(s.reader.manifest.source_root) for s in readers]
    return [str(roots[s] / p) for s, p in zip(shards, frame.path)]


def assert_same_results(sharded, union, got, want):
    """Same files at every rank with the same scores (near-ties may swap)."""
    assert len(got) == len(want) and (got.query_index.to_numpy() == want.query_index.to_numpy()).all()
    np.testing.assert_allclose(got.score, want.score, rtol=SCORE_RTOL, atol=1e-9)
    np.testing.assert_allclose(got.cosine_std, want.cosine_std, rtol=SCORE_RTOL, atol=1e-9)
    for got_path, want_path, score in zip(absolute_paths(sharded, got), absolute_paths(union, want), want.score):
        if got_path != want_path:
            assert np.sum(np.isclose(want.score, score, rtol=SCORE_RTOL, atol=1e-9)) > 1


@pytest.mark.parametrize("score,kappa", [("expected", 1.0), ("lcb", 1.0), ("lcb", 3.0), ("ucb", 2.0)])
@pytest.mark.parametrize("k", [5, 20])
def test_shards_search_like_one_index_over_their_union(built, encoder, score, kappa, k):
    union_dir, shard_dirs, _ = built
    with Searcher.open(union_dir, encoder=encoder) as union, Searcher.open(shard_dirs, encoder=encoder) as sharded:
        want = union.search(QUERIES, k=k, score=score, kappa=kappa)
        got = sharded.search(QUERIES, k=k, score=score, kappa=kappa)
    assert isinstance(sharded, ShardedSearcher) and list(got.columns) == list(SHARDED_RESULT_COLUMNS)
    assert_same_results(sharded, union, got, want)
    np.testing.assert_allclose(got.best_match_probability, want.best_match_probability, rtol=1e-6, atol=1e-12)
    assert got.attrs["exact"] and want.attrs["exact"] and got.exact.all()
    assert got.attrs["shards"] == [str(d) for d in shard_dirs] and len(got.attrs["version"]) == len(shard_dirs)
    assert set(got.shard) <= {0, 1, 2} and (got.groupby("query_index")["rank"].max() == min(k, 26)).all()
    assert len(sharded) == len(union.reader) == sum(SHARDS.values())


def test_each_row_names_its_shard_and_its_item_there(built, encoder):
    _, shard_dirs, images = built
    with Searcher.open(shard_dirs, encoder=encoder) as sharded:
        got = sharded.search("a red circle", k=26)
        assert sorted(got.shard.value_counts().to_dict().items()) == [(0, 14), (1, 9), (2, 3)]
        for row in got.itertuples():
            reader = sharded.searchers[row.shard].reader
            assert reader.paths([row.item_id]) == [row.path]
            assert (Path(reader.manifest.source_root) / row.path).is_relative_to(images / list(SHARDS)[row.shard])


def test_filters_and_thresholds_apply_as_on_the_union(built, encoder, tmp_path):
    union_dir, shard_dirs, _ = built
    link = ProbitCalibration.from_dict({"threshold": 0.0, "noise_std": 0.2})
    with Searcher.open(union_dir, encoder=encoder) as union, Searcher.open(shard_dirs, encoder=encoder) as sharded:
        want = union.search(QUERIES, k=8, where=ItemFilter(path_glob="*img_0[0-4].png"))
        got = sharded.search(QUERIES, k=8, where=ItemFilter(path_glob="img_0[0-4].png"))
        assert_same_results(sharded, union, got, want)
        with pytest.raises(ValueError, match="item_ids filter is ambiguous"):
            sharded.search(QUERIES, k=3, where=ItemFilter(item_ids=[1, 2]))
        with pytest.raises(ValueError, match="needs a calibration"):
            sharded.search(QUERIES, k=3, threshold=0.5)
        for searcher in (union, *sharded.searchers):
            save_calibration(searcher.index_dir, "text", link, searcher._calibration_tags())
        want = union.search(QUERIES, k=8, score="lcb", threshold=0.5)
        got = sharded.search(QUERIES, k=8, score="lcb", threshold=0.5)
        assert_same_results(sharded, union, got, want)
        assert 0 < len(got) < 8 * len(QUERIES)  # the threshold cut inside the merged top k
        other = ProbitCalibration.from_dict({"threshold": 0.1, "noise_std": 0.2})
        save_calibration(shard_dirs[1], "text", other, sharded.searchers[1]._calibration_tags())
        with pytest.raises(ValueError, match="one link on every shard"):
            sharded.search(QUERIES, k=3, score="probability")
    for index_dir in (union_dir, *shard_dirs):
        (index_dir / "calibration.json").unlink()


def test_shards_with_another_posterior_or_model_are_refused(built, encoder, tmp_path):
    _, shard_dirs, images = built
    build_index(images / "c", tmp_path / "other", encoder, random_posterior(D, 64, seed=5, model=encoder.identity),
                BuildConfig(batch_size=5, workers=0))
    with pytest.raises(ValueError, match="posterior .* shards must share one model and posterior"):
        Searcher.open([shard_dirs[0], tmp_path / "other"], encoder=encoder)
    other_encoder = ClipEncoder.from_pretrained(TINY_MODEL, save_tiny_checkpoint(tmp_path / "other.pt", seed=1))
    build_index(images / "c", tmp_path / "other-model", other_encoder,
                random_posterior(D, 64, model=other_encoder.identity), BuildConfig(batch_size=5, workers=0))
    with pytest.raises(ValueError, match="was built with model"):
        Searcher.open([shard_dirs[0], tmp_path / "other-model"], encoder=encoder)
    with pytest.raises(ValueError, match="no index directories"):
        Searcher.open([])


def test_cli_searches_several_index_directories(built, tmp_path, capsys):
    _, shard_dirs, images = built
    argv = ["search", *map(str, shard_dirs), "a red circle", "noise", "-k", "4"]
    assert main([*argv, "--format", "json", "--html", str(tmp_path / "page.html")]) == 0
    out = json.loads(capsys.readouterr().out)
    with Searcher.open(shard_dirs) as sharded:
        want = sharded.search(["a red circle", "noise"], k=4)
    assert out["shards"] == [str(d) for d in shard_dirs] and out["exact"]
    assert [(r["query"], r["shard"], r["item_id"]) for r in out["results"]] == list(
        zip(want["query"], want.shard, want.item_id))
    assert str(images / list(SHARDS)[want.shard[0]] / want.path[0]) in (tmp_path / "page.html").read_text()
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert f"{shard_dirs[want.shard[0]]}: {want.path[0]}" in table
    assert main([*argv, "--ids", "1"]) == 2
    assert "with several index directories" in capsys.readouterr().err


def test_the_audit_over_shards_is_the_audit_of_their_union(built, encoder):
    union_dir, shard_dirs, _ = built
    with Searcher.open(union_dir, encoder=encoder) as union, Searcher.open(shard_dirs, encoder=encoder) as sharded:
        want = union.audit(10)
        got = sharded.audit(10)
        snapshot = sharded.snapshot()
        assert snapshot.readers == [searcher.reader for searcher in sharded.searchers]
        assert snapshot.version == got.attrs["version"] == ["v000001"] * len(shard_dirs)
        assert union.snapshot().readers == [union.reader] and union.snapshot().version == "v000001"
    assert absolute_paths(sharded, got) == absolute_paths(union, want)
    np.testing.assert_allclose(got.percentile, want.percentile)
    np.testing.assert_allclose(got.scale, want.scale, rtol=SCORE_RTOL)
    assert got.attrs["item_count"] == want.attrs["item_count"] == sum(SHARDS.values())
    assert (got.attrs["by"], got.attrs["form"]) == (want.attrs["by"], want.attrs["form"])
