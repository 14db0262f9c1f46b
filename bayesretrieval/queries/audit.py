"""Collection audit: the items whose embeddings the posterior is least sure of, no query needed.

Items are ranked by their activation scale ``q = a^T A^-1 a`` (default) or by the item
embedding's total variance relative to its squared norm (docs/math.md section 4):

    uncertainty = tr S_i / |mu_i|^2          (kfac: S_i = q_i Sigma_I, so q_i tr Sigma_I / |mu_i|^2)

and, next to it, ``cosine_std``: the root mean square, over uniformly random unit
directions ``u``, of the first-order std of ``cos(x_i, u)``,

    cosine_std^2 = (tr S_i - mu_i^T S_i mu_i / |mu_i|^2) / (D |mu_i|^2)

(the trace of section 1's ``Var[g/|g|]`` divided by ``D``: noise along ``mu_i`` does
not move a cosine). Both come from the stored per-item scalars (or the per-item variance
columns), so an audit is one vectorised pass over the memory-mapped arrays.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from bayesretrieval.options import AuditScore
from bayesretrieval.queries.report import _thumbnail
from bayesretrieval.store import CovarianceForm, IndexReader
from bayesretrieval.store.format import ItemScalars

AUDIT_COLUMNS = ["rank", "item_id", "path", "uncertainty", "percentile", "scale", "cosine_std"]
"""Columns of :func:`audit_index`'s table, in order."""
SHARDED_AUDIT_COLUMNS = [*AUDIT_COLUMNS[:1], "shard", *AUDIT_COLUMNS[1:]]
"""Columns of :func:`audit_shards`'s table: :data:`AUDIT_COLUMNS` plus ``shard`` after ``rank``."""

CHUNK_ROWS = 65_536
"""Rows of the per-item variance columns read at a time (bounds the memory of a diag/lowrank audit)."""


def item_variance_terms(reader: IndexReader, form: CovarianceForm) -> tuple[np.ndarray, np.ndarray]:
    """``tr S_i`` and ``mu_i^T S_i mu_i`` of every item under covariance form ``form``.

    kfac: ``q_i tr Sigma_I`` and ``q_i mu_i^T Sigma_I mu_i`` from the scalars; diag:
    ``sum d_i`` and ``sum d_i mu_i^2``; lowrank adds ``|L_i|_F^2`` and ``|L_i mu_i|^2``
    (docs/math.md section 4).

    Returns:
        Two float64 arrays of shape ``(N,)``.
    """
    scalars = ItemScalars.from_table(reader.scalars)
    if form is CovarianceForm.KFAC:
        return scalars.scale * reader.trace_image, scalars.scale * scalars.quad_image
    count = len(reader)
    trace, quad = np.empty(count), np.empty(count)
    for start in range(0, count, CHUNK_ROWS):
        rows = slice(start, min(start + CHUNK_ROWS, count))
        means = np.asarray(reader.means[rows], dtype=np.float64)
        diag = np.asarray(reader.variance_diag[rows], dtype=np.float64)
        trace[rows], quad[rows] = diag.sum(1), np.einsum("nd,nd,nd->n", diag, means, means)
        if form is CovarianceForm.LOWRANK:
            factor = np.asarray(reader.variance_lowrank[rows], dtype=np.float64)
            trace[rows] += np.einsum("nrd,nrd->n", factor, factor)
            quad[rows] += np.square(np.einsum("nrd,nd->nr", factor, means)).sum(1)
    return trace, quad


def uncertainty_scores(trace: np.ndarray, quad: np.ndarray, norm_sq: np.ndarray,
                       embed_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The audit score and the random-direction cosine std (docs/math.md section 4).

    Args:
        trace: ``tr S_i``, ``(N,)``.
        quad: ``mu_i^T S_i mu_i``, ``(N,)``.
        norm_sq: ``|mu_i|^2``, ``(N,)``.
        embed_dim: ``D``.

    Returns:
        ``uncertainty = tr S / |mu|^2`` and ``cosine_std = sqrt((tr S - mu^T S mu / |mu|^2) / (D |mu|^2))``,
        each ``(N,)``; ``inf`` for a zero mean (its direction is undefined).
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        uncertainty = np.where(norm_sq > 0, trace / norm_sq, np.inf)
        tangential = np.maximum(trace - quad / norm_sq, 0.0)
        cosine_std = np.where(norm_sq > 0, np.sqrt(tangential / (embed_dim * norm_sq)), np.inf)
    return uncertainty, cosine_std


def item_scores(reader: IndexReader, form: CovarianceForm) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every item's ``uncertainty``, ``cosine_std`` and activation scale ``q`` under ``form``.

    Returns:
        Three float64 arrays of shape ``(N,)`` (:func:`uncertainty_scores`, and the stored ``scale``).
    """
    scalars = ItemScalars.from_table(np.asarray(reader.scalars))
    trace, quad = item_variance_terms(reader, form)
    uncertainty, cosine_std = uncertainty_scores(trace, quad, scalars.norm_sq, reader.embed_dim)
    return uncertainty, cosine_std, scalars.scale


def collection_scores(readers: Sequence[IndexReader], form: CovarianceForm
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`item_scores` over several shards, rows one shard after another.

    Returns:
        ``(uncertainty, cosine_std, scale, offsets)``: three ``(N,)`` arrays over every
        shard's items and ``offsets`` ``(S + 1,)``, each shard's first row, then ``N``.
    """
    uncertainty, cosine_std, scale = (np.concatenate(parts) for parts in
                                      zip(*(item_scores(reader, form) for reader in readers)))
    return uncertainty, cosine_std, scale, np.cumsum([0, *(len(reader) for reader in readers)])


def default_ranking(scale: np.ndarray) -> AuditScore:
    """The audit's default ranking score: the scale ``q``, unless no item has one (precomputed embeddings)."""
    return AuditScore.SCALE if np.any(scale > 0) else AuditScore.UNCERTAINTY


def audit_index(reader: IndexReader, k: int | None = None, form: CovarianceForm | str | None = None,
                by: AuditScore | str | None = None) -> pd.DataFrame:
    """The ``k`` items the posterior is least sure of, most uncertain first.

    Args:
        reader: the opened index.
        k: rows to return (``None``: every item).
        form: item covariance form (default: the richest the index holds).
        by: the ranking score. Default :attr:`AuditScore.SCALE` (``q``), which separates
            out-of-distribution images better than the relative variance on the small
            world (tests/test_audit.py prints both), unless the index stores no scales
            (precomputed embeddings), then :attr:`AuditScore.UNCERTAINTY`.

    Returns:
        One row per item (columns :data:`AUDIT_COLUMNS`): ``rank`` (1 = least certain),
        ``item_id``, ``path``, ``uncertainty`` (``tr S / |mu|^2``), ``percentile`` (percent
        of the collection whose ranking score is at most this item's), ``scale`` (``q``)
        and ``cosine_std``. ``attrs`` hold ``form``, ``by``, ``item_count`` and ``version``.

    Raises:
        ValueError: for a non-positive ``k``, an unknown form, or a per-item form whose
            variance columns the index lacks.
    """
    frame = audit_shards([reader], k, form, by).drop(columns="shard")
    frame.attrs["version"] = reader.manifest.version
    return frame


def audit_shards(readers: Sequence[IndexReader], k: int | None = None, form: CovarianceForm | str | None = None,
                 by: AuditScore | str | None = None) -> pd.DataFrame:
    """The ``k`` items the posterior is least sure of over several shards (one collection), most uncertain first.

    As :func:`audit_index` over the union of the shards' items: ``percentile`` counts the
    whole collection, and the default ``by`` is chosen on it. Ties go to the lower
    ``(shard, row)``.

    Args:
        readers: the shards' opened versions, in shard order.
        k: rows to return (``None``: every item).
        form: item covariance form (default: the richest the first shard holds).
        by: the ranking score (default: as :func:`audit_index`, over every shard's items).

    Returns:
        :func:`audit_index`'s table with ``shard`` (the reader's position in ``readers``)
        after ``rank``; ``attrs["version"]`` lists the shards' versions and
        ``item_count`` is their total.

    Raises:
        ValueError: as :func:`audit_index`, for any shard.
    """
    if k is not None and (isinstance(k, bool) or int(k) != k or k < 1):
        raise ValueError(f"k must be a positive integer or None, got {k!r}")
    form = _form(readers[0], form)
    for reader in readers[1:]:
        _form(reader, form)
    uncertainty, cosine_std, scale, offsets = collection_scores(readers, form)
    by = AuditScore(by) if by is not None else default_ranking(scale)
    rows, above = top_rows(scale if by is AuditScore.SCALE else uncertainty, k)
    shards, ids, paths = _shard_items(readers, offsets, rows)
    frame = pd.DataFrame({
        "rank": np.arange(1, len(rows) + 1),
        "shard": shards,
        "item_id": ids,
        "path": paths,
        "uncertainty": uncertainty[rows],
        "percentile": 100.0 * (len(uncertainty) - above) / max(len(uncertainty), 1),
        "scale": scale[rows],
        "cosine_std": cosine_std[rows],
    }, columns=SHARDED_AUDIT_COLUMNS)
    frame.attrs.update(form=form.value, by=by.value, item_count=len(uncertainty),
                       version=[reader.manifest.version for reader in readers])
    return frame


def _shard_items(readers: Sequence[IndexReader], offsets: np.ndarray,
                 rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(shard, item_id, path)`` of rows numbered over the shards (``offsets``: their first rows), each ``(k,)``."""
    shards = np.searchsorted(offsets, rows, side="right") - 1
    ids = np.empty(len(rows), np.int64)
    paths = np.empty(len(rows), object)
    for shard, reader in enumerate(readers):
        mine = shards == shard
        ids[mine] = reader.item_ids[rows[mine] - offsets[shard]]
        paths[mine] = reader.paths(ids[mine])
    return shards, ids, paths.tolist()


def render_audit_html(frame: pd.DataFrame, image_root: str | Path, thumbnail_px: int = 128,
                      title: str = "bayesretrieval audit") -> str:
    """A self-contained HTML contact sheet of an audit: one card per item, most uncertain first.

    Each card shows the thumbnail (embedded; a placeholder for a missing or unreadable
    file), the rank, score and percentile, and one line saying what the score means for
    this item: ``sqrt(uncertainty)`` is the root total variance as a fraction of ``|mu|``.

    Args:
        frame: :func:`audit_index`'s table.
        image_root: folder the paths are relative to.
        thumbnail_px: thumbnail side in pixels.
        title: page title.

    Returns:
        The HTML text.
    """
    style = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222}"
             ".sheet{display:flex;flex-wrap:wrap;gap:14px}"
             f".card{{width:{thumbnail_px + 60}px;font-size:12px}}"
             f".thumb,.missing{{width:{thumbnail_px}px;height:{thumbnail_px}px;object-fit:cover;background:#ddd}}"
             ".missing{display:flex;align-items:center;justify-content:center;color:#888}"
             ".why{color:#b35c00}.path{word-break:break-all;color:#555}.note{color:#666;font-size:.9em}")
    count = frame.attrs.get("item_count", len(frame))
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
           f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>",
           f"<p class='note'>The {len(frame)} of {count} items the model is least sure about, most uncertain "
           "first. <b>uncertainty</b> = the embedding's total variance / its squared norm (tr S / |mu|^2, "
           "docs/math.md section 4): how far the posterior lets the item's embedding move relative to its "
           "length, so how much to doubt its similarity scores. <b>percentile</b>: share of the collection "
           "at or below this score.</p>", "<div class='sheet'>"]
    for row in frame.itertuples(index=False):
        uri = _thumbnail(Path(image_root) / row.path, thumbnail_px)
        image = f"<img class='thumb' src='{uri}' alt=''>" if uri else "<div class='missing'>no image</div>"
        why = (f"embedding noise about {np.sqrt(row.uncertainty):.0%} of its length; at least as uncertain "
               f"as {row.percentile:.1f}% of the collection")
        out.append(f"<div class='card'>{image}<div>#{row.rank} &middot; uncertainty <b>{row.uncertainty:.4f}</b>"
                   f" &middot; percentile {row.percentile:.1f}</div><div class='why'>{why}</div>"
                   f"<div class='path'>{html.escape(row.path)}</div></div>")
    out.append("</div>" + ("" if len(frame) else "<p>No items.</p>") + "</body></html>")
    return "\n".join(out)


def top_rows(scores: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the ``k`` largest ``scores``, largest first (ties: lower row first), in O(N + k log k).

    Args:
        scores: ``(N,)``, no NaN.
        k: rows wanted (``None``: all).

    Returns:
        ``rows`` ``(k,)`` and ``above`` ``(k,)``: how many scores of the whole array exceed each
        row's (all of them are among the selected rows, so counting there suffices).
    """
    count = len(scores)
    k = count if k is None else min(int(k), count)
    if k < count:
        threshold = np.partition(scores, count - k)[count - k]
        higher = np.flatnonzero(scores > threshold)
        candidates = np.concatenate([higher, np.flatnonzero(scores == threshold)[: k - len(higher)]])
    else:
        candidates = np.arange(count)
    values = scores[candidates]
    order = np.lexsort((candidates, -values))
    negated = -values[order]  # ascending
    return candidates[order], np.searchsorted(negated, negated, side="left")


def _form(reader: IndexReader, form: CovarianceForm | str | None) -> CovarianceForm:
    if form is None:
        return reader.manifest.variance_spec.form
    try:
        form = CovarianceForm(form)
    except ValueError:
        raise ValueError(f"unknown covariance form {form!r}; expected one of "
                         f"{[f.value for f in CovarianceForm]}") from None
    held = reader.manifest.variance_spec
    needs = {CovarianceForm.DIAG: held.has_diag, CovarianceForm.LOWRANK: held.has_lowrank}
    if not needs.get(form, True):
        raise ValueError(f"covariance form {form.value!r} needs variance columns; index has {held}")
    return form
