"""``bayesretrieval verify``: check every file of an index's current version against its manifest."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``verify`` subcommand."""
    parser = subparsers.add_parser(
        "verify",
        help="check an index's files against the sha256 checksums in its manifest",
        description="Read every file of the current version of INDEX_DIR and compare it with the sha256 "
        "the manifest recorded when the version was published. Prints the files checked, or names every "
        "file that is missing or damaged and exits with status 2.",
    )
    parser.add_argument("index_dir", type=Path, metavar="INDEX_DIR")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``verify``."""
    from bayesretrieval.store import format as fmt
    from bayesretrieval.store.reader import current_version, verify_version

    manifest = verify_version(args.index_dir / fmt.VERSIONS_DIR / current_version(args.index_dir))
    print(f"ok: {args.index_dir} version {manifest.version}, {manifest.item_count} items, "
          f"{len(manifest.files)} files intact")
    return 0
