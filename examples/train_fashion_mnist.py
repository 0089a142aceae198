"""Train the small CNN on Fashion-MNIST under one or more numeric recipes.

Every recipe starts from the same initial parameters and sees the same
shuffled batches (same ``--seed``). Each recipe writes ``metrics.json`` and
orbax checkpoints to ``<out>/<recipe>/``; rerunning the same command resumes.
At the end a table (recipe, test accuracy, gap to fp32, median step time) is
printed and the curves are plotted to ``<out>/loss.png``. The data comes from
Debian's ``dataset-fashion-mnist`` package (``apt-get install -y
dataset-fashion-mnist``).

Usage::

    python examples/train_fashion_mnist.py            # FP32, default configuration
    python examples/train_fashion_mnist.py --quick    # smoke test, seconds
"""

from __future__ import annotations

import argparse
import pathlib
import sys

if __package__ in (None, ""):  # run as a script: make `models`/`examples` importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from examples.requires import TRAINING, require

if __name__ == "__main__":  # every missing package named at once, before any import
    require(*TRAINING, later=["fashion-mnist"])

from flax import nnx

from examples import data, study, training
from models import CNN, CNNnnx

# On a 2-core CPU: about 100 ms/step, 2 minutes in all, test accuracy ~0.90.
DEFAULTS = {
    "steps": 1000,
    "batch_size": 128,
    "lr": 2e-3,
    "warmup_steps": 50,
    "eval_every": 250,
    "log_every": 10,
    "checkpoint_every": 250,
    "eval_examples": 10000,
}
# Seconds on a 2-core CPU: a few steps, evaluated on 1000 test images.
QUICK = {
    "steps": 30,
    "batch_size": 32,
    "warmup_steps": 3,
    "eval_every": 15,
    "log_every": 5,
    "checkpoint_every": 15,
    "eval_examples": 1000,
}
EVAL_BATCH = 1000  # test images per evaluation batch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses and resolves the command line (``--quick`` changes the defaults)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=f"defaults: {DEFAULTS}; with --quick: {QUICK}",
    )
    study.add_common_args(parser)
    parser.add_argument(
        "--eval-examples", type=int, help="test images per evaluation (first N of 10000)"
    )
    parser.add_argument("--api", choices=("linen", "nnx"), default="linen", help="Flax API")
    args = study.resolve_defaults(parser.parse_args(argv), DEFAULTS, QUICK)
    if args.out is None:
        args.out = f"runs/fashion_mnist{'_quick' if args.quick else ''}"
    if not 1 <= args.eval_examples <= 10000:
        parser.error(f"--eval-examples must be in [1, 10000], got {args.eval_examples}")
    return args


def build(args: argparse.Namespace, dataset: dict):
    """Builds the model, the shared initial params and the data functions.

    Args:
      args: resolved command-line arguments.
      dataset: the output of :func:`examples.data.load_fashion_mnist`.

    Returns:
      ``(model, params, train_batch, eval_batches, run_info)`` for
      :func:`examples.study.run_recipes`.
    """
    train_images = dataset["train"][0]
    train_batch, eval_batches = data.classification_batches(
        dataset,
        batch_size=args.batch_size,
        seed=args.seed,
        eval_examples=args.eval_examples,
        eval_batch=EVAL_BATCH,
    )

    if args.api == "linen":
        model = CNN()
        params = training.init_linen_params(model, train_images[:1], args.seed)
    else:
        model = CNNnnx(rngs=nnx.Rngs(args.seed))
        params = training.nnx_params(model)
    run_info = {
        "model": {"name": "CNN", "api": args.api},
        "data": {"corpus": "fashion-mnist", "batch_size": args.batch_size},
        "data_seed": args.seed,
        "eval_examples": args.eval_examples,
    }
    return model, params, train_batch, eval_batches, run_info


def main(argv: list[str] | None = None) -> list[dict]:
    """Runs the study and prints the summary table; returns each recipe's metrics."""
    args = parse_args(argv)
    study.parse_recipes(args.recipes)  # fail on a bad name before loading data
    require("fashion-mnist")
    built = build(args, data.load_fashion_mnist())
    return study.run_cli(args, built, "accuracy", f"CNN ({args.api})")


if __name__ == "__main__":
    main()
