"""``bayesretrieval audit``: the items of an index the model is least sure about (no query needed)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from bayesretrieval.cli import CommandError, format_frame
from bayesretrieval.options import AuditScore

if TYPE_CHECKING:
    import pandas as pd

DESCRIPTION = """\
List the items of an index whose embeddings the posterior is least sure of, most
uncertain first, from the per-item scalars the index already stores (one pass over
the collection; no model is loaded). By default items are ranked by q = a^T A^-1 a, how
far the item's activation lies from the data the posterior was fitted on (on the small
world it ranks noisy, occluded, low-contrast and photo-like images first); --by
uncertainty ranks by the embedding's total variance relative to its squared norm,
tr S / |mu|^2 (docs/math.md section 4).

Columns: rank (1 = least certain), item_id, path, uncertainty, percentile (percent of
the collection at or below this score), scale (q = a^T A^-1 a) and cosine_std (the
typical std of the item's cosine to a random direction)."""

OUTPUT_FORMATS = ("table", "json", "csv")
FORMS = ("kfac", "diag", "lowrank")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``audit`` subcommand."""
    parser = subparsers.add_parser("audit", help="list the items the model is least sure about",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("index_dir", type=Path, metavar="INDEX_DIR", help="an index built by build-index")
    parser.add_argument("-k", type=int, default=50, help="items to list (default 50)")
    parser.add_argument("--format", choices=OUTPUT_FORMATS, default="table", help="output format (default table)")
    parser.add_argument("--html", type=Path, metavar="OUT.html",
                        help="also write a contact sheet: thumbnails, most uncertain first")
    parser.add_argument("--image-root", type=Path, help="folder the item paths are relative to (for --html; "
                                                        "default: the indexed folder)")
    parser.add_argument("--form", choices=FORMS, help="item covariance form (default: the richest the index holds)")
    parser.add_argument("--by", choices=[s.value for s in AuditScore],
                        help="ranking score: scale (q, default when the index stores it) or uncertainty")
    parser.set_defaults(run=run)


def format_audit(frame: pd.DataFrame, output_format: str) -> str:
    """The audit as a readable table, JSON (``{"form", "item_count", "items": [...]}``) or CSV."""
    header = {"form": frame.attrs.get("form"), "item_count": frame.attrs.get("item_count")}
    return format_frame(frame, output_format, header, "items", _audit_table, "no items")


def _audit_table(frame: pd.DataFrame) -> str:
    view = frame.copy()
    for column, digits in (("uncertainty", 4), ("percentile", 1), ("scale", 4), ("cosine_std", 4)):
        view[column] = view[column].map(lambda v, d=digits: f"{v:.{d}f}")
    return view.to_string(index=False)


def run(args: argparse.Namespace) -> int:
    """Audit the index and print the least certain items."""
    from bayesretrieval.queries.audit import audit_index, render_audit_html
    from bayesretrieval.store import IndexReader

    if args.k <= 0:
        raise CommandError(f"-k must be a positive integer, got {args.k}")
    if not args.index_dir.is_dir():
        raise CommandError(f"index directory not found: {args.index_dir}")
    with IndexReader.open(args.index_dir) as reader:
        frame = audit_index(reader, args.k, args.form, args.by)
        source_root = reader.manifest.source_root
    sys.stdout.write(format_audit(frame, args.format).rstrip("\n") + "\n")
    if args.html:
        image_root = args.image_root or Path(source_root)
        args.html.write_text(render_audit_html(frame, image_root, title=f"audit: {args.index_dir}"),
                             encoding="utf-8")
        print(f"wrote {args.html}", file=sys.stderr)
    return 0
