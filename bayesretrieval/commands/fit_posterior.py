"""``bayesretrieval fit-posterior``: estimate the Laplace posterior of an open_clip model."""

from __future__ import annotations

import argparse
from pathlib import Path

from bayesretrieval.cli import CommandError, image_text_values, pretrained_tag
from bayesretrieval.options import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_MODEL,
    DEFAULT_PRETRAINED,
    DEFAULT_SOURCE_BATCH,
    BlockScope,
    PriorObjective,
)

DESCRIPTION = """\
Fit the Kronecker-factored Laplace posterior over CLIP's two projections (docs/math.md
section 2) on your own image-caption pairs, and write it in the project format
(--output) and optionally in BayesVLM's directory format (--bayesvlm-output).

Pairs are a CSV/TSV/Parquet table with an image-path and a caption column (relative
paths start from --image-root, default the table's folder) or a folder of images with
a .txt caption beside each (img2dataset's layout). Missing or unreadable images are skipped and
counted. Pairs are used in chunks of --chunk-size (the InfoNCE classes); the pairs after
the last full chunk are left out. Encoding and curvature can run separately:
--save-encoded FILE.parquet [--encode-only], then --encoded FILE.parquet.

--task-prior HELD_OUT chooses n and lambda (one factor each, shared by both towers) on
held-out pairs by the retrieval likelihood instead of the evidence (docs/math.md
section 14): a pairs table or folder as for --pairs (relative paths start from the
table's own folder; the column options apply), or an encoded-pairs file. Pairs that need
encoding are encoded with the model the posterior is fitted for. The written posterior
carries the chosen prior.

--lastblock mlp|mlp_attention fits, instead, a Kronecker-factored posterior over the
image tower's last transformer block (its MLP, or MLP and attention output projection)
and the image projection (docs/math.md section 13), for `build-index --lastblock`. It
needs --pairs (the block's inputs come from the images) and one n and lambda for all
its layers."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``fit-posterior`` subcommand."""
    parser = subparsers.add_parser(
        "fit-posterior",
        help="fit the Laplace posterior of an open_clip model on image-caption pairs",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--pairs", type=Path, help="pairs table (.csv/.tsv/.parquet) or folder")
    inputs.add_argument("--encoded", type=Path, help="encoded-pairs Parquet from --save-encoded")
    parser.add_argument("-o", "--output", type=Path, help="posterior directory (project format)")
    parser.add_argument("--bayesvlm-output", type=Path, help="also write BayesVLM's directory layout")
    parser.add_argument("--save-encoded", type=Path, help="write activations and embeddings (Parquet)")
    parser.add_argument("--encode-only", action="store_true", help="only encode (needs --save-encoded)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="open_clip architecture")
    parser.add_argument(
        "--pretrained",
        default=DEFAULT_PRETRAINED,
        help="open_clip tag or checkpoint path; 'none' for random weights",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="pairs per chunk (C)")
    parser.add_argument(
        "--pseudo-data-count", "-n", type=float, nargs="+", default=[1.0], help="n (one, or image text)"
    )
    parser.add_argument(
        "--prior-precision",
        "--lambda",
        type=float,
        nargs="+",
        help="lambda (one, or image text); default: type-II maximum likelihood",
    )
    parser.add_argument(
        "--objective",
        choices=[o.value for o in PriorObjective],
        default=PriorObjective.KRONECKER.value,
        help="evidence maximised for lambda",
    )
    parser.add_argument("--task-prior", type=Path, metavar="HELD_OUT",
                        help="choose n and lambda on these held-out pairs (table, folder or encoded .parquet)")
    parser.add_argument("--lastblock", choices=[scope.value for scope in BlockScope], metavar="SCOPE",
                        help="fit the image tower's last-block posterior instead: mlp or mlp_attention")
    parser.add_argument("--batch-size", type=int, default=64, help="pairs encoded per batch")
    parser.add_argument("--workers", type=int, default=2, help="image-decoding threads")
    parser.add_argument("--source-batch", type=int, default=DEFAULT_SOURCE_BATCH)
    parser.add_argument("--image-column", help="image-path column of a table")
    parser.add_argument("--caption-column", help="caption column of a table")
    parser.add_argument("--separator", help="CSV separator (default: tab for .tsv, else comma)")
    parser.add_argument("--image-root", type=Path, help="folder relative table paths start from")
    parser.add_argument("--force", action="store_true", help="replace existing outputs")
    parser.set_defaults(run=run)


def _check_outputs(args: argparse.Namespace) -> None:
    if args.encode_only:
        if args.pairs is None or args.save_encoded is None:
            raise CommandError("--encode-only needs --pairs and --save-encoded")
    elif args.output is None:
        raise CommandError("--output is required (or --encode-only with --save-encoded)")
    if args.encoded is not None and args.save_encoded is not None:
        raise CommandError("--save-encoded needs --pairs, not --encoded")
    if args.lastblock is not None:
        given = [flag for flag, value in (("--encoded", args.encoded), ("--save-encoded", args.save_encoded),
                                          ("--bayesvlm-output", args.bayesvlm_output),
                                          ("--task-prior", args.task_prior)) if value is not None]
        if args.encode_only:
            given.append("--encode-only")
        if given:
            raise CommandError(f"--lastblock fits from --pairs into --output only; drop {', '.join(given)}")
    if args.task_prior is not None and (args.encode_only or not args.task_prior.exists()):
        raise CommandError(f"--task-prior: {args.task_prior} not found" if not args.encode_only
                           else "--task-prior fits a posterior; it cannot go with --encode-only")
    outputs = [p for p in (args.output, args.bayesvlm_output, args.save_encoded) if p is not None]
    if len({p.resolve() for p in outputs}) != len(outputs):
        raise CommandError("--output, --bayesvlm-output and --save-encoded must be different paths")
    existing = [str(p) for p in outputs if p.exists()]
    if existing and not args.force:
        raise CommandError(f"{', '.join(existing)} already exists; pass --force to replace")


def _skip_summary(counts: dict[str, int]) -> str:
    parts = [f"{count} {reason.replace('_', ' ')}" for reason, count in counts.items()]
    return f"skipped {', '.join(parts)}" if parts else "nothing skipped"


def run(args: argparse.Namespace) -> int:
    """Run ``fit-posterior``."""
    from bayesretrieval.posterior.fit import PosteriorFitter, encode_pairs
    from bayesretrieval.posterior.io import save_bayesvlm_directory
    from bayesretrieval.posterior.pairs import PairReader

    _check_outputs(args)
    reader = None
    if args.pairs is not None:
        reader = PairReader(args.pairs, args.image_column, args.caption_column, args.separator, args.image_root)
    encoder = _encoder(args) if reader is not None else None
    if args.lastblock is not None:
        return _fit_lastblock(args, encoder, reader)
    if args.encode_only:
        encode_pairs(encoder, reader, args.save_encoded, args.batch_size, args.workers, progress_bar=True)
        print(f"wrote {args.save_encoded} (encoded pairs); {_skip_summary(reader.skip_counts())}")
        return 0
    fitter = PosteriorFitter(
        chunk_size=args.chunk_size,
        pseudo_data_count=image_text_values(args.pseudo_data_count, "--pseudo-data-count"),
        prior_precision=image_text_values(args.prior_precision, "--prior-precision"),
        objective=args.objective,
        source_batch=args.source_batch,
        batch_size=args.batch_size,
        num_workers=args.workers,
        progress_bar=True,
    )
    if reader is not None:
        fitter.fit(encoder, reader, encoded_out=args.save_encoded)
    else:
        fitter.fit_encoded(args.encoded)
    lam_image, lam_text = fitter.prior_precision_
    print(
        f"fitted on {fitter.num_pairs_} pairs in chunks of {args.chunk_size} "
        f"({fitter.num_dropped_} after the last full chunk left out; {_skip_summary(fitter.skip_counts_)})"
    )
    print(f"lambda image {lam_image:.6g}, text {lam_text:.6g}")
    posterior = fitter.posterior_
    if args.task_prior is not None:
        posterior = _task_prior(args, posterior, fitter.metadata_, encoder)
    if args.bayesvlm_output is not None:
        save_bayesvlm_directory(posterior, args.bayesvlm_output)
    posterior.save(args.output)
    written = [f"{args.output} (project format)"]
    if args.bayesvlm_output is not None:
        written.append(f"{args.bayesvlm_output} (BayesVLM format)")
    if args.save_encoded is not None:
        written.append(f"{args.save_encoded} (encoded pairs)")
    print(f"wrote {', '.join(written)}")
    return 0


def _fit_lastblock(args: argparse.Namespace, encoder, reader) -> int:
    from bayesretrieval.posterior.lastblock_fit import LastBlockFitter

    values = {"--pseudo-data-count": args.pseudo_data_count, "--prior-precision": args.prior_precision or [None]}
    for flag, given in values.items():
        if len(given) != 1:
            raise CommandError(f"{flag} takes one value with --lastblock (all its layers share it), got {len(given)}")
    fitter = LastBlockFitter(args.lastblock, chunk_size=args.chunk_size, pseudo_data_count=args.pseudo_data_count[0],
                             prior_precision=values["--prior-precision"][0], objective=args.objective,
                             source_batch=args.source_batch, batch_size=args.batch_size, num_workers=args.workers,
                             progress_bar=True).fit(encoder, reader)
    fitter.posterior_.save(args.output)
    print(f"fitted the last block ({args.lastblock}) on {fitter.num_pairs_} pairs in chunks of {args.chunk_size} "
          f"({fitter.num_dropped_} after the last full chunk left out; {_skip_summary(reader.skip_counts())})")
    print(f"lambda {fitter.prior_precision_:.6g}")
    print(f"wrote {args.output} (last-block posterior)")
    return 0


def _encoder(args: argparse.Namespace):
    from bayesretrieval.encoders import ClipEncoder

    return ClipEncoder.from_pretrained(args.model, pretrained_tag(args.pretrained), device=args.device)


def _task_prior(args: argparse.Namespace, posterior, metadata, encoder):
    """The posterior with ``n`` and ``lambda`` chosen on ``--task-prior``'s pairs; prints the choice."""
    from bayesretrieval.encoders import ClipEncoder
    from bayesretrieval.posterior.fit import is_encoded_pairs, load_pairs
    from bayesretrieval.posterior.pairs import PairReader
    from bayesretrieval.posterior.task_prior import tune_prior

    held_out = args.task_prior
    if not is_encoded_pairs(held_out):
        encoder = encoder or ClipEncoder.from_pretrained(metadata.model.model_name, metadata.model.pretrained,
                                                         device=args.device)
        held_out = PairReader(held_out, args.image_column, args.caption_column, args.separator)
    try:
        held_metadata, pairs = load_pairs(held_out, encoder, args.batch_size, args.workers)
        if not held_metadata.model.matches(metadata.model):
            raise CommandError(f"--task-prior pairs were encoded with {held_metadata.model.to_dict()}, the posterior "
                               f"was fitted for {metadata.model.to_dict()}")
        tuned, report = tune_prior(posterior, pairs, metadata.logit_scale)
    except ValueError as err:
        raise CommandError(f"--task-prior: {err}") from None
    n_image, n_text = (side.pseudo_data_count for side in tuned)
    lam_image, lam_text = (side.prior_precision for side in tuned)
    print(f"task prior on {len(pairs)} held-out pairs: n x {report['n_factor']:.3g}, lambda x "
          f"{report['lambda_factor']:.3g} (retrieval log-likelihood {report['log_likelihood']:.4f}, "
          f"{report['evidence_log_likelihood']:.4f} with the evidence's prior)")
    print(f"n image {n_image:.6g}, text {n_text:.6g}; lambda image {lam_image:.6g}, text {lam_text:.6g}")
    return tuned
