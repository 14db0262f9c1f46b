"""bayesretrieval: uncertainty-aware image retrieval with a Laplace-posterior CLIP."""

__version__ = "0.1.0"

from bayesretrieval.posterior import load_bayesvlm_posterior  # noqa: E402
from bayesretrieval.similarity import probabilistic_logits  # noqa: E402

__all__ = ["__version__", "load_bayesvlm_posterior", "probabilistic_logits"]
