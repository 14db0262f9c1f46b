"""The COCO / Flickr30k benchmark script on a tiny fake dataset in the Karpathy layout (random-init bayes-tiny)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from benchmark_scripts import benchmark_module
from conftest import random_posterior
from PIL import Image

from bayesretrieval.posterior.io import save_bayesvlm_directory

EMBED_DIM, WIDTH = 64, 64  # bayes-tiny


@pytest.fixture(scope="module")
def script():
    with benchmark_module("real_benchmarks") as module:
        yield module


def fake_dataset(root: Path, name: str, n_test: int = 12, folder: str | None = "val2014") -> Path:
    """Karpathy-style JSON plus random images; two extra images in the train split."""
    rng = np.random.default_rng(0)
    images = []
    for i in range(n_test + 2):
        filename = f"img_{i:03d}.jpg"
        place = root / (folder or "flickr30k-images")
        place.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(place / filename)
        entry = {"filename": filename, "split": "test" if i < n_test else "train",
                 "sentences": [{"raw": f"a photo number {i} variant {j} "} for j in range(6)]}
        if folder is not None:
            entry["filepath"] = folder
        images.append(entry)
    (root / f"dataset_{name}.json").write_text(json.dumps({"dataset": name, "images": images}))
    return root


@pytest.fixture(scope="module")
def posterior_dir(tmp_path_factory) -> Path:
    return save_bayesvlm_directory(random_posterior(EMBED_DIM, WIDTH), tmp_path_factory.mktemp("posterior") / "bvlm")


def test_fake_coco_end_to_end_and_embeddings_round_trip(script, tmp_path, posterior_dir):
    torch.manual_seed(0)
    root = fake_dataset(tmp_path / "coco", "coco")
    common = ["--dataset", "coco", "--model", "bayes-tiny", "--posterior", str(posterior_dir), "--force-posterior",
              "--estimators", "second_order", "published", "--chunk-size", "7"]
    first = script.main([*common, "--root", str(root), "--pretrained", "none", "--plots", str(tmp_path / "a"),
                         "--output", str(tmp_path / "a.json"), "--save-embeddings", str(tmp_path / "emb.npz")])
    assert first["images"] == 12 and first["queries"] == 60  # 5 of the 6 captions per test image
    assert first["reference_recall_map"] == {"recall@1": 39.3, "recall@5": 65.4, "recall@10": 75.6}
    written = json.loads((tmp_path / "a.json").read_text())
    assert written["benchmark"] == "real_coco" and written["config"]["chunk_size"] == 7
    for estimator in ("second_order", "published"):
        summary = written["figures"]["estimators"][estimator]
        retrieval = summary["retrieval"]["map"]
        assert 0 <= retrieval["recall@1"] <= retrieval["recall@5"] <= retrieval["recall@10"] <= 1
        assert retrieval["precision@10"] == pytest.approx(retrieval["recall@10"] / 10)  # one relevant image each
        assert summary["queries"] == {"total": 60, "held_in": 30, "held_out": 30}
        assert set(summary["signals"]) >= {"std", "flip_probability", "softmax", "margin", "cosine"}
        for plot in summary["plots"]:
            assert Path(plot).stat().st_size > 1000
    with benchmark_module("report") as report:
        assert report.section(written).count("| link | ece | brier | nll |") == 2
    # The saved encodings give the same numbers without the model or the images.
    again = script.main([*common, "--embeddings", str(tmp_path / "emb.npz"), "--plots", str(tmp_path / "b"),
                         "--output", str(tmp_path / "b.json")])
    for estimator in ("second_order", "published"):
        assert again["estimators"][estimator]["retrieval"] == first["estimators"][estimator]["retrieval"]
        for link in ("probit", "logistic_map"):
            expected = first["estimators"][estimator]["calibration"][link]
            assert again["estimators"][estimator]["calibration"][link] == pytest.approx(expected, rel=1e-5)


def test_flickr_layout_and_missing_images(script, tmp_path):
    root = fake_dataset(tmp_path / "flickr", "flickr30k", n_test=3, folder=None)
    paths, captions, text_image = script.read_karpathy(root, script.Dataset.FLICKR30K, "test", 5)
    assert [p.parent.name for p in paths] == ["flickr30k-images"] * 3
    assert len(captions) == 15 and text_image.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    (paths[1]).unlink()
    with pytest.raises(FileNotFoundError, match="img_001.jpg not found; looked at"):
        script.read_karpathy(root, script.Dataset.FLICKR30K, "test", 5)
    with pytest.raises(FileNotFoundError, match="no dataset_coco.json"):
        script.read_karpathy(root, script.Dataset.COCO, "test", 5)


def test_embeddings_file_is_validated(script, tmp_path):
    np.savez(tmp_path / "bad.npz", image_embeds=np.zeros((2, 4)))
    with pytest.raises(ValueError, match="lacks arrays"):
        script.Benchmark.load(tmp_path / "bad.npz")
