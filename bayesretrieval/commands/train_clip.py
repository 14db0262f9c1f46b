"""``bayesretrieval train-clip``: train (or fetch from the cache) a small CLIP on the world."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from tqdm import tqdm

from bayesretrieval.options import TRAIN_RUNS, ModelSize

if TYPE_CHECKING:
    from bayesretrieval.training import StepInfo


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train-clip`` subcommand."""
    sizes = ", ".join(
        f"{s.value} = {run.model_name}, {run.steps} steps of {run.batch_size}" for s, run in TRAIN_RUNS.items()
    )
    parser = subparsers.add_parser(
        "train-clip",
        help="train a small open_clip model on the procedural world (cached)",
        description=(
            "Train an open_clip model from scratch on the training world with the "
            f"contrastive loss, on the CPU ({sizes}). The checkpoint is cached per "
            "config and seed and loads with open_clip.create_model_and_transforms("
            "name, pretrained=PATH) after bayesretrieval.encoders.register_model_configs(). "
            "Prints the model name and checkpoint path."
        ),
    )
    parser.add_argument(
        "--size",
        choices=[s.value for s in ModelSize],
        default=ModelSize.TEST.value,
        help="test (about 40 s) or benchmark (about 10 min) (default test)",
    )
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument(
        "--retrain", action="store_true", help="train again even if the checkpoint is cached"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Train or fetch the checkpoint and print where it is."""
    from bayesretrieval.training import TRAIN_CONFIGS, checkpoint_path, get_trained_model, model_name

    cached = checkpoint_path(args.size, args.seed).is_file() and not args.retrain
    steps = TRAIN_CONFIGS[ModelSize(args.size)].steps
    with tqdm(total=steps, desc=f"training {args.size}", unit="step", disable=cached) as bar:

        def progress(info: StepInfo) -> None:
            bar.update(info.step - bar.n)
            bar.set_postfix(
                loss=f"{info.loss:.3f}",
                scale=f"{info.logit_scale:.1f}",
                img_s=f"{info.images_per_s:.0f}",
            )

        path = get_trained_model(args.size, args.seed, progress=progress, retrain=args.retrain)
    print(f"model: {model_name(args.size)}")
    print(f"checkpoint: {path}")
    return 0
