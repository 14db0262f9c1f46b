"""``bayesretrieval demo``: the whole job end to end on the embedded small world.

Writes a training world and a gallery (clean plus shifted images) as ordinary image
folders, trains (once per machine, cached) the tiny open_clip model, fits its posterior
on the training pairs, builds an index over the gallery folder, and runs first queries.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from tqdm import tqdm

from bayesretrieval.options import IMAGES_DIR, ModelSize, Shift

logger = logging.getLogger(__name__)

DEMO_QUERIES = ("a red circle", "a large blue square on the left", "a green triangle")
PAIRS_FILE = "pairs.csv"


def register(subparsers) -> None:
    """Add the ``demo`` subcommand."""
    parser = subparsers.add_parser(
        "demo",
        help="run the whole job end to end on the embedded small world (no downloads)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder (default: %(default)s)")
    parser.add_argument("--size", choices=[s.value for s in ModelSize], default=ModelSize.TEST.value,
                        help="model size: test trains in about a minute, benchmark in about ten")
    parser.add_argument("--gallery", type=int, default=400, help="clean gallery images (default: %(default)s)")
    parser.add_argument("--shifted", type=int, default=100, help="shifted gallery images per family")
    parser.add_argument("--pairs", type=int, default=2048, help="training pairs for the posterior fit")
    parser.add_argument("-k", type=int, default=5, help="results per demo query")
    parser.add_argument("--seed", type=int, default=0, help="seed of worlds and model")
    parser.set_defaults(run=run)


def _write_pairs_world(root: Path, count: int, seed: int) -> Path:
    """Write a training world and a ``pairs.csv`` (image path, caption) beside it."""
    import pandas as pd

    from bayesretrieval.world import make_world, write_world
    from bayesretrieval.world.io import read_world_table

    if not (root / PAIRS_FILE).is_file():
        write_world(make_world(count, seed=seed + 1, part="train"), root, overwrite=True)
        table, _ = read_world_table(root)
        pairs = pd.DataFrame({"image_path": IMAGES_DIR + "/" + table["path"], "caption": table["caption"]})
        pairs.to_csv(root / PAIRS_FILE, index=False)
    return root / PAIRS_FILE


def _write_gallery(root: Path, clean: int, shifted: int, seed: int) -> Path:
    """Write a clean test world plus one shifted world per family under ``root``."""
    from bayesretrieval.world import make_world, write_world

    worlds = [("clean", make_world(clean, seed=seed + 2, part="test"))]
    worlds += [
        (shift.value, make_world(shifted, seed=seed + 3 + i, part="test", shift=shift, severity=3))
        for i, shift in enumerate(Shift)
    ]
    for name, world in tqdm(worlds, desc="write gallery", unit="world"):
        if not (root / name / "world.json").is_file():
            write_world(world, root / name, overwrite=True)
    return root


def run(args: argparse.Namespace) -> int:
    """Run the demo."""
    from bayesretrieval.encoders import ClipEncoder
    from bayesretrieval.indexing.pipeline import BuildConfig, build_index
    from bayesretrieval.posterior.fit import fit_posterior
    from bayesretrieval.training import get_trained_model, model_name

    start = time.perf_counter()
    out: Path = args.out
    print(f"[1/5] writing the small world to {out}/")
    pairs = _write_pairs_world(out / "train-world", args.pairs, args.seed)
    gallery = _write_gallery(out / "gallery", args.gallery, args.shifted, args.seed)
    print(f"[2/5] training (or loading the cached) {args.size} model")
    checkpoint = get_trained_model(args.size, args.seed, progress=_training_progress())
    encoder = ClipEncoder.from_pretrained(model_name(args.size), checkpoint)
    print(f"[3/5] fitting the Laplace posterior on {pairs}")
    posterior = fit_posterior(encoder, pairs, chunk_size=min(512, args.pairs), progress_bar=True)
    posterior_dir = posterior.save(out / "posterior")
    print(f"      lambda image {posterior.image.prior_precision:.4g}, text {posterior.text.prior_precision:.4g}"
          f" -> {posterior_dir}")
    print(f"[4/5] building the index over {gallery}")
    report = build_index(gallery, out / "index", encoder, posterior, BuildConfig(workers=0))
    print(f"      {report.indexed} items indexed ({report.encoded} encoded, {report.reused} reused), "
          f"skipped {report.skipped or 'none'}, {report.seconds:.1f} s")
    print("[5/5] searching")
    _search(out / "index", args.k)
    print(f"done in {time.perf_counter() - start:.0f} s; try: bayesretrieval search {out / 'index'} 'a red circle'"
          f"\n  or serve it over HTTP: bayesretrieval serve {out / 'index'}")
    return 0


def _training_progress():
    """A tqdm callback for :func:`get_trained_model` (created on the first step)."""
    bars: list[tqdm] = []

    def update(info) -> None:
        if not bars:
            bars.append(tqdm(total=info.steps, desc="train", unit="step"))
        bars[0].update(1)
        bars[0].set_postfix(loss=f"{info.loss:.3f}", img_s=f"{info.images_per_s:.0f}")
        if info.step == info.steps:
            bars[0].close()

    return update


def _search(index_dir: Path, k: int) -> None:
    from bayesretrieval.queries import Searcher

    searcher = Searcher.open(index_dir)
    results = searcher.search(list(DEMO_QUERIES), k=k, score="lcb")
    print(results.to_string(index=False))
