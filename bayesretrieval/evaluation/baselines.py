"""Deterministic confidence baselines: temperature-scaled softmax over the gallery, top-1 margin.

The softmax baseline turns one query's gallery cosines ``c_j`` (of the mean embeddings)
into ``p_j = softmax_j(s c_j / T)`` and uses ``p`` of the top-1 result as its confidence.
The temperature ``T`` is fitted on held-in queries by the negative log-likelihood of the
relevant set, ``-log sum_{j relevant} p_j`` (temperature scaling, Guo et al. 2017), over a
grid, so a sweep can store the per-query log-normalisers for every grid value and fit
afterwards without keeping the full score matrix. The same functions give the probit
softmax over ``E[cos]`` and ``Var[cos]`` (the retrieval analogue of BayesVLM's zero-shot
probit), the Bayesian signal this baseline is compared with.
"""

from __future__ import annotations

import numpy as np
from scipy import special

DEFAULT_TEMPERATURES = np.geomspace(0.02, 20.0, 61)
"""Grid of temperatures (multipliers of the model's logit scale ``s``)."""


def softmax_statistics(cosines, relevant, logit_scale: float, temperatures=DEFAULT_TEMPERATURES,
                       var=None) -> tuple:
    """Log-normalisers of the gallery softmax at every temperature.

    Args:
        cosines: ``(nq, nb)`` cosines of the means (or ``E[cos]`` with ``var``).
        relevant: ``(nq, nb)`` booleans.
        logit_scale: ``s``.
        temperatures: ``(nT,)`` positive temperatures.
        var: optional ``(nq, nb)`` ``Var[cos]``: the probit softmax instead, every logit
            divided by ``sqrt(1 + pi/8 (s/T)^2 var)`` (docs/math.md section 6).

    Returns:
        ``(log_normaliser, relevant_log_mass)``, each ``(nq, nT)``: ``logsumexp_j(l_j)``
        over the gallery and over the relevant items (``-inf`` without relevant items),
        ``l_j = s c_j / T`` (probit: divided as above).
    """
    cosines = np.asarray(cosines, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    if cosines.shape != relevant.shape or cosines.ndim != 2:
        raise ValueError(f"cosines and relevant must both be (nq, nb), got {cosines.shape} and {relevant.shape}")
    temperatures = _temperatures(temperatures)
    logits = _logits(cosines[:, None, :], logit_scale / temperatures[None, :, None],
                     None if var is None else np.asarray(var, dtype=np.float64)[:, None, :])  # (nq, nT, nb)
    masked = np.where(relevant[:, None, :], logits, -np.inf)
    return special.logsumexp(logits, axis=2), special.logsumexp(masked, axis=2)


def fit_temperature(log_normaliser, relevant_log_mass, temperatures=DEFAULT_TEMPERATURES) -> tuple[float, int]:
    """The grid temperature with the smallest mean NLL of the relevant set.

    Args:
        log_normaliser: ``(n, nT)`` from :func:`softmax_statistics` on the fitting queries.
        relevant_log_mass: ``(n, nT)`` likewise.
        temperatures: the grid used.

    Returns:
        ``(T, index into the grid)``.
    """
    temperatures = _temperatures(temperatures)
    nll = np.asarray(log_normaliser) - np.asarray(relevant_log_mass)
    if nll.ndim != 2 or nll.shape[1] != temperatures.size:
        raise ValueError(f"statistics must be (n, {temperatures.size}), got {nll.shape}")
    finite = np.isfinite(nll).all(axis=1)
    if not finite.any():
        raise ValueError("no fitting query has a relevant item")
    best = int(np.argmin(nll[finite].mean(axis=0)))
    return float(temperatures[best]), best


def softmax_confidence(top_cosine, log_normaliser_at_t, logit_scale: float, temperature: float,
                       top_var=None) -> np.ndarray:
    """``p`` of the top-1 result: ``exp(l_1 - logsumexp_j(l_j))``, ``(n,)`` (see :func:`softmax_statistics`).

    With ``top_var`` (and a probit ``log_normaliser_at_t``), the probit softmax probability.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    top = _logits(np.asarray(top_cosine, dtype=np.float64), logit_scale / temperature,
                  None if top_var is None else np.asarray(top_var, dtype=np.float64))
    return np.exp(top - np.asarray(log_normaliser_at_t, dtype=np.float64))


def _logits(cosines: np.ndarray, scale, var: np.ndarray | None) -> np.ndarray:
    """``scale * cosines``, divided by ``sqrt(1 + pi/8 scale^2 var)`` when ``var`` is given (the probit)."""
    logits = scale * cosines
    return logits if var is None else logits / np.sqrt(1.0 + np.pi / 8.0 * scale**2 * var)


def _temperatures(temperatures) -> np.ndarray:
    temperatures = np.asarray(temperatures, dtype=np.float64).reshape(-1)
    if temperatures.size == 0 or np.any(temperatures <= 0):
        raise ValueError("temperatures must be a non-empty array of positive numbers")
    return temperatures
