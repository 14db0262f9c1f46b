"""bayesretrieval: uncertainty-aware image retrieval with a Laplace-posterior CLIP.

The main entry points, importable from the top level:

- :class:`BayesCLIP`: CLIP with a Kronecker-factored Laplace posterior (embedding
  means and variances, probabilistic logits);
- :func:`fit_posterior`, :func:`load_posterior` and :class:`PosteriorPair`: the posterior
  of an encoder (:class:`ClipEncoder`), fitted on image-caption pairs or loaded;
- :func:`build_index` (with :class:`BuildConfig`): an image folder to an index directory
  with per-item uncertainty, read back by :class:`IndexReader`;
- :class:`Searcher`: searches an index by a :class:`ScoreName` score, optionally within an
  :class:`ItemFilter`, with cosine moments from a :class:`CosineEstimator`;
- :func:`load_bayesvlm_posterior` and :func:`probabilistic_logits`: the BayesVLM
  compatibility functions.
"""

__version__ = "0.1.0"

from bayesretrieval.encoders import ClipEncoder  # noqa: E402
from bayesretrieval.indexing import BuildConfig, build_index  # noqa: E402
from bayesretrieval.model import BayesCLIP  # noqa: E402
from bayesretrieval.posterior import PosteriorPair, fit_posterior, load_bayesvlm_posterior, load_posterior  # noqa: E402
from bayesretrieval.queries import ItemFilter, ScoreName, Searcher  # noqa: E402
from bayesretrieval.similarity import CosineEstimator, probabilistic_logits  # noqa: E402
from bayesretrieval.store import IndexReader  # noqa: E402

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
