"""Which retrieval failures an uncertainty could know about, and which it cannot.

A failure (the top-1 result is not relevant) is *knowable* when something about the
query or the gallery is outside what the model was fitted on, which is what a posterior
(or any out-of-distribution score) can see: the top-1 image is shifted or shows novel
content, every relevant image is shifted (the model had to recognise a changed image),
or the query holds a word the fitting captions never used. The rest are *in-distribution
confusions*: a clean query, a clean top-1 and a clean relevant image that the model
ranks below it. Each failure gets the first kind that applies, in :class:`FailureKind`'s
order.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Iterable, Sequence

import numpy as np


class FailureKind(str, Enum):
    """Why a top-1 result may be wrong, first match wins."""

    UNSEEN_QUERY_WORD = "unseen_query_word"
    """The query holds a word the fitting captions never used (knowable from the query)."""
    TOP1_SHIFTED = "top1_shifted"
    """The wrong top-1 image is shifted or shows novel content (knowable from the item)."""
    RELEVANT_ONLY_SHIFTED = "relevant_only_shifted"
    """Every relevant image is shifted or novel (knowable: the model had to read a changed image)."""
    IN_DISTRIBUTION = "in_distribution"
    """None of the above: a confusion among familiar queries and images."""

    @property
    def knowable(self) -> bool:
        """Whether an uncertainty about the query or the items could flag it."""
        return self is not FailureKind.IN_DISTRIBUTION


def words(text: str) -> set[str]:
    """Lower-case word tokens of a text."""
    return set(re.findall(r"[a-z]+", text.lower()))


def unseen_word_queries(texts: Sequence[str], fitting_texts: Iterable[str],
                        content_words: Iterable[str] | None = None) -> np.ndarray:
    """``(n,)`` bool: whether each text has a word that no fitting text has.

    Args:
        texts: the queries.
        fitting_texts: the captions the model and posterior were fitted on.
        content_words: if given, only these words count (so that filler words of the
            query templates, such as "object", are not taken for novel concepts).
    """
    seen = set().union(*map(words, fitting_texts))
    wanted = None if content_words is None else {w.lower() for w in content_words}
    return np.array([bool({w for w in words(t) - seen if wanted is None or w in wanted}) for t in texts], dtype=bool)


def failure_kinds(failed, unseen_word, top1_shifted, relevant_only_shifted) -> dict:
    """Count failures by kind.

    Args:
        failed: ``(n,)`` bool.
        unseen_word: ``(n,)`` bool, the query has an unseen word.
        top1_shifted: ``(n,)`` bool, the top-1 image is shifted or novel.
        relevant_only_shifted: ``(n,)`` bool, every relevant image is shifted or novel.

    Returns:
        ``{"failures": f, "knowable_share": ..., "kinds": {kind: {"count", "share", "knowable"}},
        "flags": {kind: count of failures with that flag, kinds not exclusive}}``.
    """
    failed = np.asarray(failed, dtype=bool)
    flags = {FailureKind.UNSEEN_QUERY_WORD: unseen_word, FailureKind.TOP1_SHIFTED: top1_shifted,
             FailureKind.RELEVANT_ONLY_SHIFTED: relevant_only_shifted}
    flags = {kind: np.asarray(flag, dtype=bool) for kind, flag in flags.items()}
    for kind, flag in flags.items():
        if flag.shape != failed.shape:
            raise ValueError(f"{kind.value} has shape {flag.shape}, failed has {failed.shape}")
    left = failed.copy()
    counts = {}
    for kind, flag in flags.items():
        counts[kind] = int((left & flag).sum())
        left &= ~flag
    counts[FailureKind.IN_DISTRIBUTION] = int(left.sum())
    total = int(failed.sum())
    share = (lambda c: c / total) if total else (lambda c: float("nan"))
    return {"failures": total,
            "knowable_share": share(total - counts[FailureKind.IN_DISTRIBUTION]),
            "kinds": {k.value: {"count": c, "share": share(c), "knowable": k.knowable} for k, c in counts.items()},
            "flags": {k.value: int((failed & f).sum()) for k, f in flags.items()}}
