"""The post-hoc aleatoric head: fitted by the retrieval likelihood, it gives hub images their variance."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bayesretrieval.posterior.aleatoric import AleatoricHead
from bayesretrieval.similarity import probit_log_probabilities

D, H, S = 64, 6, 30.0


def pairs(n, seed):
    """Noisy captions of random images; a tenth of the images (activation 0 above 1.28) are hubs.

    Every caption shares a common direction that the hubs sit on, so a hub outscores the
    right image for many captions: the ambiguity a weight posterior cannot see.
    """
    g = torch.Generator().manual_seed(seed)
    activations = torch.randn(n, H, generator=g, dtype=torch.float64)
    hub = activations[:, 0] > 1.28
    common = F.normalize(torch.randn(D, generator=g, dtype=torch.float64), dim=0)
    images = F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=1)
    texts = images + 0.3 * torch.randn(n, D, generator=g, dtype=torch.float64) + common
    images[hub] = F.normalize(common + 0.2 * torch.randn(int(hub.sum()), D, generator=g, dtype=torch.float64), dim=1)
    return activations, images, texts, hub


def log_likelihood(head, activations, images, texts):
    variance = torch.zeros(len(images), dtype=torch.float64) if head is None else head.variance(activations)
    cosines = F.normalize(texts, dim=1) @ F.normalize(images, dim=1).T
    return float(probit_log_probabilities(S * cosines, S**2 * variance[None, :], dim=1).diagonal().mean())


def test_the_head_is_a_log_linear_model_of_the_standardised_activation():
    head = AleatoricHead(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0]), torch.tensor([0.5, -1.0]), -3.0)
    expected = math.exp(0.5 * (3.0 - 1.0) / 2.0 - 1.0 * (2.0 - 2.0) / 4.0 - 3.0)
    assert float(head.variance(torch.tensor([[3.0, 2.0]]))[0]) == pytest.approx(expected)


def test_fitting_gives_hubs_their_variance_and_raises_the_held_out_likelihood():
    head = AleatoricHead.fit(*pairs(3000, seed=0)[:3], logit_scale=S, steps=200, batch_size=128, seed=1)
    activations, images, texts, hub = pairs(1000, seed=2)
    variance = head.variance(activations)
    assert float(variance[hub].median()) > 5 * float(variance[~hub].median())
    auroc = (np.argsort(np.argsort(variance.numpy()))[hub.numpy()].mean() - (hub.sum() - 1) / 2) / (~hub).sum()
    assert auroc > 0.9
    assert log_likelihood(head, activations, images, texts) > log_likelihood(None, activations, images, texts) + 0.5
