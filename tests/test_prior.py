"""Type-II maximum likelihood for the prior precision (docs/math.md section 2)."""

import json
import math

import numpy as np
import pytest
import torch

from bayesretrieval.posterior.prior import (
    FactorSpectrum,
    PriorObjective,
    kronecker_log_evidence,
    optimize_prior_precision,
)
from tests.reference import kronecker_log_evidence_dense

THETA_SQ_NORM = {"img": 63.658, "txt": 42.14}
PUBLISHED = {
    # (modality suffix, n): (reference objective, correct objective)
    ("img", 1): (1708.9, 3085.7),
    ("img", 10): (2997.9, 3913.3),
    ("txt", 1): (1255.3, 3349.0),
    ("txt", 10): (2537.8, 4179.0),
}


def _random_factor(size, seed):
    generator = torch.Generator().manual_seed(seed)
    root = torch.randn(size, 2 * size, generator=generator, dtype=torch.float64)
    return root @ root.T / size


def test_eigenvalue_evidence_matches_dense_kronecker_logdet():
    A, B = _random_factor(4, 0), _random_factor(3, 1)
    spectrum = FactorSpectrum.from_factors(A, B, theta_sq_norm=2.5)
    for lam, n in ((0.3, 1.0), (7.0, 10.0), (150.0, 3.0)):
        fast = kronecker_log_evidence(spectrum, math.log(lam), n)
        dense = kronecker_log_evidence_dense(A, B, 2.5, lam, n)
        assert fast == pytest.approx(dense, rel=1e-12, abs=1e-9)


@pytest.mark.parametrize("objective", list(PriorObjective))
def test_optimum_beats_a_dense_grid(objective):
    spectrum = FactorSpectrum.from_factors(_random_factor(6, 2), _random_factor(5, 3), 4.0)
    lam = optimize_prior_precision(spectrum, 2.0, objective)
    grid = np.exp(np.linspace(math.log(lam) - 1, math.log(lam) + 1, 2001))
    values = [objective.log_evidence(spectrum, math.log(x), 2.0) for x in grid]
    assert grid[int(np.argmax(values))] == pytest.approx(lam, rel=2e-3)
    assert objective.log_evidence(spectrum, math.log(lam), 2.0) >= max(values) - 1e-9


def _published_spectrum(directory, suffix):
    factors = [
        torch.load(directory / f"{f}_{suffix}_analytic.pt", map_location="cpu", weights_only=True)
        for f in ("A", "B")
    ]
    return FactorSpectrum.from_factors(*factors, THETA_SQ_NORM[suffix])


@pytest.mark.parametrize("suffix", ["img", "txt"])
def test_reproduces_published_lambdas(bayesvlm_dir, suffix):
    spectrum = _published_spectrum(bayesvlm_dir, suffix)
    for n in (1, 10):
        reference, correct = PUBLISHED[(suffix, n)]
        assert optimize_prior_precision(spectrum, n, "bayesvlm_reference") == pytest.approx(
            reference, rel=5e-3
        )
        assert optimize_prior_precision(spectrum, n) == pytest.approx(correct, rel=5e-3)


def test_published_json_lambda_is_the_reference_optimum(bayesvlm_dir):
    prior = json.loads((bayesvlm_dir / "prior_precision_analytic.json").read_text())
    spectrum = _published_spectrum(bayesvlm_dir, "img")
    lam = optimize_prior_precision(spectrum, prior["n_img"], PriorObjective.BAYESVLM_REFERENCE)
    assert lam == pytest.approx(prior["lambda_img"], rel=5e-3)


def test_bad_inputs_are_errors():
    spectrum = FactorSpectrum.from_factors(_random_factor(3, 4), _random_factor(3, 5), 1.0)
    with pytest.raises(ValueError, match="pseudo_data_count must be positive, got 0"):
        optimize_prior_precision(spectrum, 0)
    with pytest.raises(ValueError, match="no optimum inside log10_bounds"):
        optimize_prior_precision(spectrum, 1.0, log10_bounds=(-4.0, -3.0))
    with pytest.raises(ValueError, match="'nope' is not a valid PriorObjective"):
        optimize_prior_precision(spectrum, 1.0, "nope")
    with pytest.raises(ValueError, match=r"A must be a square matrix, got shape \(3, 2\)"):
        FactorSpectrum.from_factors(torch.ones(3, 2), torch.eye(2), 1.0)
