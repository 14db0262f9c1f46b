"""Text-to-image recall on a world, labelled by the world's relevance function.

Recall@k is :func:`bayesretrieval.metrics.recall_at_k`: a query counts as a hit at ``k``
when at least one of its ``k`` best-scored images is relevant to it (``relevance_matrix``).
With full-caption queries an image's own caption is always relevant to it; identical
scenes are relevant too, so duplicates do not count as misses.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from bayesretrieval import metrics
from bayesretrieval.encoders import ClipEncoder
from bayesretrieval.world.relevance import relevance_matrix
from bayesretrieval.world.render import images_to_tensor
from bayesretrieval.world.world import World

DEFAULT_KS = (1, 5, 10)


def recall_at_ks(scores, relevant, ks: Sequence[int] = DEFAULT_KS) -> dict[int, float]:
    """:func:`~bayesretrieval.metrics.recall_at_k` of a dense score matrix at several cut-offs.

    Args:
        scores: float array ``(nq, nb)``; higher is better, ties go to the smaller column.
        relevant: bool array ``(nq, nb)``.
        ks: cut-offs, each ``>= 1``.

    Returns:
        ``{k: recall}`` for every ``k`` in ``ks``.
    """
    first_hit = metrics.first_hit_rank(scores, relevant)
    return {int(k): metrics.recall_at_k(first_hit, k) for k in ks}


def similarity_scores(
    encoder: ClipEncoder, images: np.ndarray, texts: Sequence[str], batch_size: int = 256
) -> np.ndarray:
    """Cosine similarity of every text with every image.

    Args:
        encoder: the model.
        images: uint8 array ``(nb, H, W, 3)`` at the model's resolution.
        texts: ``nq`` query texts.
        batch_size: encoding batch size.

    Returns:
        float array ``(nq, nb)``.
    """
    cfg = encoder.model.visual.preprocess_cfg
    size = tuple(cfg["size"])
    if images.shape[1:3] != size:
        name = encoder.identity.model_name
        raise ValueError(f"images are {images.shape[1:3]}, model {name!r} takes {size}")
    pixels = images_to_tensor(images, cfg["mean"], cfg["std"])
    xb = torch.nn.functional.normalize(encoder.encode_images(pixels, batch_size).embeds, dim=-1)
    xq = torch.nn.functional.normalize(encoder.encode_texts(list(texts), batch_size).embeds, dim=-1)
    return (xq @ xb.T).numpy()


def world_recall(
    encoder: ClipEncoder,
    world: World,
    queries: Sequence[str] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[int, float]:
    """Text-to-image recall on a world.

    Args:
        encoder: the model.
        world: images and their scene records.
        queries: query texts; defaults to the world's own full captions.
        ks: cut-offs.

    Returns:
        ``{k: recall}``.
    """
    texts = list(world.captions if queries is None else queries)
    scores = similarity_scores(encoder, world.images, texts)
    return recall_at_ks(scores, relevance_matrix(texts, world.scenes), ks)
