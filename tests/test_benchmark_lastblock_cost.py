"""benchmarks/lastblock_cost.py end to end with the test model (``--quick``): record, timings, storage, content."""

import json

from benchmark_scripts import benchmark_module


def test_quick_run_records_every_method_and_form(tmp_path):
    with benchmark_module("lastblock_cost") as script:
        figures = script.main(["--quick", "--work", str(tmp_path / "work"), "--output", str(tmp_path / "out.json")])
        table = script.table(figures)
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["benchmark"] == "lastblock_cost" and saved["figures"]["model"] == "bayes-tiny"
    dim, rank = figures["embed_dim"], script.QUICK["rank"]
    forms = ["diag", f"lowrank:{rank}"]
    assert set(figures["seconds_per_item"]) == {"tower", "projection/kfac", *(f"{p}/{f}" for p in
                                                ("projection", "lastblock") for f in forms)}
    assert all(seconds > 0 for seconds in figures["seconds_per_item"].values())
    assert figures["ratio_to_tower"]["tower"] == 1.0
    assert set(figures["ratio_to_tower"]) == set(figures["seconds_per_item"])
    assert figures["bytes_per_item"] == {"mean": 4 * dim, "scalars": 48, "kfac": 0, "diag": 4 * dim,
                                         f"lowrank:{rank}": 4 * (rank + 1) * dim}
    assert figures["fit_seconds"]["pairs"] == script.QUICK["n_fit"] and figures["fit_seconds"]["lastblock"] > 0
    content = figures["covariance"]
    assert all(0 < share < 1 for share in content["share_outside_projection"])
    assert all(0 < share <= 1 for share in content[f"share_in_top_{rank}"])
    assert "| lastblock/diag |" in table
