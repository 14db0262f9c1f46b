"""A Searcher sees one version until it refreshes; refresh and auto_refresh move it to the newest."""

import gc
from concurrent.futures import ThreadPoolExecutor

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


def test_auto_refresh_stays_on_a_version_that_serves_and_retries_a_failed_one(tmp_path, monkeypatch, caplog):
    index = clustered_index(tmp_path / "idx", n=300, duplicates=5, variance="diag", seed=0)
    searcher = Searcher(IndexReader.open(index), None, index, form="diag", auto_refresh=True)
    before = results(searcher)
    clustered_index(index, n=300, duplicates=5, variance="kfac", seed=1)  # a version this searcher cannot use
    with caplog.at_level("WARNING", logger="bayesretrieval.queries.searcher"):
        assert results(searcher) == before and results(searcher) == before
    assert searcher.reader.manifest.version == "v000001"
    assert len([r for r in caplog.records if "staying on index version v000001" in r.message]) == 1
    clustered_index(index, n=320, duplicates=5, variance="diag", seed=2)
    assert results(searcher) == fresh_results(index)  # the next publication that serves is taken at once
    assert searcher.reader.manifest.version == "v000003"
    clustered_index(index, n=330, duplicates=5, variance="diag", seed=3)
    opens, real_open = [], IndexReader.open

    def fails_once(*args, **kwargs):
        opens.append(1)
        if len(opens) == 1:
            raise OSError("a passing failure")
        return real_open(*args, **kwargs)

    monkeypatch.setattr(IndexReader, "open", fails_once)
    results(searcher)
    assert searcher.reader.manifest.version == "v000003"  # failed once; not tried again at every request
    monkeypatch.setattr("bayesretrieval.queries.searcher.REFRESH_RETRY_S", 0.0)
    after = results(searcher)
    assert searcher.reader.manifest.version == "v000004" and len(opens) == 2
    assert after == fresh_results(index)
    searcher.close()


def test_threads_arriving_after_a_publication_all_see_it_after_one_refresh(tmp_path, monkeypatch):
    index = clustered_index(tmp_path / "idx", n=300, duplicates=5, seed=0)
    with Searcher(IndexReader.open(index), None, index, auto_refresh=True) as searcher:
        clustered_index(index, n=310, duplicates=5, seed=1)
        refreshes, real_refresh = [], searcher.refresh
        monkeypatch.setattr(searcher, "refresh", lambda: refreshes.append(1) or real_refresh())
        with ThreadPoolExecutor(8) as pool:
            seen = list(pool.map(lambda _: searcher.snapshot().reader.manifest.version, range(32)))
        assert seen == ["v000002"] * 32 and len(refreshes) == 1
