"""BayesCLIP: BayesVLM-Base field names, delta-method embedding variance, zero-shot."""

import pytest
import reference
import torch

from bayesretrieval.encoders import ClipEncoder
from bayesretrieval.model import BayesCLIP, normalized_embedding_variance
from bayesretrieval.posterior import KroneckerPosterior, PosteriorPair
from bayesretrieval.similarity import cosine_moments

TEXTS = ["a red circle", "a blue square", "a green triangle"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    encoder = ClipEncoder.from_pretrained("bayes-tiny", None)
    posteriors = [
        KroneckerPosterior.from_factors(reference.random_spd(64, gen), reference.random_spd(64, gen), 1.0, 400.0, m)
        for m in ("image", "text")
    ]
    return BayesCLIP(encoder, PosteriorPair(*posteriors))


def test_output_has_bayesvlm_base_fields_with_consistent_shapes(model):
    out = model(torch.randn(4, 3, 64, 64), model.encoder.tokenize(TEXTS))
    for name, shape in [("image_embeds", (4, 64)), ("text_embeds", (3, 64)),
                        ("logits_per_image", (4, 3)), ("logits_per_text", (3, 4))]:
        for suffix in ("", "_var", "_std"):
            assert getattr(out, name + suffix).shape == shape, name + suffix
        torch.testing.assert_close(getattr(out, name + "_std") ** 2, getattr(out, name + "_var"))
    torch.testing.assert_close(out.image_embeds.norm(dim=1), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(out.logits_per_text, out.logits_per_image.T)
    assert (out.logits_per_image_var > 0).all()


def test_logits_are_scaled_cosine_moments(model):
    images = model.get_image_features(torch.randn(2, 3, 64, 64))
    texts = model.get_text_features(TEXTS)
    mean, var = model.logit_moments(images, texts)
    post = model.posterior
    ref_mean, ref_var = cosine_moments(
        images.unnormalised, post.image.activation_scale(images.activations), post.image.output_cov,
        texts.unnormalised, post.text.activation_scale(texts.activations), post.text.output_cov)
    torch.testing.assert_close(mean, ref_mean * model.logit_scale)
    torch.testing.assert_close(var, ref_var * model.logit_scale**2)


def test_normalized_embedding_variance_matches_monte_carlo_for_small_noise():
    gen = torch.Generator().manual_seed(2)
    dim = 8
    cov = reference.random_spd(dim, gen, 1e-4)
    mean = torch.randn(1, dim, generator=gen, dtype=torch.float64) * 2
    draws = mean + torch.randn(400_000, dim, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    empirical = torch.nn.functional.normalize(draws, dim=1).var(0)
    predicted = normalized_embedding_variance(mean, torch.ones(1, dtype=torch.float64), cov)[0]
    torch.testing.assert_close(predicted, empirical, rtol=0.03, atol=0)


def test_zero_shot_probit_agrees_with_monte_carlo(model):
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(3, 3, 64, 64, generator=gen)
    probit = model.zero_shot_probabilities(images, TEXTS)
    monte_carlo = model.zero_shot_probabilities(images, TEXTS, method="montecarlo", num_samples=4000, generator=gen)
    torch.testing.assert_close(probit.sum(1), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(monte_carlo.sum(1), torch.ones(3, dtype=torch.float64))
    assert (probit - monte_carlo).abs().max() < 0.03
    with pytest.raises(ValueError, match="not a valid ZeroShotMethod"):
        model.zero_shot_probabilities(images, TEXTS, method="laplace")


def test_from_pretrained_requires_a_matching_posterior(tmp_path, bayesvlm_dir):
    with pytest.raises(ValueError, match="posterior is required"):
        BayesCLIP.from_pretrained("bayes-tiny", None)
    with pytest.raises(ValueError, match=r"\(768, 512\), bayes-tiny has \(64, 64\)"):
        BayesCLIP.from_pretrained("bayes-tiny", None, posterior=bayesvlm_dir)


def test_image_similarity_knows_an_image_is_itself(model):
    images = model.get_image_features(torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(4)))
    mean, var = model.image_similarity(images, images)
    torch.testing.assert_close(torch.diagonal(mean), torch.ones(3, dtype=torch.float64))
    assert float(torch.diagonal(var).max()) < 1e-12 and bool((var[~torch.eye(3, dtype=bool)] > 0).all())
