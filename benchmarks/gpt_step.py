"""One training step of the reference GPT: FP32 against MX recipes, side by side.

The model and batch are ``examples/train_lm.py``'s defaults (4 blocks, width
64, context 64, batch 32) unless overridden. Each recipe substitutes every
matmul of the unmodified model (``jaxmx.flax.quantize_model``); the step is
the training loop's own jitted step (forward, backward, AdamW update), timed
interleaved with the FP32 step in the same run. Below the table: which
dtype the MX matmuls multiply in and how XLA runs each step's dots
(``train_step.dot_layouts``).

    python benchmarks/gpt_step.py [--recipes mxfp8,mxfp6] [--width 256]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common
from train_step import compute_line, dot_layouts

import jaxmx
from examples import study, training
from examples.train_lm import DEFAULTS
from models import GPT, GPTConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--recipes", default="mxfp8")
    p.add_argument("--repeats", type=int, default=20)
    for k in ("batch_size", "context", "depth", "width", "heads"):
        p.add_argument(f"--{k.replace('_', '-')}", type=int, default=DEFAULTS[k])
    args = p.parse_args()
    cfg = GPTConfig(
        vocab_size=65, context=args.context, depth=args.depth, width=args.width, heads=args.heads
    )
    model = GPT(cfg)
    x = jax.random.randint(jax.random.key(0), (args.batch_size, args.context), 0, 65)
    y = jnp.roll(x, -1, axis=1)
    params = training.init_linen_params(model, x, 0)
    tcfg = training.TrainConfig(steps=1600)
    optimizer = training.make_optimizer(tcfg)
    opt_state = optimizer.init(params)

    def step_for(recipe):
        fn = training.make_train_step(study.get_recipe(recipe)(model), optimizer, 0)
        layouts.append(f"{recipe}: {dot_layouts(fn, params, opt_state, x, y, jnp.int32(0))}")
        return lambda p, s: fn(p, s, x, y, jnp.int32(0))

    layouts = []
    base = step_for("fp32")
    rows = []
    for recipe in study.parse_recipes(args.recipes):
        t, t0 = common.compare(step_for(recipe), base, (params, opt_state), repeats=args.repeats)
        rows.append([recipe, f"{t0 * 1e3:.1f}", f"{t * 1e3:.1f}", f"{t / t0:.2f}x"])
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    n = sum(v.size for v in jax.tree.leaves(params))
    print(
        f"\nGPT {args.depth}x{args.width}, context {args.context}, batch {args.batch_size} "
        f"({n:,} params); train step (fwd+bwd+AdamW), median of {args.repeats}; "
        f"{common.machine()}\n"
    )
    print(common.table(["recipe", "fp32 ms", "recipe ms", "ratio"], rows))
    # Every recipe leaves DotConfig.compute_dtype at None.
    print("\n" + compute_line(jaxmx.preset("mxfp8")))
    print("Dots of each compiled step (count x operand dtype, runner, contracting axes):")
    for line in layouts:
        print(f"  {line}")


if __name__ == "__main__":
    main()
