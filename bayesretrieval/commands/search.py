"""``bayesretrieval search``: text-to-image (or image-to-image) search of an index directory."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from bayesretrieval.cli import CommandError, format_frame
from bayesretrieval.options import DEFAULT_ESTIMATOR, DEFAULT_MAX_CANDIDATES, CosineEstimator, ScoreName

if TYPE_CHECKING:
    import pandas as pd

    from bayesretrieval.queries.filters import ItemFilter

DESCRIPTION = """\
Search an index built by `bayesretrieval build-index` with one or more text queries
(or --image files to find similar images). Scores (docs/math.md section 5):

  expected     expected cosine E[cos]
  lcb          E[cos] - kappa * std   (risk-averse: prefers results the model is sure of)
  ucb          E[cos] + kappa * std   (optimistic)
  lcb_item     E[cos] - kappa * std_i (risk-averse on the item's own noise only)
  probability  calibrated probability of a match (run `bayesretrieval calibrate` first)
  map          plain cosine of the mean embeddings (deterministic CLIP)

Results are reranked exactly from the stored means; the `exact` column says whether a
query's top-k is certified equal to a brute-force rerank of the whole collection. The
cosine's std splits by where the noise comes from (docs/math.md section 7): `std q/i`
is the std due to the query's noise alone / the item's alone (JSON and CSV:
cosine_std_query, cosine_std_item); the rest of the variance is joint. `P(best)`
(best_match_probability) is the probit softmax over the query's k results: the chance
each is the match among them, as BayesVLM's zero-shot probit gives over classes.

--image queries on an index built with --store-activations account for the image
projection both images share (docs/math.md section 12): an indexed image found by itself
scores cosine 1 with std 0. Those results are the best of max(4k, k+32) candidates by
the independent score, rescored, so they are never marked exact, and `std q/i` shows
`-` (the parts are not separable when the two noises are correlated).

Several index directories (the shards of one collection, built with one model and one
posterior) are searched as one: `bayesretrieval search INDEX_A INDEX_B "a dog"`. Leading
arguments that are index directories (they hold a manifest.json) are shards, the rest
are queries; each result row names its `shard` (JSON and CSV: the shard's position
among the directories, listed under "shards")."""

OUTPUT_FORMATS = ("table", "json", "csv")
TABLE_COLUMNS = ["query", "rank", "score", "cosine_mean", "cosine_std", "cosine_std_query", "cosine_std_item",
                 "probability", "best_match_probability", "path", "exact"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``search`` subcommand."""
    parser = subparsers.add_parser("search", help="search an index with text (or image) queries",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("index_dir", type=Path, metavar="INDEX_DIR",
                        help="the index directory; further index directories may follow (shards)")
    parser.add_argument("queries", nargs="*", metavar="QUERY", help="query texts")
    parser.add_argument("--query-file", type=Path, help="queries: .txt (one per line), .json (list), .csv/.parquet "
                                                        "(column 'query')")
    parser.add_argument("--image", type=Path, nargs="+", help="image files as queries (find similar images)")
    parser.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    parser.add_argument("--score", default=ScoreName.EXPECTED.value, help=f"one of {[s.value for s in ScoreName]}")
    parser.add_argument("--kappa", type=float, default=1.0, help="std multiplier for lcb/ucb/lcb_item (default 1)")
    parser.add_argument("--threshold", type=float, help="keep results with calibrated probability >= this")
    parser.add_argument("--estimator", default=DEFAULT_ESTIMATOR.value,
                        help=f"cosine estimator, one of {[e.value for e in CosineEstimator]}")
    parser.add_argument("--ids", help="only these item ids (comma-separated)")
    parser.add_argument("--path-prefix", help="only paths starting with this")
    parser.add_argument("--glob", help="only paths matching this pattern, e.g. 'beach/*.jpg'")
    parser.add_argument("--where", help="only items whose Parquet columns satisfy this, e.g. 'width >= 512'")
    parser.add_argument("--format", choices=OUTPUT_FORMATS, default="table", help="output format (default table)")
    parser.add_argument("--html", type=Path, metavar="OUT.html", help="also write an HTML page with thumbnails")
    parser.add_argument("--image-root", type=Path, help="folder the item paths are relative to (for --html; "
                                                        "default: the indexed folder)")
    parser.add_argument("--nprobe", type=int, help="IVF lists to probe")
    parser.add_argument("--candidates", type=int, help="first-round candidates per query")
    parser.add_argument("--max-candidates", type=int, default=DEFAULT_MAX_CANDIDATES,
                        help="give up certifying a query beyond this many candidates "
                             f"(default {DEFAULT_MAX_CANDIDATES})")
    parser.add_argument("--device", default="cpu", help="where to run the model (default cpu)")
    parser.add_argument("--in-memory", action="store_true",
                        help="load the index arrays into RAM instead of memory-mapping them (N x D x 4 bytes of means)")
    parser.add_argument("--torch-threads", type=int,
                        help="torch intra-op threads for this process (default: torch's own; 1 avoids contention "
                             "with FAISS's threads on machines with few cores)")
    parser.set_defaults(run=run)


def read_query_file(path: Path) -> list[str]:
    """Queries from a .txt, .json, .csv or .parquet file.

    Raises:
        CommandError: if the file is missing or does not parse.
    """
    import pandas as pd

    if not path.is_file():
        raise CommandError(f"query file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            data = data.get("queries") if isinstance(data, dict) else data
            if not isinstance(data, list) or not all(isinstance(q, str) for q in data):
                raise ValueError("expected a JSON list of strings (or {\"queries\": [...]})")
            return data
        if suffix in (".csv", ".parquet"):
            frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
            if "query" not in frame.columns:
                raise ValueError(f"no 'query' column (columns: {list(frame.columns)})")
            return [str(q) for q in frame["query"]]
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (ValueError, UnicodeDecodeError, OSError, pd.errors.ParserError) as err:
        raise CommandError(f"query file {path} does not parse: {err}") from None


def _item_filter(args) -> ItemFilter | None:
    from bayesretrieval.queries.filters import ItemFilter

    ids = None
    if args.ids:
        try:
            ids = [int(part) for part in args.ids.split(",") if part.strip()]
        except ValueError:
            raise CommandError(f"--ids must be comma-separated integers, got {args.ids!r}") from None
    item_filter = ItemFilter(ids, args.path_prefix, args.glob, args.where)
    return None if item_filter.is_empty else item_filter


def _queries(args):
    texts = list(args.queries) + (read_query_file(args.query_file) if args.query_file else [])
    if args.image:
        from PIL import Image, UnidentifiedImageError

        if texts:
            raise CommandError("give text queries or --image, not both")
        images = []
        for path in args.image:
            try:
                with Image.open(path) as image:
                    images.append(image.convert("RGB"))
                    images[-1].filename = str(path)
            except (OSError, UnidentifiedImageError) as err:
                raise CommandError(f"cannot read image query {path}: {err}") from None
        return images
    if not texts:
        raise CommandError("no query given (pass QUERY texts, --query-file or --image)")
    empty = [i for i, text in enumerate(texts) if not text.strip()]
    if empty:
        raise CommandError(f"query {empty[0] + 1} is empty")
    return texts


def _split_index_dirs(args) -> list[Path]:
    """``INDEX_DIR`` and the leading ``QUERY`` arguments that are index directories (shards).

    Removes the shards from ``args.queries``.
    """
    from bayesretrieval.store.format import MANIFEST_FILE

    index_dirs = [args.index_dir]
    while args.queries and (Path(args.queries[0]) / MANIFEST_FILE).is_file():
        index_dirs.append(Path(args.queries.pop(0)))
    return index_dirs


def _check_arguments(args) -> None:
    if args.k <= 0:
        raise CommandError(f"-k must be a positive integer, got {args.k}")
    if args.score not in {s.value for s in ScoreName}:
        raise CommandError(f"unknown score {args.score!r}; expected one of {[s.value for s in ScoreName]}")
    if args.estimator not in {e.value for e in CosineEstimator}:
        raise CommandError(f"unknown estimator {args.estimator!r}; expected one of "
                           f"{[e.value for e in CosineEstimator]}")
    if not args.index_dir.is_dir():
        raise CommandError(f"index directory not found: {args.index_dir}")


def format_results(results: pd.DataFrame, output_format: str) -> str:
    """The results as a readable table, JSON records or CSV (with the shards' directories, if several)."""
    header = {"score": results.attrs.get("score"), "exact": results.attrs.get("exact")}
    if "shards" in results.attrs:
        header["shards"] = results.attrs["shards"]
    return format_frame(results, output_format, header, "results", _results_table, "no results")


def _results_table(results: pd.DataFrame) -> str:
    import pandas as pd

    view = results[TABLE_COLUMNS].copy()
    if "shards" in results.attrs:
        shards = results.attrs["shards"]
        view["path"] = [f"{shards[shard]}: {path}" for shard, path in zip(results.shard, results.path)]
    view["cosine"] = [f"{m:.3f} ± {s:.3f}" for m, s in zip(view.cosine_mean, view.cosine_std)]
    view["std q/i"] = ["-" if pd.isna(q) else f"{q:.3f}/{i:.3f}"  # NaN: not separable (shared projection)
                       for q, i in zip(view.cosine_std_query, view.cosine_std_item)]
    view["score"] = view.score.map(lambda v: f"{v:.4f}")
    view["probability"] = view.probability.map(lambda v: "" if pd.isna(v) else f"{v:.2f}")
    view["P(best)"] = view.best_match_probability.map(lambda v: f"{v:.2f}")
    columns = ["query", "rank", "score", "cosine", "std q/i", "probability", "P(best)", "path", "exact"]
    if view.probability.eq("").all():
        columns.remove("probability")
    return view[columns].to_string(index=False)


def _html_page(results: pd.DataFrame, searcher, image_root: Path | None, title: str) -> str:
    """The results page; rows of several shards show (and thumbnail) their files by absolute path."""
    from bayesretrieval.queries.report import render_html

    if "shard" not in results:
        return render_html(results, image_root or Path(searcher.reader.manifest.source_root), title=title)
    roots = [Path(shard.reader.manifest.source_root) for shard in searcher.searchers]
    files = results.assign(path=[str(roots[shard] / path) for shard, path in zip(results.shard, results.path)])
    return render_html(files, Path("/"), title=title)


def run(args: argparse.Namespace) -> int:
    """Search and print the results."""
    import numpy as np

    from bayesretrieval.queries.searcher import Searcher
    from bayesretrieval.store import IndexReader

    _check_arguments(args)
    index_dirs = _split_index_dirs(args)
    queries = _queries(args)
    item_filter = _item_filter(args)
    sharded = len(index_dirs) > 1
    if sharded and (args.ids or args.image_root):
        raise CommandError("--ids and --image-root name one index; with several index directories filter by "
                           "--path-prefix, --glob or --where")
    reader = IndexReader.open(args.index_dir)  # fail fast on a directory that is not an index
    if item_filter is not None and item_filter.item_ids is not None:
        ids = np.asarray(item_filter.item_ids, dtype=np.int64)
        unknown = ids[reader.positions(ids) < 0]
        if unknown.size:
            raise CommandError(f"--ids: {unknown.size} ids are not in the index, e.g. {unknown[:5].tolist()}")
    searcher = Searcher.open(index_dirs if sharded else args.index_dir, device=args.device,
                             estimator=args.estimator, in_memory=args.in_memory, torch_threads=args.torch_threads)
    results = searcher.search(queries, k=args.k, score=args.score, kappa=args.kappa, threshold=args.threshold,
                              where=item_filter, nprobe=args.nprobe, candidates=args.candidates,
                              max_candidates=args.max_candidates)
    sys.stdout.write(format_results(results, args.format).rstrip("\n") + "\n")
    if args.html:
        page = _html_page(results, searcher, args.image_root, f"search: {' '.join(map(str, index_dirs))}")
        args.html.write_text(page, encoding="utf-8")
        print(f"wrote {args.html}", file=sys.stderr)
    for warning in results.attrs.get("query_warning", []):
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    if results.attrs.get("shared_projection"):
        print("note: image queries rescored for the projection both images share (docs/math.md section 12): "
              "the best of max(4k, k+32) candidates, not certified; std q/i not separable", file=sys.stderr)
    elif not results.attrs.get("exact", True):
        print("note: some results are approximate (certificate not reached or approximate FAISS index)",
              file=sys.stderr)
    return 0
