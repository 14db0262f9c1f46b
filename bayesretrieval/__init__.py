"""bayesretrieval: uncertainty-aware image retrieval with a Laplace-posterior CLIP."""

__version__ = "0.1.0"
