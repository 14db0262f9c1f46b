"""``bayesretrieval build-index``: an uncertainty-aware index over an image folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from bayesretrieval.cli import CommandError, image_text_values, pretrained_tag
from bayesretrieval.options import DEFAULT_MAX_PIXELS, DEFAULT_MODEL, DEFAULT_PRETRAINED, BuildEngine, default_workers

if TYPE_CHECKING:
    from bayesretrieval.indexing import BuildReport
    from bayesretrieval.posterior import PosteriorPair

BAYESVLM = "bayesvlm"
NONE = "none"

DESCRIPTION = """\
Encode every image under SOURCE (recursively) with an open_clip model, compute each
image's posterior scalars (docs/math.md section 4) and write INDEX_DIR: Parquet items table,
memory-mappable arrays, a FAISS index over expected-norm-scaled means, the posterior,
and a table of skipped files with reasons. SOURCE may instead be a Parquet file of
precomputed embeddings (id or path, embedding, optional variance_diag/variance_lowrank).

Re-running updates the index: only new and changed files (size, mtime) are encoded,
deleted ones are dropped, ids stay. A killed build resumes from its shards in
INDEX_DIR/work. Readers always see a complete version. --model, --pretrained,
--posterior, --variance and --[no-]store-activations default to what the existing index
records (else to the defaults below). A model, posterior, variance, activations or format
mismatch with the existing index is an error unless --rebuild (adding activations to an
index without them re-encodes every image). A damaged or incomplete current version (see `bayesretrieval
verify`) is repaired: intact stored rows are reused, the rest is encoded again.

A posterior must have been fitted for the weights it is used with; one without an
identity (BayesVLM's formats) is accepted for ViT-B-32/laion2b_s34b_b79k only, unless
--force-posterior. A SOURCE folder without images is an error unless --allow-empty.

--lastblock DIR takes each image's covariance from a last-block posterior (the last
transformer block's MLP, or MLP and attention output, with the projection; fitted by
`bayesretrieval fit-posterior --lastblock`, docs/math.md section 13) and stores it as
the --variance columns (default diag); --posterior still gives the query side. It costs
about twice the image tower's time per item. Image folders only; 'none' drops it.

--posterior bayesvlm fetches BayesVLM's published factors for ViT-B-32/laion2b_s34b_b79k
(sha256-verified, cached); offline, pass the folder holding them instead.

--engine ray decodes in Ray Data CPU tasks and encodes in a pool of model actors (one
per GPU of the cluster, or --ray-actors), each writing its shards to INDEX_DIR/work;
this process plans, builds FAISS and publishes as with the local engine. It runs on the
cluster at --ray-address (SOURCE, INDEX_DIR and the checkpoint must be at the same path
on every node), else on a local Ray instance. Needs the ray extra:
pip install 'bayesretrieval[ray]'."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``build-index`` subcommand."""
    parser = subparsers.add_parser(
        "build-index",
        help="index an image folder (or precomputed embeddings) with per-item uncertainty",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", type=Path, metavar="SOURCE", help="image folder, or embeddings .parquet")
    parser.add_argument("index_dir", type=Path, metavar="INDEX_DIR", help="index directory (created or updated)")
    parser.add_argument("--model", help=f"open_clip architecture (default: the index's, else {DEFAULT_MODEL})")
    parser.add_argument("--pretrained", help="open_clip tag or checkpoint path; 'none' for random weights "
                                             f"(default: the index's, else {DEFAULT_PRETRAINED})")
    parser.add_argument("--posterior",
                        help="posterior path (project format, BayesVLM directory or BayesVLM-Base "
                             f"safetensors) or '{BAYESVLM}' for the published factors "
                             f"(default: the index's, else {BAYESVLM})")
    parser.add_argument("--force-posterior", action="store_true",
                        help="use a posterior fitted for other weights, or one without an identity (warns)")
    parser.add_argument("--pseudo-data-count", "-n", type=float, nargs="+", help="override n (one, or image text)")
    parser.add_argument("--prior-precision", "--lambda", type=float, nargs="+",
                        help="override lambda (one, or image text)")
    parser.add_argument("--faiss", dest="faiss_factory",
                        help="FAISS factory string (default: Flat up to 100k items, then IVF)")
    parser.add_argument("--variance", help="per-item covariance columns: kfac (none beyond the posterior "
                                           "scalars), diag, lowrank:R (default: the index's, else kfac)")
    parser.add_argument("--lastblock", metavar="DIR",
                        help="last-block posterior for the items' covariance, or 'none' (default: the index's, "
                             "else none)")
    parser.add_argument("--store-activations", action=argparse.BooleanOptionalAction, default=None,
                        help="store each image's pre-projection activation (activations.npy, h float32 per "
                             "item: 3 KB for ViT-B-32) so that image queries score near-duplicates right "
                             "(an indexed image searched for itself gets cosine 1, std 0); "
                             "default: the index's, else off")
    parser.add_argument("--batch-size", type=int, default=64, help="images per encoder call")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="image-decoding processes (0: in-process)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="skip larger images as too_large")
    parser.add_argument("--device", default="cpu", help="torch device for the encoder")
    parser.add_argument("--engine", choices=[e.value for e in BuildEngine], default=BuildEngine.LOCAL.value,
                        help="where files are decoded and encoded: this process (local) or a Ray cluster (ray)")
    parser.add_argument("--ray-address", help="Ray cluster address for --engine ray (default: a local Ray instance)")
    parser.add_argument("--ray-actors", type=int,
                        help="encoder actors for --engine ray (default: one per GPU of the cluster, else one)")
    parser.add_argument("--rebuild", action="store_true", help="re-encode everything, replacing a mismatched index")
    parser.add_argument("--allow-empty", action="store_true", help="publish an empty index for a folder without images")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def resolve_posterior(spec: str, model_name: str, pretrained: str | None, n, lam) -> PosteriorPair:
    """Load ``--posterior``: ``bayesvlm`` (published, fetched) or a path in any supported format."""
    from bayesretrieval.posterior import load_posterior
    from bayesretrieval.posterior.hub import load_published_posterior

    if spec == BAYESVLM:
        return load_published_posterior(model_name, pretrained, pseudo_data_count=n, prior_precision=lam)
    return load_posterior(Path(spec), n, lam)


def fill_recorded_settings(args: argparse.Namespace) -> None:
    """Fill ``--model``, ``--pretrained``, ``--posterior``, ``--lastblock``, ``--variance`` and ``--store-activations``.

    Each comes from the existing index, else from the defaults.

    Re-running ``build-index SRC INDEX`` thus updates the index with what built it (the
    posteriors stored in its current version), with no download and no mismatch. With a
    last-block posterior and no ``--variance``, the variance columns default to ``diag``.
    """
    from bayesretrieval.indexing.existing import published_version
    from bayesretrieval.store import format as fmt

    recorded = {}
    if not args.rebuild:
        try:
            published = published_version(args.index_dir)
        except ValueError:
            published = None  # another format version: the build reports it
        if published is not None:
            folder, manifest, _ = published
            recorded = {"model": manifest.model["model_name"], "pretrained": manifest.model.get("pretrained") or NONE,
                        "posterior": str(folder / fmt.POSTERIOR_DIR), "variance": manifest.variance,
                        "store_activations": manifest.has_activations,
                        "lastblock": str(folder / fmt.LASTBLOCK_DIR) if manifest.lastblock else NONE}
    defaults = {"model": DEFAULT_MODEL, "pretrained": DEFAULT_PRETRAINED, "posterior": BAYESVLM, "lastblock": NONE,
                "variance": "kfac", "store_activations": False}
    variance_given = args.variance is not None
    for name, default in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, recorded.get(name, default))
    if not variance_given and str(args.lastblock).lower() != NONE and args.variance == "kfac":
        args.variance = "diag"  # a last-block covariance lives in variance columns


def run(args: argparse.Namespace) -> int:
    """Run ``build-index``."""
    from bayesretrieval.encoders import ClipEncoder, ModelIdentity, file_sha256
    from bayesretrieval.indexing import BuildConfig, IndexBusyError
    from bayesretrieval.indexing.embeddings_input import build_index_from_embeddings
    from bayesretrieval.indexing.ray_engine import RayUnavailableError

    n = image_text_values(args.pseudo_data_count, "--pseudo-data-count")
    lam = image_text_values(args.prior_precision, "--prior-precision")
    if not args.source.exists():
        raise CommandError(f"source not found: {args.source}")
    if args.source.is_file() and str(args.lastblock or NONE).lower() != NONE:
        raise CommandError("--lastblock needs an image folder: precomputed embeddings carry their own variance columns")
    fill_recorded_settings(args)
    pretrained = pretrained_tag(args.pretrained)
    posterior = resolve_posterior(args.posterior, args.model, pretrained, n, lam)
    lastblock = None if args.source.is_file() else _load_lastblock(args)
    config = BuildConfig(batch_size=args.batch_size, workers=args.workers, faiss_factory=args.faiss_factory,
                         variance=args.variance, rebuild=args.rebuild, max_pixels=args.max_pixels,
                         force_posterior=args.force_posterior, allow_empty=args.allow_empty,
                         store_activations=args.store_activations, engine=args.engine,
                         ray_address=args.ray_address, ray_actors=args.ray_actors)
    try:
        if args.source.is_file():
            sha = file_sha256(pretrained) if pretrained and Path(pretrained).is_file() else None
            report = build_index_from_embeddings(
                args.source, args.index_dir, posterior, ModelIdentity(args.model, pretrained, sha), config
            )
        else:
            encoder = ClipEncoder.from_pretrained(args.model, pretrained, device=args.device)
            report = _build_with_progress(args, encoder, posterior, config, lastblock)
    except (IndexBusyError, RayUnavailableError) as err:
        raise CommandError(str(err)) from None
    print(summary(report))
    return 0


def _load_lastblock(args: argparse.Namespace):
    """The ``--lastblock`` posterior, or ``None`` for ``none``."""
    from bayesretrieval.posterior.lastblock_posterior import METADATA_FILE, LastBlockPosterior

    if str(args.lastblock).lower() == NONE:
        return None
    if not (Path(args.lastblock) / METADATA_FILE).is_file():
        raise CommandError(f"--lastblock: no last-block posterior at {args.lastblock} (no {METADATA_FILE}; "
                           "write one with `bayesretrieval fit-posterior --lastblock`)")
    return LastBlockPosterior.load(args.lastblock)


def _build_with_progress(args, encoder, posterior, config, lastblock) -> BuildReport:
    from bayesretrieval.indexing import build_index

    bar = tqdm(unit="img", dynamic_ncols=True, disable=args.no_progress, desc="encoding")

    def update(progress) -> None:
        if bar.total != progress.total:
            bar.reset(total=progress.total)
            bar.update(progress.done)
        else:
            bar.update(progress.done - bar.n)
        bar.set_postfix(skipped=progress.skipped, refresh=False)

    try:
        return build_index(args.source, args.index_dir, encoder, posterior, config, on_progress=update,
                           lastblock=lastblock)
    finally:
        bar.close()


def summary(report: BuildReport) -> str:
    """A few lines for the end of the command: counts, skips by reason, time."""
    manifest = report.manifest
    lines = [
        f"index {manifest.version}: {report.indexed} items"
        + ("" if report.published else " (nothing changed, not republished)"),
        f"  processed {report.encoded} files, resumed {report.resumed}, unchanged {report.reused}, "
        f"removed {report.removed}",
    ]
    skipped = sum(report.skipped.values())
    detail = ", ".join(f"{reason} {count}" for reason, count in report.skipped.items())
    lines.append(f"  skipped {skipped}" + (f" ({detail})" if detail else ""))
    rate = report.encoded / report.seconds if report.seconds > 0 else 0.0
    lines.append(f"  {report.seconds:.1f} s ({rate:.1f} files/s processed)")
    return "\n".join(lines)
