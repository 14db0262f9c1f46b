"""Kronecker-factored Laplace posterior: build, load, save, fit (MATH.md sections 1-2)."""

from bayesretrieval.posterior.kronecker import KroneckerPosterior, Modality, symmetrize

__all__ = ["KroneckerPosterior", "Modality", "symmetrize"]
