"""``bayesretrieval make-world``: write a procedural world as an image folder plus a table."""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from bayesretrieval.cli import CommandError
from bayesretrieval.options import IMAGES_DIR, MANIFEST_FILE, MAX_SEVERITY, ImageFormat, Part, Shift


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``make-world`` subcommand."""
    parser = subparsers.add_parser(
        "make-world",
        help="write a procedural captioned world (images + Parquet table)",
        description=(
            "Draw a seeded world of captioned images with ground-truth attributes and "
            f"write it under OUT: images in OUT/{IMAGES_DIR}/ (index that folder like "
            "any photo folder), captions and attributes in OUT/world.parquet, the "
            "manifest in OUT/world.json."
        ),
    )
    parser.add_argument("out", help="destination folder")
    parser.add_argument("-n", "--n-images", type=int, default=1000, help="images (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    parser.add_argument(
        "--part",
        choices=[p.value for p in Part],
        default=Part.TEST.value,
        help="training or in-distribution test world (default test)",
    )
    parser.add_argument(
        "--shift",
        choices=[s.value for s in Shift],
        default=None,
        help="shift family for a shifted test world (default: clean)",
    )
    parser.add_argument(
        "--severity",
        type=int,
        default=3,
        help=f"shift severity 1-{MAX_SEVERITY} (default 3; ignored without --shift)",
    )
    parser.add_argument(
        "--format",
        choices=[f.value for f in ImageFormat],
        default=ImageFormat.PNG.value,
        help="image file format (default png)",
    )
    parser.add_argument("--image-size", type=int, default=64, help="image side (default 64)")
    parser.add_argument("--overwrite", action="store_true", help="replace a world already there")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Generate and write the world."""
    from bayesretrieval.world.io import write_world
    from bayesretrieval.world.world import make_world

    if (Path(args.out) / MANIFEST_FILE).exists() and not args.overwrite:
        raise CommandError(f"{args.out} already holds a world; pass --overwrite to replace it")
    severity = args.severity if args.shift is not None else 0
    world = make_world(
        args.n_images,
        seed=args.seed,
        part=args.part,
        shift=args.shift,
        severity=severity,
        image_size=args.image_size,
    )
    with tqdm(total=len(world), desc="writing images", unit="img") as bar:
        write_world(
            world,
            args.out,
            image_format=args.format,
            overwrite=args.overwrite,
            progress=lambda done: bar.update(done - bar.n),
        )
    shifted = int(world.shifted.sum())
    print(f"wrote {len(world)} images ({shifted} shifted) to {args.out}")
    return 0
