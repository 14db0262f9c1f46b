"""Calibrated match probabilities: the probit link of docs/math.md section 11, fitted by maximum likelihood.

``p(match) = Phi((m - tau) / sqrt(v + noise_std^2))`` with ``m, v`` the cosine moments of
a (query, item) pair; ``tau`` (the threshold) and ``noise_std`` are fitted on labelled
pairs. The baseline for deterministic CLIP is a logistic link on the plain cosine,
``sigmoid(slope * c + intercept)``.

A fitted link is stored in ``INDEX_DIR/calibration.json`` next to the manifest, one entry
per query modality, tagged with the posterior fingerprint and the cosine estimator it
was fitted with, so a rebuilt index with another posterior does not reuse it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from scipy import optimize, special

from bayesretrieval import metrics
from bayesretrieval.atomic import write_text_atomic

CALIBRATION_FILE = "calibration.json"
CALIBRATION_FORMAT_VERSION = 1


class NotFittedError(ValueError):
    """A calibration was used before :meth:`fit`."""


def _labelled(labels, size: int) -> np.ndarray:
    labels = metrics.binary_labels(labels)
    if labels.shape != (size,):
        raise ValueError(f"labels have shape {labels.shape}, expected ({size},)")
    labels = labels.astype(np.float64)
    if labels.min() == labels.max():
        raise ValueError("calibration needs both matching and non-matching pairs")
    return labels


def _flat(values, name: str) -> np.ndarray:
    array = np.asarray(values.numpy() if isinstance(values, torch.Tensor) else values, dtype=np.float64).reshape(-1)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} has non-finite values")
    return array


class ProbitCalibration:
    """``Phi((m - tau) / sqrt(v + noise_std^2))`` fitted by maximum likelihood.

    Args:
        max_iter: L-BFGS iterations.

    Attributes:
        threshold_: fitted ``tau``.
        noise_std_: fitted extra noise ``sigma_0`` (a standard deviation, ``> 0``).
        nll_: mean negative log-likelihood at the optimum.
    """

    def __init__(self, max_iter: int = 500):
        self.max_iter = max_iter

    def fit(self, mean, var, labels) -> "ProbitCalibration":
        """Fit on ``n`` labelled pairs: ``mean``, ``var`` ``(n,)`` cosine moments, ``labels`` ``(n,)`` 0/1."""
        mean, var = _flat(mean, "mean"), _flat(var, "var")
        if mean.shape != var.shape:
            raise ValueError(f"mean has {mean.size} values, var has {var.size}")
        y = _labelled(labels, mean.size)
        sign = 2 * y - 1

        def objective(params):
            tau, log_std = params
            spread = np.sqrt(var + math.exp(2 * log_std))
            z = sign * (mean - tau) / spread
            log_p = special.log_ndtr(z)
            ratio = np.exp(_log_mills(z))  # phi(z) / Phi(z)
            grad_tau = np.mean(ratio * sign / spread)
            grad_log = np.mean(ratio * z * math.exp(2 * log_std) / spread**2)
            return -log_p.mean(), np.array([grad_tau, grad_log])

        start = np.array([np.median(mean), math.log(max(np.std(mean), 1e-3))])
        result = optimize.minimize(objective, start, jac=True, method="L-BFGS-B",
                                   bounds=[(-2.0, 2.0), (-12.0, 2.0)], options={"maxiter": self.max_iter})
        self.threshold_ = float(result.x[0])
        self.noise_std_ = float(math.exp(result.x[1]))
        self.nll_ = float(result.fun)
        return self

    def check_fitted(self) -> None:
        """Raise :class:`NotFittedError` unless :meth:`fit` (or :meth:`from_dict`) ran."""
        if not hasattr(self, "threshold_"):
            raise NotFittedError("ProbitCalibration is not fitted; call fit() or load a stored calibration")

    def probability(self, mean, var):
        """Match probability for moments of any shape (tensors in, tensor out; arrays in, array out)."""
        self.check_fitted()
        as_numpy = not isinstance(mean, torch.Tensor)
        mean = torch.as_tensor(mean, dtype=torch.float64)
        var = torch.as_tensor(var, dtype=torch.float64)
        p = torch.special.ndtr((mean - self.threshold_) / torch.sqrt(var + self.noise_std_**2))
        return p.numpy() if as_numpy else p

    def to_dict(self) -> dict:
        """The fitted parameters as JSON-ready dict."""
        self.check_fitted()
        return {"link": "probit", "threshold": self.threshold_, "noise_std": self.noise_std_, "nll": self.nll_}

    @classmethod
    def from_dict(cls, data: dict) -> "ProbitCalibration":
        """Rebuild a fitted link from :meth:`to_dict` output."""
        link = cls()
        link.threshold_, link.noise_std_ = float(data["threshold"]), float(data["noise_std"])
        link.nll_ = float(data.get("nll", float("nan")))
        return link


def _log_mills(z: np.ndarray) -> np.ndarray:
    """``log(phi(z) / Phi(z))``, stable for very negative ``z``."""
    return -0.5 * z**2 - 0.5 * math.log(2 * math.pi) - special.log_ndtr(z)


class LogisticCalibration:
    """``sigmoid(slope * c + intercept)`` on a deterministic score ``c`` (the usual baseline).

    Attributes:
        slope_: fitted slope.
        intercept_: fitted intercept.
    """

    def __init__(self, max_iter: int = 500):
        self.max_iter = max_iter

    def fit(self, scores, labels) -> "LogisticCalibration":
        """Fit on ``scores`` ``(n,)`` and ``labels`` ``(n,)`` by maximum likelihood."""
        c = _flat(scores, "scores")
        y = _labelled(labels, c.size)

        def objective(params):
            logits = params[0] * c + params[1]
            p = special.expit(logits)
            loss = np.mean(np.logaddexp(0, logits) - y * logits)
            return loss, np.array([np.mean((p - y) * c), np.mean(p - y)])

        result = optimize.minimize(objective, np.zeros(2), jac=True, method="L-BFGS-B",
                                   options={"maxiter": self.max_iter})
        self.slope_, self.intercept_ = float(result.x[0]), float(result.x[1])
        return self

    def probability(self, scores) -> np.ndarray:
        """Match probability for ``scores`` of any shape."""
        if not hasattr(self, "slope_"):
            raise NotFittedError("LogisticCalibration is not fitted; call fit() first")
        return special.expit(self.slope_ * np.asarray(scores, dtype=np.float64) + self.intercept_)


def save_calibration(index_dir: str | Path, query_modality: str, link: ProbitCalibration, tags: dict) -> Path:
    """Store ``link`` for ``query_modality`` in ``INDEX_DIR/calibration.json`` (atomic replace).

    Args:
        index_dir: the index directory.
        query_modality: ``"text"`` or ``"image"``.
        link: the fitted link.
        tags: what it was fitted with (``posterior_fingerprint``, ``estimator``, ``form``, counts).

    Returns:
        The file written.
    """
    path = Path(index_dir) / CALIBRATION_FILE
    data = read_calibration_file(index_dir) or {"format_version": CALIBRATION_FORMAT_VERSION, "links": {}}
    data["links"][query_modality] = {**link.to_dict(), **tags}
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True))
    return path


def read_calibration_file(index_dir: str | Path) -> dict | None:
    """The content of ``calibration.json``, or ``None`` when the index has none.

    Raises:
        ValueError: if the file exists but is not a calibration of a supported version.
    """
    path = Path(index_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if data.get("format_version") != CALIBRATION_FORMAT_VERSION or "links" not in data:
        raise ValueError(f"{path}: calibration format version {data.get('format_version')}, "
                         f"expected {CALIBRATION_FORMAT_VERSION}")
    return data


def load_calibration(index_dir: str | Path, query_modality: str, expected_tags: dict) -> ProbitCalibration | None:
    """The stored link for ``query_modality``, ``None`` when there is none.

    Raises:
        ValueError: if the stored link was fitted with other ``expected_tags`` values
            (another posterior or estimator), naming the first mismatch.
    """
    data = read_calibration_file(index_dir)
    entry = (data or {}).get("links", {}).get(query_modality)
    if entry is None:
        return None
    for key, expected in expected_tags.items():
        if entry.get(key) != expected:
            raise ValueError(f"calibration in {index_dir} was fitted with {key}={entry.get(key)!r}, "
                             f"this search uses {expected!r}; run `bayesretrieval calibrate` again")
    return ProbitCalibration.from_dict(entry)


def evaluate_links(fit_moments, fit_labels, eval_moments, eval_labels, bins: int = 15) -> dict:
    """Fit the probit link and the logistic-on-MAP baseline on one set, score both on another.

    Args:
        fit_moments: :class:`~bayesretrieval.queries.uncertainty.PairMoments` of the fitting pairs.
        fit_labels: their 0/1 labels.
        eval_moments: moments of the held-out pairs.
        eval_labels: their labels.
        bins: ECE bins.

    Returns:
        ``{"probit": {...}, "logistic_map": {...}}`` each with ``ece``, ``nll``, ``brier``,
        plus the fitted parameters.
    """
    probit = ProbitCalibration().fit(fit_moments.mean, fit_moments.var, fit_labels)
    logistic = LogisticCalibration().fit(fit_moments.map_cosine, fit_labels)
    p_probit = probit.probability(_flat(eval_moments.mean, "mean"), _flat(eval_moments.var, "var"))
    p_logistic = logistic.probability(_flat(eval_moments.map_cosine, "map_cosine"))
    scores = lambda p: {"ece": metrics.expected_calibration_error(p, eval_labels, bins),  # noqa: E731
                        "nll": metrics.negative_log_likelihood(p, eval_labels),
                        "brier": metrics.brier_score(p, eval_labels)}
    return {"probit": {**scores(p_probit), "threshold": probit.threshold_, "noise_std": probit.noise_std_},
            "logistic_map": {**scores(p_logistic), "slope": logistic.slope_, "intercept": logistic.intercept_}}
