"""The last-block Laplace posterior (docs/math.md section 13): curvature and item covariance against autograd.

References are independent of the head code: Jacobians of the whole open_clip image tower
(its own forward, ``nn.MultiheadAttention`` included) with respect to each covered
layer's weight, by ``torch.autograd.functional.jacobian`` through ``functional_call``, and
the InfoNCE Gauss-Newton matrix from the logits' Jacobian and the cross-entropy Hessian.
"""

import copy
import dataclasses

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from reference import random_spd
from scipy.stats import spearmanr
from torch.func import functional_call, jacrev

from bayesretrieval.encoders import ClipEncoder, ModelIdentity
from bayesretrieval.posterior.curvature import activation_outer_sum, infonce_ggn_sum
from bayesretrieval.posterior.lastblock import BlockScope, LastBlockHead
from bayesretrieval.posterior.lastblock_fit import LastBlockFitter, chunk_curvature, kfac_factors
from bayesretrieval.posterior.lastblock_posterior import (
    LastBlockPosterior,
    covariance_factors,
    embedding_covariance,
    item_covariance,
)
from bayesretrieval.training import ModelSize, get_trained_model, model_name
from bayesretrieval.world import make_world

LOGIT_SCALE = 3.0


@pytest.fixture(scope="module")
def micro():
    """A float64 open_clip ViT (width 8, MLP 32, D = 6) and its head over the attention output and MLP."""
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=6, vision_cfg={"image_size": 16, "patch_size": 8, "width": 8, "layers": 2,
                                                    "head_width": 4},
                           text_cfg={"context_length": 8, "vocab_size": 64, "width": 8, "heads": 2, "layers": 1})
    with torch.no_grad():  # non-trivial layer norms, so their Jacobians matter
        for norm in (model.visual.transformer.resblocks[-1].ln_2, model.visual.ln_post):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0, 0.3)
    encoder = ClipEncoder(model, None, None, ModelIdentity("micro", None), dtype=torch.float64)
    images = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    targets = torch.randn(5, 6, dtype=torch.float64)
    return encoder, LastBlockHead(encoder, BlockScope.MLP_ATTENTION), images, targets


def tower_parameter_names(name: str) -> tuple[str, str | None]:
    """The ``model.visual`` parameter names of a covered layer's weight and bias."""
    if name == "proj":
        return "proj", None
    prefix = f"transformer.resblocks.1.{name}"
    return f"{prefix}.weight", f"{prefix}.bias"


def tower_jacobian(encoder, name: str, weight: torch.Tensor, images: torch.Tensor, fn) -> torch.Tensor:
    """Jacobian of ``fn(embeddings of images)`` with respect to a layer's ``(in, out)`` weight, flattened row-major."""
    weight_name, bias_name = tower_parameter_names(name)

    def run(matrix):
        params = {weight_name: matrix} if bias_name is None else {weight_name: matrix[:-1].T, bias_name: matrix[-1]}
        return fn(functional_call(encoder.model.visual, params, (images,)))

    jacobian = torch.autograd.functional.jacobian(run, weight)
    return jacobian.reshape(jacobian.shape[0], -1)


def exact_ggn(encoder, name, weight, image, targets):
    """The InfoNCE GGN block of one layer for one image: ``J_logits^T (diag p - p p^T) J_logits``."""
    targets_hat = targets / targets.norm(dim=1, keepdim=True)

    def logits(embeds):
        return LOGIT_SCALE * targets_hat @ (embeds[0] / embeds[0].norm())

    jacobian = tower_jacobian(encoder, name, weight, image[None], logits)
    probs = torch.softmax(logits(encoder.encode_image_batch(image[None]).embeds), dim=0)
    return jacobian.T @ (torch.diag(probs) - torch.outer(probs, probs)) @ jacobian


def test_head_reproduces_the_tower(micro):
    encoder, head, images, _ = micro
    linearisation = head.linearise(head.inputs(images))
    torch.testing.assert_close(linearisation.embeds, encoder.encode_image_batch(images).embeds, rtol=1e-12, atol=1e-12)
    assert torch.equal(linearisation.jacobians["proj"], torch.eye(6, dtype=torch.float64).expand(3, 6, 6))


@pytest.mark.parametrize("name", BlockScope.MLP_ATTENTION.layers)
def test_one_source_kronecker_factors_are_the_exact_ggn_block(micro, name):
    encoder, head, images, targets = micro
    weight = head.weights()[name]
    for image in images:
        outer, ggn = chunk_curvature(head, head.inputs(image[None]), targets, LOGIT_SCALE)[name]
        exact = exact_ggn(encoder, name, weight, image, targets)
        torch.testing.assert_close(torch.kron(outer, ggn), exact, rtol=1e-9, atol=1e-11)


def test_several_sources_sum_kronecker_terms_and_kfac_is_their_product_of_sums(micro):
    encoder, head, images, targets = micro
    name = "mlp.c_fc"
    weight = head.weights()[name]
    exact = sum(exact_ggn(encoder, name, weight, image, targets) for image in images)
    singles = [chunk_curvature(head, head.inputs(image[None]), targets, LOGIT_SCALE)[name] for image in images]
    torch.testing.assert_close(sum(torch.kron(o, g) for o, g in singles), exact, rtol=1e-9, atol=1e-11)
    sums = chunk_curvature(head, head.inputs(images), targets, LOGIT_SCALE, source_batch=2)
    torch.testing.assert_close(sums[name][0], sum(o for o, _ in singles))
    torch.testing.assert_close(sums[name][1], sum(g for _, g in singles))
    A, B = kfac_factors(sums, len(images))[name]
    torch.testing.assert_close(torch.kron(A, B), torch.kron(sums[name][0], sums[name][1]) / len(images))
    assert (torch.kron(A, B) - exact).norm() > 1e-3 * exact.norm()  # KFAC is an approximation for N > 1


def test_projection_factors_are_the_projection_posteriors(micro):
    encoder, head, images, targets = micro
    encoded = encoder.encode_image_batch(images)
    outer, ggn = chunk_curvature(head, head.inputs(images), targets, LOGIT_SCALE)["proj"]
    torch.testing.assert_close(outer, activation_outer_sum(encoded.activations))
    torch.testing.assert_close(ggn, infonce_ggn_sum(encoded.embeds, targets, LOGIT_SCALE), rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def random_posterior(micro):
    _, head, _, _ = micro
    generator = torch.Generator().manual_seed(1)
    factors = {name: (random_spd(w.shape[0], generator), random_spd(w.shape[1], generator))
               for name, w in head.weights().items()}
    return LastBlockPosterior.from_factors(factors, 4.0, 2.0, BlockScope.MLP_ATTENTION, num_pairs=10)


def full_covariance(encoder, head, posterior, image):
    """``J Sigma_theta J^T`` with the full Jacobian and the explicit Kronecker covariance of every layer."""
    total = 0
    for name, weight in head.weights().items():
        jacobian = tower_jacobian(encoder, name, weight, image[None], lambda embeds: embeds[0])
        layer = posterior.layers[name]
        total = total + jacobian @ torch.kron(layer.a_inv, layer.output_cov) @ jacobian.T
    return total


def test_item_covariance_is_the_full_linearised_covariance(micro, random_posterior):
    encoder, head, images, _ = micro
    covariance = embedding_covariance(random_posterior, head.linearise(head.inputs(images)))
    for image, got in zip(images, covariance):
        torch.testing.assert_close(got, full_covariance(encoder, head, random_posterior, image), rtol=1e-10,
                                   atol=1e-12)


def test_item_covariance_matches_monte_carlo_over_sampled_weights(micro, random_posterior):
    encoder, head, images, _ = micro
    generator = torch.Generator().manual_seed(2)
    draws = 40_000
    outputs = 0
    for name, weight in head.weights().items():
        jacobian = tower_jacobian(encoder, name, weight, images[:1], lambda embeds: embeds[0])
        noise = random_posterior.layers[name].sample_projection_noise(draws, generator)
        outputs = outputs + noise.reshape(draws, -1) @ jacobian.T
    sampled = torch.cov(outputs.T)
    covariance = embedding_covariance(random_posterior, head.linearise(head.inputs(images[:1])))[0]
    assert (sampled - covariance).norm() < 0.03 * covariance.norm()


def test_truncations_keep_the_diagonal_and_the_top_eigenpairs(micro, random_posterior):
    _, head, images, _ = micro
    covariance = embedding_covariance(random_posterior, head.linearise(head.inputs(images)))
    diagonal = torch.diagonal(covariance, dim1=1, dim2=2)
    diag = covariance_factors(covariance, "diag")
    assert diag.variance_lowrank is None and diag.nbytes_per_item() == 6 * 4
    np.testing.assert_allclose(diag.variance_diag, diagonal.numpy(), rtol=1e-6)
    low = covariance_factors(covariance, "lowrank:2")
    lowrank = torch.from_numpy(low.variance_lowrank).double()
    eigvals, eigvecs = torch.linalg.eigh(covariance)
    top = eigvecs[:, :, -2:] @ torch.diag_embed(eigvals[:, -2:]) @ eigvecs[:, :, -2:].transpose(1, 2)
    torch.testing.assert_close(lowrank.transpose(1, 2) @ lowrank, top, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(low.variance_diag + (low.variance_lowrank**2).sum(1), diagonal.numpy(), rtol=1e-5)
    full = covariance_factors(covariance, "lowrank:6")
    rebuilt = torch.from_numpy(full.variance_lowrank).double()
    torch.testing.assert_close(rebuilt.transpose(1, 2) @ rebuilt, covariance, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="diag or lowrank"):
        covariance_factors(covariance, "kfac")


def test_save_load_and_prior_change(tmp_path, random_posterior):
    loaded = LastBlockPosterior.load(random_posterior.save(tmp_path / "lastblock"))
    assert loaded.scope is BlockScope.MLP_ATTENTION and loaded.prior_precision == 2.0
    for name, layer in random_posterior.layers.items():
        torch.testing.assert_close(loaded.layers[name].a_inv, layer.a_inv)
        torch.testing.assert_close(loaded.layers[name].output_cov, layer.output_cov)
    sharper = loaded.with_prior(prior_precision=20.0)
    assert torch.trace(sharper.layers["proj"].output_cov) < torch.trace(loaded.layers["proj"].output_cov)
    assert loaded.fingerprint == random_posterior.fingerprint != sharper.fingerprint


def test_the_fingerprint_does_not_depend_on_how_the_inverses_round(tmp_path, random_posterior):
    """The inverses are rebuilt on every load; an index records the fingerprint and compares it on update."""
    saved = random_posterior.save(tmp_path / "lastblock")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = LastBlockPosterior.load(saved)
        torch.set_num_threads(max(2, threads))
        several = LastBlockPosterior.load(saved)
    finally:
        torch.set_num_threads(threads)
    assert single.fingerprint == several.fingerprint == random_posterior.fingerprint
    rounded = LastBlockPosterior(
        {name: dataclasses.replace(layer, a_inv=layer.a_inv * (1 + 1e-12)) for name, layer in single.layers.items()},
        single.scope, single.num_pairs, single.source, single.model)
    assert rounded.fingerprint == single.fingerprint


@pytest.fixture(scope="module")
def trained():
    """The trained test model, a last-block posterior fitted on 256 world pairs, and 120 test images."""
    encoder = ClipEncoder.from_pretrained(model_name(ModelSize.TEST), get_trained_model(ModelSize.TEST))

    def preprocess(world):
        return torch.stack([encoder.preprocess(Image.fromarray(image)) for image in world.images])

    fitting = make_world(256, seed=1, part="train")
    images = preprocess(fitting)
    batches = [(images[i:i + 128], fitting.captions[i:i + 128]) for i in range(0, 256, 128)]
    fitter = LastBlockFitter(chunk_size=128).fit_batches(encoder, batches)
    return encoder, fitter, preprocess(make_world(120, seed=5))


def test_fit_on_the_trained_model(trained):
    encoder, fitter, images = trained
    assert fitter.num_pairs_ == 256 and fitter.num_dropped_ == 0 and fitter.prior_precision_ > 0
    assert fitter.posterior_.model == encoder.identity
    means, activations, factors = item_covariance(encoder, fitter.posterior_, images, "lowrank:4", batch_size=50)
    encoded = encoder.encode_image_batch(images)
    torch.testing.assert_close(means, encoded.embeds)
    torch.testing.assert_close(activations, encoded.activations)
    assert factors.variance_lowrank.shape == (120, 4, encoder.embed_dim) and np.all(factors.variance_diag >= 0)


def test_item_variance_is_not_a_function_of_the_pooled_activation(trained):
    """Same pooled activation (so same mean and projection-posterior q), different last-block variance.

    ``ln_post`` gives one output for ``x`` and ``1.3 x``; Newton's method finds the class
    token's residual that makes the last block output ``1.3 x``. Over real images the new
    variance also ranks items differently from the projection posterior's ``q``.
    """
    encoder, fitter, images = trained
    encoder = ClipEncoder(copy.deepcopy(encoder.model), None, None, encoder.identity, dtype=torch.float64)
    posterior = fitter.posterior_
    head = LastBlockHead(encoder, posterior.scope)
    inputs = head.inputs(images[:1].double())
    block = head.block

    def block_output(residual):
        x = residual + block.ls_1(block.attn.out_proj(inputs.context[0]))
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    target = 1.3 * block_output(inputs.residual[0]).detach()
    residual = 1.3 * inputs.residual[0]
    for _ in range(20):
        residual = residual - torch.linalg.solve(jacrev(block_output)(residual), block_output(residual) - target)
    moved = type(inputs)(residual[None].detach(), inputs.context)
    pair = [head.linearise(x) for x in (inputs, moved)]
    torch.testing.assert_close(pair[1].inputs["proj"], pair[0].inputs["proj"], rtol=1e-5, atol=1e-5)  # LN's eps
    variances = [torch.trace(embedding_covariance(posterior, lin)[0]) for lin in pair]
    assert abs(variances[1] / variances[0] - 1) > 0.05, variances

    linearisation = head.linearise(head.inputs(images.double()))
    total = torch.diagonal(embedding_covariance(posterior, linearisation), dim1=1, dim2=2).sum(1)
    scale = posterior.layers["proj"].activation_scale(linearisation.inputs["proj"])
    assert spearmanr(total.numpy(), scale.numpy()).statistic < 0.97
