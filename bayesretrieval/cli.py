"""The ``bayesretrieval`` console script: one entry point, one module per subcommand."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from typing import Callable, Sequence

from bayesretrieval import __version__

COMMAND_MODULES = (
    "bayesretrieval.commands.demo",
    "bayesretrieval.commands.make_world",
    "bayesretrieval.commands.train_clip",
    "bayesretrieval.commands.fit_posterior",
    "bayesretrieval.commands.build_index",
    "bayesretrieval.commands.export",
    "bayesretrieval.commands.search",
    "bayesretrieval.commands.calibrate",
    "bayesretrieval.commands.verify",
    "bayesretrieval.commands.audit",
    "bayesretrieval.commands.serve",
)


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 2, no traceback."""


def image_text_values(values: list[float] | None, name: str) -> float | tuple[float, float] | None:
    """Turn a ``nargs="+"`` option into one number, an ``(image, text)`` pair, or None.

    Raises:
        CommandError: for more than two values.
    """
    if not values:
        return None
    if len(values) > 2:
        raise CommandError(f"{name} takes one value or two (image, text), got {len(values)}")
    return values[0] if len(values) == 1 else tuple(values)


def pretrained_tag(value: str) -> str | None:
    """``--pretrained``'s value for open_clip: ``None`` (random weights) for ``none``, else the tag or path."""
    return None if str(value).lower() == "none" else value


def format_frame(frame, output_format: str, header: dict, records: str, table: Callable, empty: str) -> str:
    """A command's result table as JSON (``{**header, records: [...]}``), CSV, or readable text.

    Args:
        frame: a pandas DataFrame.
        output_format: ``json``, ``csv`` or ``table``.
        header: JSON keys written before the rows.
        records: the JSON key of the rows.
        table: renders a non-empty frame as text.
        empty: the text for an empty frame.
    """
    if output_format == "json":
        return json.dumps({**header, records: json.loads(frame.to_json(orient="records"))}, indent=2)
    if output_format == "csv":
        return frame.to_csv(index=False)
    return empty if frame.empty else table(frame)


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="bayesretrieval",
        description="Uncertainty-aware image retrieval with a Laplace-posterior CLIP.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the console script; returns the process exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("root").setLevel(logging.ERROR)
    try:
        return int(args.run(args) or 0)
    except (CommandError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
        print(f"bayesretrieval {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
