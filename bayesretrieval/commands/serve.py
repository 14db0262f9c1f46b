"""``bayesretrieval serve``: an HTTP API over one or several index directories (FastAPI + uvicorn, ``serve`` extra)."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import sys
from pathlib import Path

from bayesretrieval.cli import CommandError
from bayesretrieval.options import (
    DEFAULT_SERVE_HOST,
    DEFAULT_SERVE_PORT,
    MAX_QUERIES_PER_REQUEST,
    MAX_QUERY_CHARS,
    MAX_RESULTS_PER_QUERY,
    MAX_UPLOAD_BYTES,
    SERVE_TOKEN_ENV,
)

DESCRIPTION = f"""\
Serve an index built by `bayesretrieval build-index` over HTTP: JSON endpoints for text
and image search (the parameters and result columns of `bayesretrieval search`, plus
each query's warning), one item's metadata and thumbnail, the collection audit, health
and version; the OpenAPI docs are at /docs. The process keeps one searcher open and
moves to a new index version when a build publishes one (searches in flight finish on
theirs).

Several INDEX_DIRs (built with one model and posterior) are served as one collection:
searches and the audit cover every directory, each result names its `shard` (the
directory's position among the arguments), and the item routes take ?shard=N.

Security: it listens on 127.0.0.1 unless --host says otherwise, and any other address
needs an API token (--token-file or ${SERVE_TOKEN_ENV}); clients then send
'Authorization: Bearer TOKEN'. Images are served by item id only, from the indexed
folder. Limits: {MAX_QUERY_CHARS} characters per query, {MAX_QUERIES_PER_REQUEST} queries per request,
k <= {MAX_RESULTS_PER_QUERY}, uploads of {MAX_UPLOAD_BYTES // 2**20} MB and build-index's decoded-pixel limit.
No CORS headers unless --cors-origin is given.

Needs the serve extra: pip install 'bayesretrieval[serve]'."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``serve`` subcommand."""
    parser = subparsers.add_parser("serve", help="serve an index over HTTP (JSON API with OpenAPI docs)",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("index_dirs", type=Path, nargs="+", metavar="INDEX_DIR",
                        help="an index built by build-index; several: the shards of one collection")
    parser.add_argument("--host", default=DEFAULT_SERVE_HOST,
                        help="address to listen on (default %(default)s; any other needs an API token)")
    parser.add_argument("--port", type=int, default=DEFAULT_SERVE_PORT, help="port (default %(default)s)")
    parser.add_argument("--token-file", type=Path, metavar="FILE",
                        help=f"file whose first line is the API token (default: ${SERVE_TOKEN_ENV} if set)")
    parser.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                        help="allow browser calls from this origin, e.g. http://localhost:3000 (repeatable)")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes, each with its own searcher (default 1)")
    parser.add_argument("--device", default="cpu", help="where to run the model (default cpu)")
    parser.add_argument("--torch-threads", type=int,
                        help="torch intra-op threads (default: torch's own; 1 avoids contention with FAISS)")
    parser.set_defaults(run=run)


def url_of(host: str, port: int) -> str:
    """The base URL clients use for ``host:port`` (IPv6 addresses in brackets)."""
    return f"http://[{host}]:{port}/" if ":" in host and not host.startswith("[") else f"http://{host}:{port}/"


def _serve_extra():
    """The ``uvicorn`` module, once FastAPI, uvicorn and python-multipart are known to be installed.

    Raises:
        CommandError: naming the missing package and the extra that installs it.
    """
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as err:
        missing = err.name
    else:
        if importlib.util.find_spec("python_multipart") or importlib.util.find_spec("multipart"):
            return uvicorn
        missing = "python-multipart"
    raise CommandError(f"serving needs the serve extra (missing {missing}): pip install 'bayesretrieval[serve]'")


def run(args: argparse.Namespace) -> int:
    """Check the options, open the index, print where it is served, and serve until interrupted."""
    from bayesretrieval.service.security import check_exposure, read_token

    for index_dir in args.index_dirs:
        if not index_dir.is_dir():
            raise CommandError(f"index directory not found: {index_dir}")
    if not 1 <= args.port <= 65535:
        raise CommandError(f"--port must be in 1..65535, got {args.port}")
    token = read_token(args.token_file)
    check_exposure(args.host, token)
    if args.workers < 1:
        raise CommandError(f"--workers must be at least 1, got {args.workers}")
    uvicorn = _serve_extra()
    logging.getLogger("bayesretrieval.service").setLevel(logging.INFO)  # the access log
    common = {"host": args.host, "port": args.port, "access_log": False, "log_level": "info", "server_header": False}
    if args.workers == 1:
        from bayesretrieval.service.app import create_app

        app = create_app(_served(args.index_dirs), token, cors_origins=args.cors_origin or (), device=args.device,
                         torch_threads=args.torch_threads)
        _announce(args, app.state.searcher.snapshot().readers, token)
        uvicorn.run(app, **common)
    else:
        _serve_with_workers(args, token, uvicorn, common)
    print("stopped", file=sys.stderr)
    return 0


def _served(index_dirs: list):
    """What ``create_app`` serves: the one index directory, or the list of shards."""
    return index_dirs[0] if len(index_dirs) == 1 else index_dirs


def _announce(args, readers, token: str | None) -> None:
    """Print the URL and each served directory's version and item count (one line per shard when several)."""
    url = url_of(args.host, args.port)
    workers = f", {args.workers} worker processes" if args.workers > 1 else ""
    shards = [f"{index_dir} (index version {reader.manifest.version}, {len(reader)} items{workers})"
              for index_dir, reader in zip(args.index_dirs, readers)]
    if len(shards) == 1:
        print(f"serving {shards[0]} at {url} (API docs: {url}docs)", flush=True)
    else:
        print(f"serving {len(shards)} index directories as one collection at {url} (API docs: {url}docs)",
              *(f"  shard {shard}: {line}" for shard, line in enumerate(shards)), sep="\n", flush=True)
    if token is not None:
        print("requests need 'Authorization: Bearer TOKEN'", flush=True)


def _serve_with_workers(args, token: str | None, uvicorn, common: dict) -> None:
    """Run ``args.workers`` uvicorn worker processes, each with its own searcher (they share the index directory)."""
    import json
    import os

    from bayesretrieval.service.app import SERVE_CONFIG_ENV
    from bayesretrieval.store import IndexReader

    with contextlib.ExitStack() as stack:  # fail here, not in every worker, on a directory that is no index
        _announce(args, [stack.enter_context(IndexReader.open(index_dir)) for index_dir in args.index_dirs], token)
    resolved = [str(index_dir.resolve()) for index_dir in args.index_dirs]
    os.environ[SERVE_CONFIG_ENV] = json.dumps({
        "index_dir": _served(resolved), "cors_origins": args.cors_origin or [], "device": args.device,
        "token_file": str(args.token_file.resolve()) if args.token_file else None,
        "torch_threads": args.torch_threads})
    uvicorn.run("bayesretrieval.service.app:app_from_environment", factory=True, workers=args.workers, **common)
