"""ViT-B-32 shapes end to end: random open_clip weights with BayesVLM's published posterior."""

import numpy as np
import pytest
from conftest import write_images

from bayesretrieval.encoders import ClipEncoder
from bayesretrieval.indexing import BuildConfig, build_index
from bayesretrieval.posterior.hub import load_published_posterior
from bayesretrieval.store import IndexReader


@pytest.mark.slow
def test_vit_b_32_with_published_posterior(tmp_path, bayesvlm_dir, monkeypatch):
    monkeypatch.setenv("BAYESRETRIEVAL_OFFLINE", "1")
    posterior = load_published_posterior(cache=tmp_path / "cache", source_dir=bayesvlm_dir)
    encoder = ClipEncoder.from_pretrained("ViT-B-32", None)
    write_images(tmp_path / "img", [f"v{i}.jpg" for i in range(6)])
    report = build_index(tmp_path / "img", tmp_path / "idx", encoder, posterior, BuildConfig(batch_size=4, workers=1))
    reader = IndexReader.open(tmp_path / "idx")
    assert report.indexed == 6 and reader.embed_dim == 512
    assert reader.posterior.fingerprint == posterior.fingerprint
    assert reader.manifest.posterior["image"]["in_features"] == 768
    assert np.all(reader.scalars[:, 0] > 0) and np.isfinite(reader.scalars).all()
