"""``bayesretrieval export``: write an index in another tool's layout."""

from __future__ import annotations

import argparse
from pathlib import Path

from bayesretrieval.options import DEFAULT_ROWS_PER_FILE, ExportFormat


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``export`` subcommand."""
    parser = subparsers.add_parser(
        "export",
        help="export an index (e.g. clip-retrieval's img_emb/ + metadata/ layout)",
        description="Write the current version of INDEX_DIR to OUT in another layout. "
        "clip-retrieval: img_emb/img_emb_{N}.npy (float16, L2-normalised means) row-aligned "
        "with metadata/metadata_{N}.parquet (image_path, item_id, uncertainty columns), "
        "as embedding-reader and autofaiss read it. OUT is replaced whole (written beside it, "
        "then renamed over it, with a bayesretrieval-export.json marker), so it must be new, "
        "empty, or an earlier export; any other non-empty folder is refused.",
    )
    parser.add_argument("index_dir", type=Path, metavar="INDEX_DIR")
    parser.add_argument("out", type=Path, metavar="OUT")
    parser.add_argument("--format", dest="export_format", choices=[f.value for f in ExportFormat],
                        default=ExportFormat.CLIP_RETRIEVAL.value)
    parser.add_argument("--rows-per-file", type=int, default=DEFAULT_ROWS_PER_FILE)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``export``."""
    from bayesretrieval.indexing.export import export_index

    written = export_index(args.index_dir, args.out, args.export_format, args.rows_per_file)
    print(f"wrote {len(written)} files to {args.out}")
    return 0
