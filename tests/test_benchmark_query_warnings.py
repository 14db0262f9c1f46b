"""benchmarks/query_warnings.py end to end with the test model (``--quick``): queries, record, AUROCs, table."""

import json
import re

import numpy as np
import pytest
from benchmark_scripts import benchmark_module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("query_warnings")
    with benchmark_module("query_warnings") as script:
        figures = script.main(["--quick", "--work", str(tmp / "work"), "--output", str(tmp / "out.json")])
        yield script, figures, json.loads((tmp / "out.json").read_text())


def test_record_holds_the_quick_config_and_every_kind(run):
    script, figures, saved = run
    assert saved["benchmark"] == "query_warnings" and saved["config"]["quick"] is True
    assert figures["model"] == "bayes-tiny" and figures["posterior"]["reference_pairs"] == 512
    n = script.QUICK["queries"]
    assert figures["queries"]["in_distribution"] == n
    assert all(figures["queries"][kind] == n for kind in script.VARIANTS)
    assert figures["search_flag_matches_threshold"]


def test_replacement_words_are_unseen_words_and_tokens(run):
    _, figures, _ = run
    for kind, words in figures["words"].items():
        kept = [w for w, check in words.items() if check["kept"]]
        assert kept, kind
        for word in kept:
            assert not words[word]["in_captions"] and words[word]["tokens_in_captions"] == 0
    assert "star" in figures["words"]["held_out_shape"]


def test_each_variant_replaces_one_word_of_its_caption_by_a_kept_word(run):
    script, figures, _ = run
    world = script.make_world(6, seed=3)
    checks = {kind: {w: {"kept": True} for w in variant.replacements} for kind, variant in script.VARIANTS.items()}
    queries = script.make_queries(world.scenes, list(world.captions), checks, seed=0)
    assert len(queries["texts"]) == 6 * (1 + len(script.VARIANTS))
    for text, kind, source in zip(queries["texts"], queries["kind"], queries["source"]):
        original = re.findall(r"\w+", world.captions[source])
        words = re.findall(r"\w+", text)
        changed = [(a, b) for a, b in zip(original, words) if a != b]
        if kind == script.IN_DISTRIBUTION:
            assert changed == []
            continue
        variant = script.VARIANTS[kind]
        assert len(words) == len(original) and len(changed) == 1
        assert changed[0] == (variant.word(world.scenes[source]), changed[0][1])
        assert changed[0][1] in variant.replacements
    masks = script.groups(queries)
    assert set(masks) == {"colour", "shape", "other", *(f"{v.slot}/{k}" for k, v in script.VARIANTS.items())}
    assert masks["shape"].sum() == 6 * 3 and masks["other"].sum() == 6 * 4


def test_aurocs_per_slot_against_the_better_max_cosine_baseline(run):
    script, figures, _ = run
    assert set(figures["auroc"]) >= set(script.SLOTS)
    for name, entry in figures["auroc"].items():
        signals = entry["signals"]
        assert entry["best_baseline"] in script.BASELINES
        assert signals[entry["best_baseline"]]["auroc"] == max(signals[b]["auroc"] for b in script.BASELINES)
        warning = signals["query_percentile"]
        assert warning["ci"][0] <= warning["auroc"] <= warning["ci"][1]
        assert warning["minus_best_baseline"] == pytest.approx(
            warning["auroc"] - signals[entry["best_baseline"]]["auroc"])
        low, high = warning["minus_best_baseline_ci"]
        assert low <= warning["minus_best_baseline"] <= high
    assert figures["auroc"]["colour"]["signals"]["query_percentile"]["auroc"] > 0.6  # unseen colours stand out


def test_warning_rates_and_table(run):
    script, figures, _ = run
    rates = figures["warning_rates"]
    assert set(rates) == {script.IN_DISTRIBUTION, *script.SLOTS, *figures["auroc"]} - {None}
    for entry in rates.values():
        assert entry["rate"] == pytest.approx(entry["warned"] / entry["queries"])
        assert entry["ci"][0] <= entry["rate"] <= entry["ci"][1]
    assert np.isfinite(rates[script.IN_DISTRIBUTION]["rate"])


def test_tables_render_from_the_record(run):
    script, _, saved = run
    blocks = script.formatters.FORMATTERS["query_warnings"](saved)
    lines = blocks[1].splitlines()
    assert lines[0].startswith("| slot | unseen queries | query warning | best max-cosine baseline |")
    assert [line.split(" | ")[0] for line in lines[2:5]] == ["| colour", "| shape", "| other"]
    assert blocks[2].startswith("False alarms") and "star" in blocks[3]
