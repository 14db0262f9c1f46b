"""Kronecker-factored Laplace posterior: build, load, save, fit (MATH.md sections 1-2)."""

from bayesretrieval.posterior.io import (
    PosteriorPair,
    load_bayesvlm_base,
    load_bayesvlm_posterior,
    load_posterior,
    save_bayesvlm_directory,
)
from bayesretrieval.posterior.kronecker import KroneckerPosterior, Modality, symmetrize

__all__ = [
    "KroneckerPosterior",
    "Modality",
    "PosteriorPair",
    "load_bayesvlm_base",
    "load_bayesvlm_posterior",
    "load_posterior",
    "save_bayesvlm_directory",
    "symmetrize",
]
