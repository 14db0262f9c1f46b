"""A self-contained HTML page of search results: thumbnails, scores, similarity bars with uncertainty.

Each result shows its expected cosine as a bar on an axis shared by the whole page, with
whiskers at one and two standard deviations, so results the model is unsure of stand
out at a glance (their whiskers are long; the most uncertain quarter is also flagged).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h2 { margin-top: 2em; font-size: 1.1em; }
table { border-collapse: collapse; }
td, th { padding: 4px 10px; border-bottom: 1px solid #eee; text-align: left; vertical-align: middle; }
td.num { font-variant-numeric: tabular-nums; text-align: right; }
.thumb { width: THUMBpx; height: THUMBpx; object-fit: cover; background: #ddd; display: block; }
.missing { width: THUMBpx; height: THUMBpx; background: #ddd; color: #888; font-size: 10px;
           display: flex; align-items: center; justify-content: center; }
.unsure { background: #fff4e0; }
.tag { font-size: 0.75em; color: #b35c00; }
.note { color: #666; font-size: 0.9em; }
.warning { color: #8a4b00; background: #fff4e0; padding: 4px 8px; }
"""

BAR_WIDTH, BAR_HEIGHT = 240, 18


def _thumbnail(path: Path, size: int) -> str | None:
    """A base64 JPEG data URI of ``path`` fitted in ``size`` x ``size``, or ``None`` when unreadable."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((size, size))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=85)
    except (OSError, UnidentifiedImageError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _bar(mean: float, std: float, low: float, high: float) -> str:
    """An inline SVG: a bar to ``mean`` with whiskers at +-1 and +-2 std, on the axis ``[low, high]``."""
    scale = lambda v: BAR_WIDTH * (min(max(v, low), high) - low) / (high - low)  # noqa: E731
    mid, h = BAR_HEIGHT / 2, BAR_HEIGHT
    parts = [
        f'<rect x="0" y="3" width="{scale(mean):.1f}" height="{h - 6}" fill="#7aa6d6"/>',
        f'<line x1="{scale(mean - 2 * std):.1f}" x2="{scale(mean + 2 * std):.1f}" y1="{mid}" y2="{mid}" '
        'stroke="#333" stroke-width="1" stroke-opacity="0.5"/>',
        f'<line x1="{scale(mean - std):.1f}" x2="{scale(mean + std):.1f}" y1="{mid}" y2="{mid}" '
        'stroke="#333" stroke-width="3"/>',
        f'<line x1="{scale(mean):.1f}" x2="{scale(mean):.1f}" y1="1" y2="{h - 1}" stroke="#08306b" stroke-width="2"/>',
    ]
    return (f'<svg width="{BAR_WIDTH}" height="{h}" role="img" aria-label="expected cosine {mean:.3f} '
            f'plus or minus {std:.3f}">' + "".join(parts) + "</svg>")


def render_html(results: pd.DataFrame, image_root: str | Path | None = None, thumbnail_px: int = 96,
                title: str = "bayesretrieval search") -> str:
    """Render a result table of :meth:`Searcher.search` as one HTML page.

    Args:
        results: the search results (columns ``query``, ``query_index``, ``rank``, ``path``,
            ``score``, ``cosine_mean``, ``cosine_std``, ``probability``; ``cosine_std_query``
            and ``cosine_std_item``, when present, are shown under the std).
        image_root: folder the paths are relative to (thumbnails are embedded; missing
            files show a placeholder).
        thumbnail_px: thumbnail side in pixels.
        title: page title.

    Returns:
        The HTML text.
    """
    mean, std = results["cosine_mean"].to_numpy(float), results["cosine_std"].to_numpy(float)
    low = float(np.min(mean - 2 * std)) if len(results) else 0.0
    high = float(np.max(mean + 2 * std)) if len(results) else 1.0
    low, high = max(low, -1.0), min(max(high, low + 1e-6), 1.0)
    unsure = float(np.quantile(std, 0.75)) if len(results) >= 4 else np.inf
    score_name = results.attrs.get("score", "score")
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
           f"<style>{_STYLE.replace('THUMB', str(thumbnail_px))}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>",
           f"<p class='note'>Ranked by <b>{html.escape(str(score_name))}</b>. Bars: expected cosine on a shared axis "
           f"[{low:.3f}, {high:.3f}]; thick whisker one std, thin whisker two. Under each std, the std due to the "
           "query's noise alone and to the item's alone (the rest is joint). Shaded rows are the most uncertain "
           "quarter.</p>"]
    warnings = results.attrs.get("query_warning") or []
    for query_index, group in results.groupby("query_index", sort=True):
        out.append(f"<h2>{html.escape(str(group['query'].iloc[0]))}</h2>")
        if query_index < len(warnings) and warnings[query_index]:
            out.append(f"<p class='warning'>{html.escape(warnings[query_index])}</p>")
        out.append("<table>")
        out.append("<tr><th>#</th><th></th><th>path</th><th>score</th><th>expected cosine</th><th></th>"
                   "<th>p(match)</th></tr>")
        for row in group.sort_values("rank").itertuples(index=False):
            out.append(_row(row, image_root, thumbnail_px, low, high, row.cosine_std >= unsure))
        out.append("</table>")
    if not len(results):
        out.append("<p>No results.</p>")
    out.append("</body></html>")
    return "\n".join(out)


def _row(row, image_root, thumbnail_px, low, high, is_unsure) -> str:
    uri = _thumbnail(Path(image_root) / row.path, thumbnail_px) if image_root is not None else None
    image = f"<img class='thumb' src='{uri}' alt=''>" if uri else "<div class='missing'>no image</div>"
    probability = "" if pd.isna(row.probability) else f"{row.probability:.2f}"
    tag = " <span class='tag'>unsure</span>" if is_unsure else ""
    return (f"<tr class='{'unsure' if is_unsure else ''}'><td class='num'>{row.rank}</td><td>{image}</td>"
            f"<td>{html.escape(row.path)}{tag}</td><td class='num'>{row.score:.4f}</td>"
            f"<td class='num'>{row.cosine_mean:.3f} &plusmn; {row.cosine_std:.3f}{_split(row)}</td>"
            f"<td>{_bar(row.cosine_mean, row.cosine_std, low, high)}</td><td class='num'>{probability}</td></tr>")


def _split(row) -> str:
    """``query ± a / item ± b`` under the std, or nothing when the row lacks the split."""
    query, item = getattr(row, "cosine_std_query", None), getattr(row, "cosine_std_item", None)
    if query is None or item is None or pd.isna(query) or pd.isna(item):
        return ""
    return f"<br><span class='note'>query &plusmn; {query:.3f} / item &plusmn; {item:.3f}</span>"
