"""Ranking scores over cosine moments (docs/math.md section 5), resolved by name.

A scorer implements :meth:`Scorer.score` (the score of every (query, item) pair) and
:meth:`Scorer.upper_bound` (what an item FAISS did not return could reach at most), and
says how many FAISS candidates its first round needs (:meth:`Scorer.first_round`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from bayesretrieval.options import ScoreName
from bayesretrieval.queries.bounds import ScoreBounds
from bayesretrieval.queries.calibration import ProbitCalibration
from bayesretrieval.queries.uncertainty import PairMoments


class Scorer:
    """Base class: one score per (query, item) pair and a bound on what unseen items can reach.

    Subclasses set :attr:`name` and implement :meth:`score` and :meth:`upper_bound`.
    """

    name: ClassVar[ScoreName]
    uses_variance_floor: ClassVar[bool] = False
    """Whether :meth:`upper_bound` is tighter with a per-candidate ``var_floor``."""

    @classmethod
    def from_options(cls, kappa: float, calibration: ProbitCalibration | None) -> "Scorer":
        """Build from the search options (most scorers take none)."""
        return cls()

    def first_round(self, k: int) -> int:
        """FAISS candidates the first round asks for, for ``k`` results.

        FAISS ranks by the ``kfac`` expected cosine, which differs from this score by up
        to a few standard deviations, so a wide margin: ``4 max(2 k, k + 32)`` (168 for
        ``k = 10``). Only speed depends on it: too few costs a second FAISS round.
        """
        return 4 * max(2 * k, k + 32)

    def score(self, moments: PairMoments) -> torch.Tensor:
        """The score of every pair, shaped like the moments."""
        raise NotImplementedError

    def upper_bound(self, bounds: ScoreBounds) -> np.ndarray:
        """No item with moments inside ``bounds`` can score higher (shaped like ``bounds.mean``)."""
        raise NotImplementedError

    def scores(self, moments: PairMoments) -> np.ndarray:
        """:meth:`score` as a float64 array."""
        return self.score(moments).numpy().astype(np.float64, copy=False)


class ExpectedScorer(Scorer):
    """``m``."""

    name = ScoreName.EXPECTED

    def first_round(self, k):
        """``2 k`` (at least ``k + 4``): for the ``kfac`` form FAISS's inner product already is ``m``."""
        return max(2 * k, k + 4)

    def score(self, moments):
        """``m``."""
        return moments.mean

    def upper_bound(self, bounds):
        """``bounds.mean``."""
        return bounds.mean


@dataclass
class ConfidenceBoundScorer(Scorer):
    """``m + direction * kappa sqrt(v)``; subclasses fix the direction and the bound."""

    kappa: float = 1.0
    direction: ClassVar[float]

    @classmethod
    def from_options(cls, kappa, calibration):
        """Build with the search's ``kappa``."""
        return cls(kappa)

    def score(self, moments):
        """``m + direction * kappa sqrt(v)``."""
        return moments.mean + self.direction * self.kappa * moments.var.sqrt()


class LowerBoundScorer(ConfidenceBoundScorer):
    """``m - kappa sqrt(v)``, bounded by the bound on ``m`` less ``kappa`` times the floor of the std."""

    name = ScoreName.LCB
    direction = -1.0
    uses_variance_floor = True

    def upper_bound(self, bounds):
        """``bounds.mean - kappa sqrt(bounds.var_floor)``."""
        return bounds.mean - self.kappa * np.sqrt(bounds.var_floor)


class UpperBoundScorer(ConfidenceBoundScorer):
    """``m + kappa sqrt(v)``, bounded with the collection-wide bound on ``v``."""

    name = ScoreName.UCB
    direction = 1.0

    def upper_bound(self, bounds):
        """``bounds.mean + kappa sqrt(bounds.var)``."""
        return bounds.mean + self.kappa * np.sqrt(bounds.var)


@dataclass
class ItemLowerBoundScorer(Scorer):
    """``m - kappa sqrt(v_item)``: penalises only the item's own part of the variance.

    The query's part of ``Var[cos]`` is nearly the same for every candidate of a query,
    so only the item's part can reorder them (docs/math.md section 5).
    """

    kappa: float = 1.0
    name: ClassVar[ScoreName] = ScoreName.LCB_ITEM

    @classmethod
    def from_options(cls, kappa, calibration):
        """Build with the search's ``kappa``."""
        return cls(kappa)

    def score(self, moments):
        """``m - kappa sqrt(max(v_item, 0))``.

        Raises:
            ValueError: for moments without the item part (built from a mean and variance alone).
        """
        if moments.var_item is None:
            raise ValueError("score 'lcb_item' needs the item part of the variance")
        return moments.mean - self.kappa * moments.var_item.clamp(min=0).sqrt()

    def upper_bound(self, bounds):
        """``bounds.mean`` (the penalty is never negative)."""
        return bounds.mean


@dataclass
class ProbabilityScorer(Scorer):
    """Calibrated match probability of a fitted :class:`ProbitCalibration`."""

    calibration: ProbitCalibration
    name: ClassVar[ScoreName] = ScoreName.PROBABILITY
    uses_variance_floor: ClassVar[bool] = True

    @classmethod
    def from_options(cls, kappa, calibration):
        """Build with the search's fitted ``calibration``, which this score requires."""
        if calibration is None:
            raise ValueError("score 'probability' needs a calibration; run `bayesretrieval calibrate` on the index")
        calibration.check_fitted()
        return cls(calibration)

    def score(self, moments):
        """``Phi((m - tau) / sqrt(v + noise_std^2))``."""
        return self.calibration.probability(moments.mean, moments.var)

    def upper_bound(self, bounds):
        """``Phi(z)`` with ``z`` maximised: the largest variance when ``m < tau``, else the smallest."""
        gap = bounds.mean - self.calibration.threshold_
        noise_var = self.calibration.noise_std_**2
        return _phi(gap / np.sqrt(np.where(gap < 0, bounds.var, bounds.var_floor) + noise_var))


class MapScorer(Scorer):
    """``cos(mu_x, mu_y)``."""

    name = ScoreName.MAP

    def score(self, moments):
        """``cos(mu_x, mu_y)``."""
        return moments.map_cosine

    def upper_bound(self, bounds):
        """``bounds.map_cosine``."""
        return bounds.map_cosine


def _phi(z: np.ndarray) -> np.ndarray:
    return torch.special.ndtr(torch.from_numpy(np.asarray(z, dtype=np.float64))).numpy()


def make_scorer(score: ScoreName | str, kappa: float = 1.0, calibration: ProbitCalibration | None = None) -> Scorer:
    """Build the scorer named ``score``.

    Args:
        score: a :class:`ScoreName` or its value.
        kappa: the confidence multiplier of ``lcb`` / ``ucb`` / ``lcb_item`` (``>= 0``).
        calibration: the fitted probit link, required for ``probability``.

    Raises:
        ValueError: for an unknown name, a negative or non-finite ``kappa``, or
            ``probability`` without a fitted calibration.
    """
    try:
        name = ScoreName(score)
    except ValueError:
        raise ValueError(f"unknown score {score!r}; expected one of {[s.value for s in ScoreName]}") from None
    if not np.isfinite(kappa) or kappa < 0:
        raise ValueError(f"kappa must be a finite number >= 0, got {kappa}")
    return _SCORERS[name].from_options(kappa, calibration)


_SCORERS: dict[ScoreName, type[Scorer]] = {
    ScoreName.EXPECTED: ExpectedScorer,
    ScoreName.LCB: LowerBoundScorer,
    ScoreName.UCB: UpperBoundScorer,
    ScoreName.LCB_ITEM: ItemLowerBoundScorer,
    ScoreName.PROBABILITY: ProbabilityScorer,
    ScoreName.MAP: MapScorer,
}
