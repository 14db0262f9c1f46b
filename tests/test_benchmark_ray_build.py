"""benchmarks/ray_build_speed.py end to end, quick: both engines on a few images, stage costs, the report."""

import json

import pytest
from benchmark_scripts import benchmark_module

pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[ray]'")


def test_quick_run_records_paired_ratios_and_stage_costs(tmp_path):
    with benchmark_module("ray_build_speed") as script:
        figures = script.main(["--quick", "--output", str(tmp_path / "out.json")])
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["benchmark"] == "ray_build_speed" and saved["figures"]["model"] == "bayes-tiny"
    (run,) = figures["runs"]
    assert run["ratio"] == pytest.approx(run["local_s"] / run["ray_s"]) == pytest.approx(figures["ratio"]["median"])
    assert run["ray_images_per_s"] == pytest.approx(24 / run["ray_s"])
    stages = figures["stages"]
    assert all(value > 0 for value in (stages["decode_preprocess_s_per_image_one_core"], stages["scalars_s_per_image"],
                                       stages["shard_write_read_s_per_image"], stages["publish_s_per_item"],
                                       figures["ray_fixed_s_per_build"], *stages["encode_s_per_image"].values()))
    with benchmark_module("formatters") as formatters:
        blocks = formatters.ray_build_speed(saved)
        (headline,) = formatters.ray_build_headline(saved)
    assert f"{figures['ratio']['median']:.3f}" in blocks[0] and "bayes-tiny, 24 images" in headline[0]
