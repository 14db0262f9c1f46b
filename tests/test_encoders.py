"""open_clip wrapper: one pass gives embeddings and activations, unsupported heads fail clearly."""

from concurrent.futures import ThreadPoolExecutor

import open_clip
import pytest
import torch
from torch import nn

from bayesretrieval.encoders import ClipEncoder, ModelIdentity, UnsupportedModelError


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return ClipEncoder.from_pretrained("bayes-tiny", None)


def test_image_embeddings_equal_open_clip_and_project_activations(encoder):
    images = torch.randn(5, 3, 64, 64)
    encoded = encoder.encode_images(images, batch_size=2)
    torch.testing.assert_close(encoded.embeds, encoder.model.encode_image(images).detach())
    torch.testing.assert_close(encoded.activations @ encoder.image_projection, encoded.embeds)
    assert encoded.activations.shape == (5, encoder.image_projection.shape[0])
    assert encoder.model.visual.proj is not None


def test_text_embeddings_equal_open_clip(encoder):
    texts = ["a red circle", "small blue square on the left", "x"]
    encoded = encoder.encode_texts(texts, batch_size=2)
    reference = encoder.model.encode_text(encoder.tokenize(texts)).detach()
    torch.testing.assert_close(encoded.embeds, reference)
    torch.testing.assert_close(encoded.activations @ encoder.text_projection, encoded.embeds)


def test_threads_encoding_at_once_get_what_one_thread_gets(encoder):
    texts = [f"a red circle number {i}" for i in range(8)]
    images = torch.randn(8, 3, 64, 64)
    texts_alone, images_alone = encoder.encode_texts(texts).embeds, encoder.encode_images(images).embeds
    with ThreadPoolExecutor(8) as pool:
        text_runs = [pool.submit(encoder.encode_texts, [text]) for text in texts * 8]
        image_runs = [pool.submit(encoder.encode_images, images[i:i + 1]) for i in list(range(8)) * 8]
        shapes = [pool.submit(lambda: (encoder.text_projection.shape, encoder.image_projection.shape))
                  for _ in range(64)]
        assert len({run.result() for run in shapes}) == 1
        for i, run in enumerate(text_runs):
            torch.testing.assert_close(run.result().embeds[0], texts_alone[i % 8])
        for i, run in enumerate(image_runs):
            torch.testing.assert_close(run.result().embeds[0], images_alone[i % 8])
    assert encoder.model.visual.proj is not None and encoder.model.text_projection is not None


def test_one_forward_pass_per_tower(encoder):
    calls = []
    hook = encoder.model.visual.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        encoder.encode_image_batch(torch.randn(2, 3, 64, 64))
    finally:
        hook.remove()
    assert calls == [1]


def test_checkpoint_path_is_loaded_and_fingerprinted(tmp_path, encoder):
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": encoder.model.state_dict()}, path)
    again = ClipEncoder.from_pretrained("bayes-tiny", path)
    assert again.identity.checkpoint_sha256 is not None and again.identity.matches(
        ModelIdentity("bayes-tiny", "elsewhere.pt", again.identity.checkpoint_sha256))
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(again.encode_images(images).embeds, encoder.encode_images(images).embeds)


def test_float64_encoding(encoder):
    model, _, preprocess = open_clip.create_model_and_transforms("bayes-tiny")
    double = ClipEncoder(model, preprocess, encoder.tokenizer, encoder.identity, dtype=torch.float64)
    assert double.encode_images(torch.randn(1, 3, 64, 64)).embeds.dtype == torch.float64


def test_linear_text_projection_with_bias_is_unsupported(encoder):
    model, _, preprocess = open_clip.create_model_and_transforms("bayes-tiny")
    del model.text_projection
    model.text_projection = nn.Linear(64, 64, bias=True)
    with pytest.raises(UnsupportedModelError, match="bayes-tiny.*with bias"):
        ClipEncoder(model, preprocess, encoder.tokenizer, ModelIdentity("bayes-tiny", None))


def test_missing_image_projection_is_unsupported(encoder):
    model, _, preprocess = open_clip.create_model_and_transforms("bayes-tiny")
    model.visual.proj = None
    with pytest.raises(UnsupportedModelError, match="no plain linear projection"):
        ClipEncoder(model, preprocess, encoder.tokenizer, ModelIdentity("bayes-tiny", None))
