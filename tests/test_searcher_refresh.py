"""A Searcher sees one version until it refreshes; refresh and auto_refresh move it to the newest."""

import gc

import numpy as np
import pytest
from conftest import clustered_index, random_queries

from bayesretrieval.queries import ItemFilter, Searcher
from bayesretrieval.store import IndexReader


def results(searcher, where=None):
    found = searcher.search(random_queries(4), k=5, where=where)
    return found.item_id.tolist(), found.path.tolist(), found.cosine_mean.round(10).tolist()


def fresh_results(index, where=None):
    with IndexReader.open(index) as reader:
        return results(Searcher(reader, None, index), where)


def versions(index):
    return sorted(p.name for p in (index / "versions").iterdir())


def test_a_searcher_keeps_its_snapshot_across_updates_until_it_refreshes(tmp_path):
    index = clustered_index(tmp_path / "idx", n=400, duplicates=5, seed=0)
    cats = ItemFilter(path_prefix="cats/")
    searcher = Searcher(IndexReader.open(index), None, index)
    first, first_cats = results(searcher), results(searcher, cats)
    for seed in (1, 2, 3):
        clustered_index(index, n=400 + seed, duplicates=5, seed=seed)
    assert results(searcher) == first and results(searcher, cats) == first_cats
    assert searcher.reader.manifest.version == "v000001" and versions(index) == ["v000001", "v000004"]
    assert searcher.refresh() and searcher.reader.manifest.version == "v000004"
    assert results(searcher) == fresh_results(index) != first
    assert results(searcher, cats) == fresh_results(index, cats)
    assert not searcher.refresh()
    gc.collect()  # the old snapshot is gone, so is its lease: the next build collects v000001
    clustered_index(index, n=300, duplicates=5, seed=4)
    assert versions(index) == ["v000004", "v000005"]
    searcher.close()
    clustered_index(index, n=300, duplicates=5, seed=5)
    assert versions(index) == ["v000006"]


def test_auto_refresh_follows_the_manifest(tmp_path):
    index = clustered_index(tmp_path / "idx", n=300, duplicates=5, seed=0)
    with Searcher(IndexReader.open(index), None, index, auto_refresh=True) as searcher:
        before = results(searcher)
        clustered_index(index, n=350, duplicates=5, seed=1)
        assert results(searcher) == fresh_results(index) != before
        assert searcher.reader.manifest.version == "v000002" and len(searcher.reader) == 350


def test_refresh_keeps_the_old_version_when_the_new_one_cannot_serve(tmp_path):
    index = clustered_index(tmp_path / "idx", n=300, duplicates=5, variance="diag", seed=0)
    searcher = Searcher(IndexReader.open(index), None, index, form="diag")
    before = results(searcher)
    clustered_index(index, n=300, duplicates=5, variance="kfac", seed=1)
    with pytest.raises(ValueError, match="needs variance columns"):
        searcher.refresh()
    assert searcher.reader.manifest.version == "v000001" and results(searcher) == before
    assert np.all(np.isfinite(searcher.search(random_queries(2), k=3).cosine_std))
