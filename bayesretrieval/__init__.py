"""bayesretrieval: uncertainty-aware image retrieval with a Laplace-posterior CLIP.

The main entry points, importable from the top level:

- :class:`BayesCLIP`: CLIP with a Kronecker-factored Laplace posterior (embedding
  means and variances, probabilistic logits);
- :func:`fit_posterior`, :func:`load_posterior` and :class:`PosteriorPair`: the posterior
  of an encoder (:class:`ClipEncoder`), fitted on image-caption pairs or loaded;
- :func:`build_index` (with :class:`BuildConfig`): an image folder to an index directory
  with per-item uncertainty, read back by :class:`IndexReader`;
- :class:`Searcher`: searches an index (or several, as shards of one collection) by a
  :class:`ScoreName` score, optionally within an
  :class:`ItemFilter`, with cosine moments from a :class:`CosineEstimator`;
- :func:`load_bayesvlm_posterior` and :func:`probabilistic_logits`: the BayesVLM
  compatibility functions.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "BayesCLIP": "bayesretrieval.model",
    "BuildConfig": "bayesretrieval.indexing",
    "ClipEncoder": "bayesretrieval.encoders",
    "CosineEstimator": "bayesretrieval.similarity",
    "IndexReader": "bayesretrieval.store",
    "ItemFilter": "bayesretrieval.queries",
    "PosteriorPair": "bayesretrieval.posterior",
    "ScoreName": "bayesretrieval.queries",
    "Searcher": "bayesretrieval.queries",
    "build_index": "bayesretrieval.indexing",
    "fit_posterior": "bayesretrieval.posterior",
    "load_bayesvlm_posterior": "bayesretrieval.posterior",
    "load_posterior": "bayesretrieval.posterior",
    "probabilistic_logits": "bayesretrieval.similarity",
}
"""Public name -> the module it comes from, imported on first access (PEP 562), so that
``import bayesretrieval`` (and the console script's ``--help``) does not load torch."""


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BayesCLIP",
    "BuildConfig",
    "ClipEncoder",
    "CosineEstimator",
    "IndexReader",
    "ItemFilter",
    "PosteriorPair",
    "ScoreName",
    "Searcher",
    "__version__",
    "build_index",
    "fit_posterior",
    "load_bayesvlm_posterior",
    "load_posterior",
    "probabilistic_logits",
]
