"""The char-GPT training step that benchmarks/gpt_step.py and vector_ops.py time.

The model and batch are ``examples/train_lm.py``'s defaults (4 blocks, width
64, context 64, batch 32) unless overridden on the command line; the
optimizer is the training loop's AdamW schedule for 1,600 steps.
"""

from __future__ import annotations

import argparse
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from examples import training
from examples.train_lm import DEFAULTS
from models import GPT, GPTConfig

_SIZES = {
    "batch_size": "sequences per batch",
    "context": "tokens per sequence",
    "depth": "transformer blocks",
    "width": "embedding width",
    "heads": "attention heads",
}


def add_size_args(p: argparse.ArgumentParser) -> None:
    """``--batch-size``, ``--context``, ``--depth``, ``--width``, ``--heads``."""
    for k, what in _SIZES.items():
        p.add_argument(
            f"--{k.replace('_', '-')}",
            type=int,
            default=DEFAULTS[k],
            help=f"{what} (default {DEFAULTS[k]}, as examples/train_lm.py)",
        )


class Setup(NamedTuple):
    model: Any
    x: jax.Array  # tokens (batch, context)
    y: jax.Array  # the next tokens
    params: Any
    optimizer: Any
    opt_state: Any


def setup(args) -> Setup:
    """The model of ``args``' sizes, a batch, its parameters and optimizer state."""
    cfg = GPTConfig(
        vocab_size=65, context=args.context, depth=args.depth, width=args.width, heads=args.heads
    )
    model = GPT(cfg)
    x = jax.random.randint(jax.random.key(0), (args.batch_size, args.context), 0, 65)
    y = jnp.roll(x, -1, axis=1)
    params = training.init_linen_params(model, x, 0)
    optimizer = training.make_optimizer(training.TrainConfig(steps=1600))
    opt_state = optimizer.init(params)
    return Setup(model, x, y, params, optimizer, opt_state)


def describe(args, params) -> str:
    """The header line's start: model sizes, parameter count, what is timed."""
    n = sum(v.size for v in jax.tree.leaves(params))
    return (
        f"GPT {args.depth}x{args.width}, context {args.context}, batch {args.batch_size} "
        f"({n:,} params); train step (fwd+bwd+AdamW), median of {args.repeats}"
    )
