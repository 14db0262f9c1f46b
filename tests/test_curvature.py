"""Analytic InfoNCE Gauss-Newton Hessian and streaming factors vs autograd references."""

import math

import pytest
import torch

from bayesretrieval.posterior.curvature import (
    ChunkCurvature,
    infonce_ggn,
    infonce_ggn_sum,
)
from tests.reference import infonce_ggn_autograd


def _embeddings(num, dim, seed, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(num, dim, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("logit_scale", [1.0, 20.0])
def test_per_source_hessian_matches_autograd(logit_scale):
    sources, targets = _embeddings(5, 6, 0), _embeddings(7, 6, 1)
    analytic = infonce_ggn(sources, targets, logit_scale)
    for i in range(sources.shape[0]):
        reference = infonce_ggn_autograd(sources[i], targets, logit_scale, label=i)
        torch.testing.assert_close(analytic[i], reference, rtol=1e-10, atol=1e-12)


def test_hessian_does_not_depend_on_label():
    sources, targets = _embeddings(1, 4, 2), _embeddings(5, 4, 3)
    first = infonce_ggn_autograd(sources[0], targets, 5.0, label=0)
    other = infonce_ggn_autograd(sources[0], targets, 5.0, label=3)
    torch.testing.assert_close(first, other, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("source_batch", [1, 3, 64])
def test_summed_hessian_matches_sum_of_autograd(source_batch):
    sources, targets = _embeddings(9, 5, 4), _embeddings(9, 5, 5, scale=0.7)
    reference = sum(infonce_ggn_autograd(g, targets, 7.0) for g in sources)
    summed = infonce_ggn_sum(sources, targets, 7.0, source_batch=source_batch)
    torch.testing.assert_close(summed, reference, rtol=1e-10, atol=1e-12)


def test_hessian_is_orthogonal_to_the_source():
    sources, targets = _embeddings(4, 8, 6), _embeddings(10, 8, 7)
    hessians = infonce_ggn(sources, targets, 10.0)
    radial = torch.einsum("bij,bj->bi", hessians, sources)
    assert radial.abs().max() < 1e-10 * hessians.abs().max()


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"\(4, 3\) and \(5, 2\)"):
        infonce_ggn_sum(torch.ones(4, 3), torch.ones(5, 2), 1.0)


def _chunk(num, seed):
    return (
        _embeddings(num, 6, seed),
        _embeddings(num, 4, seed + 1),
        _embeddings(num, 5, seed + 2),
        _embeddings(num, 4, seed + 3),
    )


def test_streaming_factors_match_dense_sums():
    chunk_size, logit_scale = 6, 4.0
    chunks = [_chunk(chunk_size, 10 * k) for k in range(3)]
    curvature = ChunkCurvature(logit_scale, chunk_size, source_batch=4)
    for chunk in chunks:
        curvature.add_chunk(*chunk)
    num_pairs = 3 * chunk_size
    assert curvature.num_pairs == num_pairs
    image_acts = torch.cat([c[0] for c in chunks])
    a_ref = image_acts.T @ image_acts / math.sqrt(num_pairs)
    b_ref = sum(
        infonce_ggn_autograd(g, c[3], logit_scale) for c in chunks for g in c[1]
    ) / math.sqrt(num_pairs)
    A, B = curvature.factors("image")
    torch.testing.assert_close(A, a_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(B, b_ref, rtol=1e-10, atol=1e-12)
    text_b_ref = sum(
        infonce_ggn_autograd(t, c[1], logit_scale) for c in chunks for t in c[3]
    ) / math.sqrt(num_pairs)
    torch.testing.assert_close(curvature.factors("text")[1], text_b_ref, rtol=1e-10, atol=1e-12)


def test_chunk_of_wrong_size_is_an_error():
    curvature = ChunkCurvature(1.0, chunk_size=6)
    with pytest.raises(ValueError, match="chunk_size=6"):
        curvature.add_chunk(*_chunk(5, 0))


def test_factors_before_any_chunk_is_an_error():
    with pytest.raises(ValueError, match="no chunk"):
        ChunkCurvature(1.0, chunk_size=4).factors("image")


def test_float32_chunks_accumulate_close_to_float64():
    chunks = [_chunk(64, 100 + k) for k in range(4)]
    exact, single = ChunkCurvature(30.0, 64), ChunkCurvature(30.0, 64, source_batch=16)
    for chunk in chunks:
        exact.add_chunk(*chunk)
        single.add_chunk(*(t.float() for t in chunk))
    for modality in ("image", "text"):
        for got, want in zip(single.factors(modality), exact.factors(modality)):
            assert got.dtype == torch.float64
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
