"""Kronecker-factored Laplace posterior: build, load, save, fit (docs/math.md sections 1-2)."""

from bayesretrieval.posterior.curvature import ChunkCurvature, infonce_ggn, infonce_ggn_sum
from bayesretrieval.posterior.fit import PosteriorFitter, encode_pairs, fit_posterior, read_encoded
from bayesretrieval.posterior.identity import PosteriorMismatchError, posterior_for_model
from bayesretrieval.posterior.io import (
    PosteriorPair,
    load_bayesvlm_base,
    load_bayesvlm_posterior,
    load_posterior,
    save_bayesvlm_directory,
)
from bayesretrieval.posterior.kronecker import KroneckerPosterior, Modality, symmetrize
from bayesretrieval.posterior.pairs import PairReader
from bayesretrieval.posterior.prior import FactorSpectrum, PriorObjective, optimize_prior_precision
from bayesretrieval.skips import SkipReason

__all__ = [
    "ChunkCurvature",
    "FactorSpectrum",
    "KroneckerPosterior",
    "Modality",
    "PairReader",
    "PosteriorFitter",
    "PosteriorMismatchError",
    "PosteriorPair",
    "PriorObjective",
    "SkipReason",
    "encode_pairs",
    "fit_posterior",
    "infonce_ggn",
    "infonce_ggn_sum",
    "load_bayesvlm_base",
    "load_bayesvlm_posterior",
    "load_posterior",
    "optimize_prior_precision",
    "posterior_for_model",
    "read_encoded",
    "save_bayesvlm_directory",
    "symmetrize",
]
