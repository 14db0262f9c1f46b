"""Kronecker posterior: construction, loaders, our format, shape checks."""

import json
import math

import pytest
import reference
import torch
from safetensors.torch import save_file

from bayesretrieval.encoders import ClipEncoder, ModelIdentity
from bayesretrieval.posterior import (
    KroneckerPosterior,
    PosteriorPair,
    load_bayesvlm_base,
    load_bayesvlm_posterior,
    load_posterior,
    save_bayesvlm_directory,
)


def _pair(gen, h_image=6, h_text=5, dim=4):
    image = KroneckerPosterior.from_factors(
        reference.random_spd(h_image, gen), reference.random_spd(dim, gen), 2.0, 30.0, "image")
    text = KroneckerPosterior.from_factors(
        reference.random_spd(h_text, gen), reference.random_spd(dim, gen), 2.0, 40.0, "text")
    return PosteriorPair(image, text, source="test", model=ModelIdentity("bayes-tiny", None))


def test_from_factors_follows_math_section_2():
    gen = torch.Generator().manual_seed(0)
    A, B = reference.random_spd(6, gen), reference.random_spd(4, gen)
    B_asym = B + 1e-6 * torch.randn(4, 4, generator=gen, dtype=torch.float64)
    post = KroneckerPosterior.from_factors(A, B_asym, 10.0, 200.0, "image")
    expected_a_inv = torch.linalg.inv(math.sqrt(10) * A + math.sqrt(200) * torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(post.a_inv, expected_a_inv)
    torch.testing.assert_close(post.output_cov, post.output_cov.T, rtol=0, atol=0)
    acts = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    q = torch.stack([a @ expected_a_inv @ a for a in acts])
    torch.testing.assert_close(post.activation_scale(acts), q)
    torch.testing.assert_close(post.embedding_variance(acts), q[:, None] * torch.diagonal(post.output_cov)[None])


def test_sampled_projection_noise_has_kronecker_covariance():
    gen = torch.Generator().manual_seed(3)
    post = KroneckerPosterior.from_factors(
        reference.random_spd(3, gen), reference.random_spd(2, gen), 1.0, 2.0, "text")
    noise = post.sample_projection_noise(200_000, gen)
    a = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    empirical = torch.cov((a @ noise).T)
    torch.testing.assert_close(empirical, post.embedding_covariance(a), rtol=0.03, atol=1e-3)


def test_bad_prior_and_shape_errors_name_values():
    gen = torch.Generator().manual_seed(1)
    with pytest.raises(ValueError, match="must be positive"):
        KroneckerPosterior.from_factors(reference.random_spd(3, gen), reference.random_spd(3, gen), 0, 1, "image")
    post = _pair(gen).image
    with pytest.raises(ValueError, match=r"shape \(6, 4\).*has \(64, 64\)"):
        post.check_projection((64, 64), "bayes-tiny")
    with pytest.raises(ValueError, match=r"activations must have shape \(N, 6\)"):
        post.activation_scale(torch.zeros(2, 5))


def test_posterior_of_another_width_is_rejected_by_encoder_check():
    encoder = ClipEncoder.from_pretrained("bayes-tiny", None)
    with pytest.raises(ValueError, match=r"covers a projection of shape \(6, 4\), bayes-tiny has \(64, 64\)"):
        _pair(torch.Generator().manual_seed(2)).check_encoder(encoder)


def test_project_format_round_trip_keeps_content_and_fingerprint(tmp_path):
    pair = _pair(torch.Generator().manual_seed(4))
    pair.save(tmp_path / "post")
    loaded = load_posterior(tmp_path / "post")
    assert loaded.fingerprint == pair.fingerprint
    assert loaded.model == pair.model and loaded.source == "test"
    torch.testing.assert_close(loaded.text.a_inv, pair.text.a_inv, rtol=0, atol=0)
    overridden = load_posterior(tmp_path / "post", prior_precision=(5.0, 6.0))
    assert (overridden.image.prior_precision, overridden.text.prior_precision) == (5.0, 6.0)
    assert overridden.fingerprint != pair.fingerprint


def test_tampered_project_format_is_detected(tmp_path):
    pair = _pair(torch.Generator().manual_seed(5))
    pair.save(tmp_path / "post")
    meta_path = tmp_path / "post" / "posterior.json"
    meta = json.loads(meta_path.read_text())
    meta["fingerprint"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="fingerprint"):
        PosteriorPair.load(tmp_path / "post")


def test_bayesvlm_directory_loads_with_json_values_and_overrides(bayesvlm_dir):
    image, text = load_bayesvlm_posterior(bayesvlm_dir)
    assert (image.in_features, image.out_features, text.in_features) == (768, 512, 512)
    prior = json.loads((bayesvlm_dir / "prior_precision_analytic.json").read_text())
    assert image.prior_precision == prior["lambda_img"] and text.pseudo_data_count == prior["n_txt"]
    assert torch.linalg.eigvalsh(image.output_cov).min() > 0
    pair = load_bayesvlm_posterior(bayesvlm_dir, pseudo_data_count=10, prior_precision=(2997.9, 2538.1))
    assert (pair.image.pseudo_data_count, pair.text.prior_precision) == (10, 2538.1)
    assert torch.trace(pair.image.output_cov) < torch.trace(image.output_cov)


def test_bayesvlm_directory_round_trip(tmp_path, bayesvlm_dir):
    pair = load_bayesvlm_posterior(bayesvlm_dir)
    save_bayesvlm_directory(pair, tmp_path / "hessians")
    again = load_bayesvlm_posterior(tmp_path / "hessians")
    torch.testing.assert_close(again.image.a_inv, pair.image.a_inv, rtol=1e-6, atol=0)
    assert again.text.prior_precision == pytest.approx(pair.text.prior_precision)


def test_bayesvlm_base_buffers_give_diagonal_posterior(tmp_path):
    gen = torch.Generator().manual_seed(6)
    tensors = {
        "image_a_inv": reference.random_spd(6, gen).float(), "image_b_diag": torch.rand(4, generator=gen),
        "text_a_inv": reference.random_spd(5, gen).float(), "text_b_diag": torch.rand(4, generator=gen),
        "clip.visual_projection.weight": torch.zeros(4, 6),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    pair = load_posterior(tmp_path / "model.safetensors")
    assert pair.image.is_diagonal and pair.text.is_diagonal
    torch.testing.assert_close(pair.text.output_var, tensors["text_b_diag"].double())
    del tensors["text_b_diag"]
    save_file(tensors, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError, match="text_b_diag"):
        load_bayesvlm_base(tmp_path / "broken.safetensors")


def test_unknown_posterior_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_posterior(tmp_path / "missing")
    with pytest.raises(ValueError, match="neither a posterior directory"):
        load_posterior(tmp_path)
