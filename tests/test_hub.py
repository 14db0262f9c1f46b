"""Fetching BayesVLM's published factors: offline failure, pre-filling, sha256 checks."""

import shutil

import pytest

from bayesretrieval.encoders import file_sha256
from bayesretrieval.posterior import hub
from bayesretrieval.posterior.hub import (
    BAYESVLM_VIT_B_32,
    PosteriorUnavailableError,
    fetch_published_files,
    load_published_posterior,
)


def test_hard_coded_digests_match_the_shared_copy(bayesvlm_dir):
    for name, digest in BAYESVLM_VIT_B_32.files.items():
        assert file_sha256(bayesvlm_dir / name) == digest


def test_offline_fails_at_once_and_says_where(tmp_path, monkeypatch):
    monkeypatch.setenv("BAYESRETRIEVAL_OFFLINE", "1")
    monkeypatch.setattr(hub.urllib.request, "urlopen", lambda *a, **k: pytest.fail("no download offline"))
    with pytest.raises(PosteriorUnavailableError, match=f"into {tmp_path}"):
        fetch_published_files(cache=tmp_path)


def test_prefill_from_local_folder_then_cache_hit(tmp_path, bayesvlm_dir, monkeypatch):
    monkeypatch.setenv("BAYESRETRIEVAL_OFFLINE", "1")
    cache = tmp_path / "cache"
    pair = load_published_posterior(cache=cache, source_dir=bayesvlm_dir)
    assert pair.image.in_features == 768 and pair.text.out_features == 512
    assert pair.model.model_name == "ViT-B-32" and pair.source.startswith("bayesvlm:")
    again = load_published_posterior(cache=cache)
    assert again.fingerprint == pair.fingerprint


def test_tampered_file_is_rejected(tmp_path, bayesvlm_dir):
    source = tmp_path / "source"
    shutil.copytree(bayesvlm_dir, source)
    (source / "prior_precision_analytic.json").write_text('{"lambda_img": 1}')
    with pytest.raises(ValueError, match="published file has 575115c9"):
        fetch_published_files(cache=tmp_path / "cache", source_dir=source)


def test_download_path_verifies_and_falls_back(tmp_path, bayesvlm_dir, monkeypatch):
    monkeypatch.delenv("BAYESRETRIEVAL_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    served = []

    def fake_urlopen(url, timeout):
        served.append(url)
        name = url.rsplit("/", 1)[-1]
        if "raw.githubusercontent" in url:  # an LFS pointer instead of the content
            return (open(bayesvlm_dir / "prior_precision_analytic.json", "rb") if name.endswith(".pt")
                    else open(bayesvlm_dir / name, "rb"))
        return open(bayesvlm_dir / name, "rb")

    monkeypatch.setattr(hub.urllib.request, "urlopen", fake_urlopen)
    folder = fetch_published_files(cache=tmp_path)
    assert all(file_sha256(folder / n) == d for n, d in BAYESVLM_VIT_B_32.files.items())
    assert any("media.githubusercontent.com/media/AaltoML/BayesVLM/855be8b6" in u for u in served)
    assert not list(tmp_path.glob(".*"))


def test_unknown_model_names_both():
    with pytest.raises(ValueError, match="bayes-tiny/None; published ones: ViT-B-32/laion2b_s34b_b79k"):
        load_published_posterior("bayes-tiny", None)
