"""Choosing the posterior's prior and pseudo-data count for retrieval instead of by the evidence.

The evidence picks ``lambda`` for a fixed ``n`` by how well the Laplace approximation
explains the fitting pairs; nothing in it asks whether the resulting ``E[cos]`` and
``Var[cos]`` rank and weigh a gallery well. Here ``(n, lambda)`` (shared by both towers)
is chosen on held-out image-caption pairs by the retrieval likelihood: for every caption,
the probit softmax over the batch's images (docs/math.md section 6, with ``E[cos]`` and
``Var[cos]`` from :func:`~bayesretrieval.similarity.cosine_moments`) should put its mass
on the caption's own image. The batch is a stand-in for a gallery, so the choice is a
task-level fit of two numbers, the Bayesian analogue of temperature scaling.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from bayesretrieval.posterior.fit import REFERENCE_PAIRS, EncodedPairs, reference_percentiles
from bayesretrieval.posterior.io import PosteriorPair
from bayesretrieval.similarity import DEFAULT_ESTIMATOR, CosineEstimator, cosine_moments, probit_log_probabilities

DEFAULT_FACTORS = tuple(float(f) for f in np.geomspace(1e-4, 1e4, 17))
"""Multipliers of the posterior's own ``n`` and ``lambda`` searched (each axis)."""
DEFAULT_BATCH = 2048
"""Most pairs per softmax batch: more pairs are split into the fewest near-equal consecutive batches."""


def retrieval_log_likelihood(posterior: PosteriorPair, pairs: EncodedPairs, logit_scale: float,
                             estimator: CosineEstimator | str = DEFAULT_ESTIMATOR,
                             batch_size: int = DEFAULT_BATCH) -> float:
    """Mean log probability, under the probit softmax over the batch's images, of each caption's own image.

    Args:
        posterior: the posterior pair.
        pairs: matched held-out pairs (row ``i`` of each side belongs together).
        logit_scale: ``s``.
        estimator: how ``E[cos]`` and ``Var[cos]`` are computed.
        batch_size: most pairs per softmax; more pairs are split into the fewest
            consecutive batches of near-equal size, which bounds memory to
            ``batch_size^2`` moments.
    """
    rows = torch.arange(len(pairs)).chunk(math.ceil(len(pairs) / batch_size))
    totals = [len(part) * _batch_log_likelihood(posterior, pairs.take(part), logit_scale, estimator) for part in rows]
    return float(sum(totals) / len(pairs))


def _batch_log_likelihood(posterior: PosteriorPair, pairs: EncodedPairs, logit_scale: float,
                          estimator: CosineEstimator | str) -> float:
    mean, var = cosine_moments(pairs.image_embeds.double(), posterior.image.activation_scale(pairs.image_activations),
                               posterior.image.output_cov, pairs.text_embeds.double(),
                               posterior.text.activation_scale(pairs.text_activations), posterior.text.output_cov,
                               estimator)  # (images, captions)
    return float(probit_log_probabilities(logit_scale * mean, logit_scale**2 * var, dim=0).diagonal().mean())


def tune_prior(posterior: PosteriorPair, pairs: EncodedPairs, logit_scale: float,
               factors: tuple[float, ...] = DEFAULT_FACTORS,
               estimator: CosineEstimator | str = DEFAULT_ESTIMATOR) -> tuple[PosteriorPair, dict]:
    """The posterior rebuilt with the ``(n, lambda)`` of the best retrieval likelihood on ``pairs``.

    Searches ``n' = f_n n`` and ``lambda' = f_l lambda`` over ``factors`` on both axes (each
    tower keeps its own evidence ``lambda`` times the common factor).

    Args:
        posterior: the fitted pair, with its raw curvature factors.
        pairs: matched held-out pairs the posterior was not fitted on.
        logit_scale: ``s`` of the model.
        factors: the grid of multipliers.
        estimator: how ``E[cos]`` and ``Var[cos]`` are computed.

    Returns:
        ``(posterior, report)``: the rebuilt pair (source marked ``task-prior``; its query
        warning reference recomputed on a seeded uniform sample of at most
        :data:`REFERENCE_PAIRS` of ``pairs``, as the old one described the old prior) and
        ``{"n_factor", "lambda_factor", "log_likelihood", "evidence_log_likelihood", "grid"}``.

    Raises:
        ValueError: if the posterior has no raw curvature factors (BayesVLM-Base files) or
            ``pairs`` is empty.
    """
    if len(pairs) == 0:
        raise ValueError("no held-out pairs to choose the prior on")
    for side in posterior:
        if side.factors is None:
            raise ValueError(f"the {side.modality.value} posterior has no raw curvature factors (a BayesVLM-Base "
                             "file?); its n and lambda cannot be chosen again")
    evidence = retrieval_log_likelihood(posterior, pairs, logit_scale, estimator)
    grid = [{"n_factor": fn, "lambda_factor": fl,
             "log_likelihood": retrieval_log_likelihood(_scaled(posterior, fn, fl), pairs, logit_scale, estimator)}
            for fn in factors for fl in factors]
    best = max(grid, key=lambda cell: cell["log_likelihood"])
    tuned = _scaled(posterior, best["n_factor"], best["lambda_factor"])
    sample = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0))[:REFERENCE_PAIRS]
    reference = reference_percentiles(pairs.take(sample), tuned)
    tuned = replace(tuned, source=f"{posterior.source} + task-prior", reference=reference)
    return tuned, {**best, "evidence_log_likelihood": evidence, "grid": grid}


def _scaled(posterior: PosteriorPair, n_factor: float, lambda_factor: float) -> PosteriorPair:
    image, text = (side.with_prior(side.pseudo_data_count * n_factor, side.prior_precision * lambda_factor)
                   for side in posterior)
    return replace(posterior, image=image, text=text)
