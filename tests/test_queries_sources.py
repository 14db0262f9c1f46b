"""Choosing the cheaper source of candidate means, and that the choice never changes a result."""

import numpy as np
import pytest

from bayesretrieval.queries import Searcher
from bayesretrieval.queries.rows import FROM_FAISS, FROM_FILE
from bayesretrieval.queries.sources import PROBE_INTERVAL, SMOOTHING, CheaperSource
from bayesretrieval.store import IndexReader
from test_queries_search import build_index, text_queries


def read(chooser: CheaperSource, per_row: dict[str, float], rows: int = 100) -> str:
    """One read through ``chooser`` whose cost per row is ``per_row[source]``; returns the source used."""
    name = chooser.pick()
    chooser.record(name, per_row[name] * rows, rows)
    return name


def test_every_source_is_timed_first_then_the_cheaper_is_used_and_the_other_retimed():
    chooser = CheaperSource(["a", "b"])
    costs = {"a": 3e-6, "b": 1e-6}
    used = [read(chooser, costs) for _ in range(3 * PROBE_INTERVAL)]
    assert used[:2] == ["a", "b"]
    probes = [i for i, name in enumerate(used) if name == "a" and i > 0]
    assert probes == [i for i in range(2, len(used)) if (i + 1) % PROBE_INTERVAL == 0]
    assert chooser.costs == pytest.approx(costs)
    assert chooser.uses == {"a": 1 + len(probes), "b": len(used) - 1 - len(probes)}


def test_a_retiming_replaces_a_stale_cost_and_the_choice_follows_the_machine():
    chooser = CheaperSource(["a", "b"])
    read(chooser, {"a": 50e-6})  # a first read slowed by page faults
    read(chooser, {"b": 2e-6})
    costs = {"a": 1e-6, "b": 2e-6}
    used = [read(chooser, costs) for _ in range(PROBE_INTERVAL + 5)]
    assert used[:PROBE_INTERVAL - 3] == ["b"] * (PROBE_INTERVAL - 3)
    assert used[-3:] == ["a"] * 3  # one re-timing of a was enough to switch
    assert chooser.costs["a"] == pytest.approx(1e-6)


def test_the_source_in_use_keeps_a_running_average():
    chooser = CheaperSource(["only"])
    read(chooser, {"only": 1e-6})
    read(chooser, {"only": 3e-6})
    assert chooser.costs["only"] == pytest.approx(1e-6 + SMOOTHING * 2e-6)
    assert chooser.pick() == "only"


def test_a_chooser_needs_a_source():
    with pytest.raises(ValueError, match="at least one source"):
        CheaperSource([])


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat"])
def test_results_do_not_depend_on_where_candidate_means_are_read(tmp_path, factory):
    reader = IndexReader.open(build_index(tmp_path, n=10_000, factory=factory, seed=4))
    queries = text_queries(7, seed=7)
    searchers = {}
    for source in (None, FROM_FAISS, FROM_FILE):
        searchers[source] = Searcher(reader, None, tmp_path)
        searchers[source].rows.fix_mean_source(source)
    for score in ("expected", "lcb", "ucb"):
        frames = {source: [s.search(queries, k=15, score=score, nprobe=16) for _ in range(4)]
                  for source, s in searchers.items()}
        reference = frames[FROM_FILE][0]
        for runs in frames.values():
            for frame in runs:
                np.testing.assert_array_equal(frame.item_id.to_numpy(), reference.item_id.to_numpy())
                np.testing.assert_array_equal(frame.score.to_numpy(), reference.score.to_numpy())
    assert all(count > 0 for count in searchers[None].rows.mean_sources.uses.values())
    assert searchers[FROM_FILE].rows.mean_sources.uses.keys() == {FROM_FILE}


def test_a_source_the_index_cannot_give_is_refused(tmp_path):
    reader = IndexReader.open(build_index(tmp_path, n=2_000, factory="IVF16,SQ8", seed=4))
    searcher = Searcher(reader, None, tmp_path)
    assert searcher.rows.mean_sources.costs.keys() == {FROM_FILE}
    with pytest.raises(ValueError, match="not available here"):
        searcher.rows.fix_mean_source(FROM_FAISS)
