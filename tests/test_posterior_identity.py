"""A posterior is used only with the weights it was fitted for (build-index, Searcher.open, BayesCLIP)."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import random_posterior, save_tiny_checkpoint, write_images

from bayesretrieval import BayesCLIP, Searcher
from bayesretrieval.encoders import ClipEncoder, ModelIdentity
from bayesretrieval.indexing import BuildConfig, build_index
from bayesretrieval.indexing.scalars import ScalarComputer
from bayesretrieval.options import TINY_MODEL
from bayesretrieval.posterior import PosteriorMismatchError, posterior_for_model, save_bayesvlm_directory
from bayesretrieval.store import IndexReader, ItemArrays, VarianceSpec, VersionInfo, write_version
from bayesretrieval.store.format import SKIPPED_SCHEMA

D = 64


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    return save_tiny_checkpoint(folder / "a.pt", seed=0), save_tiny_checkpoint(folder / "b.pt", seed=1)


@pytest.fixture(scope="module")
def encoders(checkpoints):
    return tuple(ClipEncoder.from_pretrained(TINY_MODEL, c) for c in checkpoints)


def test_identity_rules():
    published = ModelIdentity("ViT-B-32", "laion2b_s34b_b79k")
    unnamed = random_posterior(D, 64)
    assert posterior_for_model(unnamed, published).model == published
    with pytest.raises(PosteriorMismatchError, match="published factors are for ViT-B-32/laion2b_s34b_b79k"):
        posterior_for_model(unnamed, ModelIdentity("ViT-B-32", "openai"))
    with pytest.raises(PosteriorMismatchError, match="does not say which weights"):
        posterior_for_model(unnamed, ModelIdentity("ViT-B-32", "/x/laion.pt", "ab" * 32))
    fitted = random_posterior(D, 64, model=ModelIdentity("m", "/ckpt.pt", "aa" * 32))
    moved = ModelIdentity("m", "/moved/ckpt.pt", "aa" * 32)
    assert posterior_for_model(fitted, moved).model.pretrained == "/moved/ckpt.pt"
    named = r"fitted for m//ckpt.pt \(sha256 aaaa.*\), the model is m//ckpt.pt \(sha256 bbbb"
    with pytest.raises(PosteriorMismatchError, match=named):
        posterior_for_model(fitted, ModelIdentity("m", "/ckpt.pt", "bb" * 32))
    forced = posterior_for_model(fitted, ModelIdentity("m", "/ckpt.pt", "bb" * 32), force=True)
    assert forced.model.checkpoint_sha256 == "bb" * 32 and forced.source.endswith("(forced)")
    assert forced.fingerprint == fitted.fingerprint


def test_build_index_refuses_a_posterior_for_other_weights(tmp_path, encoders):
    first, second = encoders
    write_images(tmp_path / "img", ["a.png", "b.png"])
    for_second = random_posterior(D, 64, model=second.identity)
    with pytest.raises(PosteriorMismatchError, match=r"a.pt \(sha256 \w+\)") as err:
        build_index(tmp_path / "img", tmp_path / "idx", first, for_second, BuildConfig(workers=0))
    assert "b.pt" in str(err.value) and not (tmp_path / "idx" / "manifest.json").exists()
    report = build_index(tmp_path / "img", tmp_path / "idx", first, for_second,
                         BuildConfig(workers=0, force_posterior=True))
    stored = IndexReader.open(tmp_path / "idx").posterior
    assert report.indexed == 2 and stored.model == first.identity and stored.source == "random-test (forced)"


def test_cli_names_both_identities_and_force_flag(tmp_path, checkpoints, encoders, capsys):
    from bayesretrieval.cli import main

    write_images(tmp_path / "img", ["a.png"])
    random_posterior(D, 64, model=encoders[1].identity).save(tmp_path / "post_b")
    save_bayesvlm_directory(random_posterior(D, 64), tmp_path / "bvlm")
    argv = ["build-index", str(tmp_path / "img"), str(tmp_path / "idx"), "--model", TINY_MODEL,
            "--pretrained", str(checkpoints[0]), "--workers", "0", "--no-progress"]
    assert main([*argv, "--posterior", str(tmp_path / "post_b")]) == 2
    err = capsys.readouterr().err
    assert f"fitted for bayes-tiny/{checkpoints[1]}" in err and f"the model is bayes-tiny/{checkpoints[0]}" in err
    assert main([*argv, "--posterior", str(tmp_path / "bvlm")]) == 2
    assert "published factors are for ViT-B-32/laion2b_s34b_b79k" in capsys.readouterr().err
    assert main([*argv, "--posterior", str(tmp_path / "bvlm"), "--force-posterior"]) == 0


def test_bayesclip_from_pretrained_checks_the_posterior(checkpoints, encoders):
    for_second = random_posterior(D, 64, model=encoders[1].identity)
    with pytest.raises(PosteriorMismatchError, match="b.pt"):
        BayesCLIP.from_pretrained(TINY_MODEL, checkpoints[0], posterior=for_second)
    model = BayesCLIP.from_pretrained(TINY_MODEL, checkpoints[1], posterior=for_second)
    assert model.posterior.model == encoders[1].identity
    forced = BayesCLIP.from_pretrained(TINY_MODEL, checkpoints[0], posterior=for_second, force_posterior=True)
    assert forced.posterior.model == encoders[0].identity


def write_tiny_index(path, encoder, posterior_model):
    """A 3-item index for ``encoder`` whose stored posterior claims ``posterior_model``."""
    rng = np.random.default_rng(0)
    posterior = random_posterior(D, 64, model=posterior_model)
    means, activations = torch.from_numpy(rng.normal(size=(3, D))), torch.from_numpy(rng.normal(size=(3, 64)))
    scalars = ScalarComputer(posterior).from_activations(means, activations).scalars
    unknown = np.full(3, -1)
    items = ItemArrays(np.arange(3), ["a", "b", "c"], unknown, unknown, unknown.astype(np.int32),
                       unknown.astype(np.int32), means.float().numpy(), scalars)
    info = VersionInfo("images", str(path), encoder.identity.to_dict(), VarianceSpec(), None, 3)
    write_version(path, items, SKIPPED_SCHEMA.empty_table(), posterior, info)


def test_searcher_open_refuses_an_index_whose_posterior_names_other_weights(tmp_path, encoders):
    first, second = encoders
    write_tiny_index(tmp_path / "bad", first, second.identity)
    with pytest.raises(PosteriorMismatchError, match="b.pt"):
        Searcher.open(tmp_path / "bad", encoder=first)
    write_tiny_index(tmp_path / "ok", first, first.identity)
    result = Searcher.open(tmp_path / "ok", encoder=first).search(["x"], k=2)
    assert len(result) == 2 and np.isfinite(result["cosine_mean"]).all()


def test_fitted_identity_survives_save_and_load(tmp_path, encoders):
    pair = random_posterior(D, 64, model=encoders[0].identity)
    pair.save(tmp_path / "p")
    loaded = type(pair).load(tmp_path / "p")
    assert loaded.model == encoders[0].identity and replace(loaded, model=None).model is None
