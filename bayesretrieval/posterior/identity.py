"""Which weights a posterior belongs to, and refusing one fitted for other weights.

A Laplace posterior describes the projections of one set of weights. The same shapes
with other weights give confident but wrong variances, so every place that pairs a
posterior with a model (building an index, opening one, building :class:`BayesCLIP`)
checks the posterior's :class:`~bayesretrieval.encoders.ModelIdentity` first.
BayesVLM's published factors carry no identity; they are accepted only for the
checkpoint they were published for.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from bayesretrieval.encoders import ModelIdentity
from bayesretrieval.posterior.hub import PUBLISHED
from bayesretrieval.posterior.io import PosteriorPair

if TYPE_CHECKING:
    from bayesretrieval.posterior.lastblock_posterior import LastBlockPosterior

logger = logging.getLogger(__name__)

FORCE_HINT = "pass --force-posterior (force_posterior=True) to use it anyway"


class PosteriorMismatchError(ValueError):
    """The posterior was fitted for other weights than the model it is paired with."""


def describe_model(identity: ModelIdentity) -> str:
    """``name/pretrained`` plus the checkpoint's sha256 prefix when known."""
    text = f"{identity.model_name}/{identity.pretrained}"
    return f"{text} (sha256 {identity.checkpoint_sha256[:12]})" if identity.checkpoint_sha256 else text


def posterior_for_model(posterior: PosteriorPair, model: ModelIdentity, force: bool = False) -> PosteriorPair:
    """Check that ``posterior`` belongs to ``model``; return it bound to ``model``'s identity.

    A posterior that names its model must name ``model`` (checkpoint sha256 when either
    side has one, else architecture and pretrained tag). One without an identity
    (BayesVLM's formats) is accepted for the checkpoint BayesVLM published factors for.
    The returned pair carries ``model``, so an index built from it records which weights
    its uncertainty belongs to.

    Args:
        posterior: the posterior pair.
        model: identity of the encoder it is paired with.
        force: use a mismatched or unidentified posterior anyway (logged as a warning).

    Raises:
        PosteriorMismatchError: naming both identities, unless ``force``.
    """
    return _bound(posterior, _problem(posterior, model), model, force, "`bayesretrieval fit-posterior`")


def lastblock_for_model(lastblock: LastBlockPosterior, model: ModelIdentity,
                        force: bool = False) -> LastBlockPosterior:
    """:func:`posterior_for_model` for a last-block posterior, which names its weights when fitted.

    Raises:
        PosteriorMismatchError: if it names other weights or none, unless ``force``.
    """
    problem = None
    if lastblock.model is None or not lastblock.model.matches(model):
        fitted_for = describe_model(lastblock.model) if lastblock.model is not None else "unknown weights"
        problem = (f"last-block posterior {lastblock.source} was fitted for {fitted_for}, "
                   f"the model is {describe_model(model)}")
    return _bound(lastblock, problem, model, force, "`bayesretrieval fit-posterior --lastblock`")


def _bound(fitted, problem: str | None, model: ModelIdentity, force: bool, fit_command: str):
    """``fitted`` (a posterior with ``model`` and ``source`` fields) bound to ``model``, or refused.

    Raises:
        PosteriorMismatchError: naming ``problem`` and how to fit one, unless ``force``.
    """
    if problem is None:
        return dataclasses.replace(fitted, model=model)
    if not force:
        raise PosteriorMismatchError(f"{problem}; fit a posterior for these weights ({fit_command}) or {FORCE_HINT}")
    logger.warning("%s; used anyway because it was forced", problem)
    return dataclasses.replace(fitted, model=model, source=f"{fitted.source} (forced)")


def _problem(posterior: PosteriorPair, model: ModelIdentity) -> str | None:
    if posterior.model is not None:
        if posterior.model.matches(model):
            return None
        return (f"posterior {posterior.source} was fitted for {describe_model(posterior.model)}, "
                f"the model is {describe_model(model)}")
    if (model.model_name, str(model.pretrained)) in PUBLISHED and not model.checkpoint_sha256:
        return None
    published = ", ".join(f"{name}/{tag}" for name, tag in PUBLISHED)
    return (f"posterior {posterior.source} does not say which weights it was fitted for (BayesVLM's "
            f"published factors are for {published}), the model is {describe_model(model)}")
