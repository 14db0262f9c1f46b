"""Probit and logistic links: maximum likelihood recovers known parameters; storage round trip."""

import json

import numpy as np
import pytest
import torch
from scipy import stats

from bayesretrieval.queries.bounds import ScoreBounds
from bayesretrieval.queries.calibration import (
    LogisticCalibration,
    NotFittedError,
    ProbitCalibration,
    evaluate_links,
    load_calibration,
    save_calibration,
)
from bayesretrieval.queries.scorers import make_scorer
from bayesretrieval.queries.uncertainty import PairMoments


def probit_data(n=40_000, tau=0.3, noise_std=0.05, seed=0):
    rng = np.random.default_rng(seed)
    mean = rng.uniform(-0.1, 0.7, n)
    var = rng.uniform(0, 0.1, n) ** 2
    labels = rng.random(n) < stats.norm.cdf((mean - tau) / np.sqrt(var + noise_std**2))
    return mean, var, labels


def test_probit_recovers_threshold_and_noise():
    mean, var, labels = probit_data()
    link = ProbitCalibration().fit(mean, var, labels)
    assert link.threshold_ == pytest.approx(0.3, abs=0.01)
    assert link.noise_std_ == pytest.approx(0.05, abs=0.01)
    manual_nll = -np.mean(np.where(labels, np.log(link.probability(mean, var)), np.log1p(-link.probability(mean, var))))
    assert link.nll_ == pytest.approx(manual_nll, rel=1e-6)


def test_probit_gradient_matches_finite_differences():
    """The optimum is a stationary point of the mean NLL (checked by finite differences)."""
    mean, var, labels = probit_data(5_000, seed=1)
    link = ProbitCalibration().fit(mean, var, labels)

    def nll(tau, std):
        p = np.clip(stats.norm.cdf((mean - tau) / np.sqrt(var + std**2)), 1e-300, 1 - 1e-16)
        return -np.mean(np.where(labels, np.log(p), np.log1p(-p)))

    h = 1e-5
    for d_tau, d_std in ((h, 0), (0, h)):
        slope = (nll(link.threshold_ + d_tau, link.noise_std_ + d_std)
                 - nll(link.threshold_ - d_tau, link.noise_std_ - d_std)) / (2 * h)
        assert abs(slope) < 1e-3


def test_logistic_recovers_slope():
    rng = np.random.default_rng(2)
    c = rng.uniform(-1, 1, 50_000)
    labels = rng.random(c.size) < 1 / (1 + np.exp(-(6 * c - 1)))
    link = LogisticCalibration().fit(c, labels)
    assert link.slope_ == pytest.approx(6, rel=0.05) and link.intercept_ == pytest.approx(-1, abs=0.05)


def test_unfitted_and_bad_labels_raise():
    with pytest.raises(NotFittedError):
        ProbitCalibration().probability(np.zeros(2), np.zeros(2))
    with pytest.raises(NotFittedError):
        LogisticCalibration().probability(np.zeros(2))
    with pytest.raises(ValueError, match="both"):
        ProbitCalibration().fit(np.zeros(3), np.zeros(3), [1, 1, 1])
    with pytest.raises(ValueError, match="0/1"):
        ProbitCalibration().fit(np.zeros(2), np.zeros(2), [0, 2])
    with pytest.raises(ValueError, match="score 'probability' needs a calibration"):
        make_scorer("probability")


def test_storage_round_trip_and_mismatch(tmp_path):
    mean, var, labels = probit_data(2_000)
    link = ProbitCalibration().fit(mean, var, labels)
    tags = {"posterior_fingerprint": "abc", "estimator": "second_order", "form": "kfac"}
    path = save_calibration(tmp_path, "text", link, {**tags, "pairs": 2000})
    assert json.loads(path.read_text())["links"]["text"]["pairs"] == 2000
    loaded = load_calibration(tmp_path, "text", tags)
    assert loaded.threshold_ == link.threshold_ and loaded.noise_std_ == link.noise_std_
    assert load_calibration(tmp_path, "image", tags) is None
    with pytest.raises(ValueError, match="posterior_fingerprint"):
        load_calibration(tmp_path, "text", {**tags, "posterior_fingerprint": "other"})
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_calibration(tmp_path, "text", tags)


def test_probability_upper_bound_dominates_any_item_in_the_box():
    """Phi((m - tau)/sqrt(v + s0^2)) over m <= m_max, v <= v_max never exceeds the scorer's bound."""
    link = ProbitCalibration.from_dict({"threshold": 0.3, "noise_std": 0.04})
    scorer = make_scorer("probability", calibration=link)
    rng = np.random.default_rng(3)
    for m_max in (-0.2, 0.25, 0.3, 0.5):
        bound = scorer.upper_bound(ScoreBounds(np.array([m_max]), np.array([0.01]), np.array([m_max])))[0]
        m = rng.uniform(-1, m_max, 10_000)
        v = rng.uniform(0, 0.01, 10_000)
        got = scorer.score(PairMoments(torch.from_numpy(m), torch.from_numpy(v), torch.from_numpy(m)))
        assert float(got.max()) <= bound + 1e-15


def test_evaluate_links_reports_both():
    mean, var, labels = probit_data(20_000, seed=4)
    moments = PairMoments(torch.from_numpy(mean), torch.from_numpy(var), torch.from_numpy(mean))
    report = evaluate_links(moments, labels, moments, labels)
    assert report["probit"]["ece"] < 0.02
    assert set(report["logistic_map"]) >= {"ece", "nll", "brier", "slope", "intercept"}
