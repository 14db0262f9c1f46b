"""Image queries on an index that stores activations: two images share one projection.

An image query and an indexed image pass through the same uncertain image projection,
so their embedding noises are correlated (cross-covariance ``c Sigma_I``,
``c = a_x^T A^-1 a_y``; docs/math.md section 12). The engine's candidate search treats
them as independent; for image queries on an index with ``activations.npy`` the searcher
takes a pool of its best candidates by that independent score
(:func:`shared_pool_size`), recomputes their moments with
:func:`~bayesretrieval.similarity.shared_projection_cosine_moments`, rescores them with the
same scorer and keeps the best ``k`` (:func:`rescore_shared`). An indexed image searched
for itself then gets cosine 1 with std 0.

The certificate bounds the independent scores, not these, so such results are never
reported exact or certified. The variance does not split into a query part and an item
part under correlation: those parts are NaN.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from bayesretrieval.posterior import KroneckerPosterior, Modality
from bayesretrieval.queries.candidates import ScoredPairs, SearchOutcome, store_pairs
from bayesretrieval.queries.scorers import Scorer
from bayesretrieval.queries.uncertainty import PairMoments
from bayesretrieval.similarity import CosineEstimator, shared_projection_cosine_moments
from bayesretrieval.store import CovarianceForm, IndexReader


def shared_pool_size(k: int) -> int:
    """Candidates rescored per query for ``k`` results: ``max(4 k, k + 32)``.

    The shared projection raises the score of near-duplicates (whose independent score
    is already near the top) and changes others' by a fraction of a std, so a pool a few
    times ``k`` holds the true top ``k`` in practice; it is not a proof.
    """
    return max(4 * int(k), int(k) + 32)


def uses_shared_projection(modality: Modality, activations, reader: IndexReader, form: CovarianceForm,
                           estimator: CosineEstimator) -> bool:
    """Whether image queries are rescored with the shared projection.

    They are for image queries with known activations on an index that stores the items'
    activations, under the ``kfac`` form and the ``second_order`` estimator (the formula of
    docs/math.md section 12 extends that estimator; the others keep treating the two
    images as independent).
    """
    return (modality is Modality.IMAGE and activations is not None and reader.activations is not None
            and form is CovarianceForm.KFAC and estimator is CosineEstimator.SECOND_ORDER)


def rescore_shared(pool: SearchOutcome, reader: IndexReader, posterior: KroneckerPosterior, query_means: torch.Tensor,
                   query_activations: torch.Tensor, scorer: Scorer, k: int) -> SearchOutcome:
    """The best ``k`` of each query's candidate ``pool`` by the shared-projection moments.

    Args:
        pool: the engine's outcome for a pool of candidates, ``(nq, kp)``.
        reader: the index version (with ``activations``).
        posterior: the image posterior (``A^-1``, ``Sigma_I``).
        query_means: ``(nq, D)`` the image queries' means.
        query_activations: ``(nq, h)`` their activations.
        scorer: the ranking score.
        k: results per query (``<= kp``).

    Returns:
        The outcome, ``(nq, k)``: ``mean`` and ``var`` from
        :func:`~bayesretrieval.similarity.shared_projection_cosine_moments`, ``map_cosine``
        as before, ``var_query``, ``var_item`` and ``var_joint`` NaN, ``certified`` and
        ``exact`` False; ``candidates``, ``needed`` and ``seconds`` those of the pool's
        search (the rescoring time added to ``rerank``).
    """
    start = time.perf_counter()
    nq = len(pool.item_ids)
    rows, columns = np.nonzero(pool.item_ids >= 0)
    ids = pool.item_ids[rows, columns]
    items = reader.fetch(ids, CovarianceForm.KFAC, activations=True)
    mean = torch.empty(len(ids), dtype=torch.float64)
    var = torch.empty(len(ids), dtype=torch.float64)
    for q in np.unique(rows):
        pairs = torch.from_numpy(np.flatnonzero(rows == q))
        m, v = shared_projection_cosine_moments(torch.from_numpy(items.means[pairs.numpy()]),
                                                torch.from_numpy(items.activations[pairs.numpy()]),
                                                query_means[q:q + 1], query_activations[q:q + 1], posterior)
        mean[pairs], var[pairs] = m[:, 0], v[:, 0]
    unknown = torch.full_like(mean, torch.nan)
    moments = PairMoments(mean, var, torch.from_numpy(pool.map_cosine[rows, columns]), unknown, unknown, unknown)
    scored = ScoredPairs(rows, ids, moments, scorer.scores(moments))
    out = SearchOutcome.empty(nq, k)
    store_pairs(out, np.arange(nq), scored, scored.top(nq, k))
    out.candidates, out.needed = pool.candidates, pool.needed
    out.seconds = {**pool.seconds, "rerank": pool.seconds.get("rerank", 0.0) + time.perf_counter() - start}
    return out
