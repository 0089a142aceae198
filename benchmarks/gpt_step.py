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

import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.requires import TRAINING, require

if __name__ == "__main__":  # every missing package named at once, before any import
    require(*TRAINING)

import _gpt
import common
from train_step import compute_line, dot_layouts

import jaxmx
from examples import study, training


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--recipes", default="mxfp8", help="comma-separated recipes of examples/study.py"
    )
    p.add_argument("--repeats", type=int, default=20, help="timed steps of each")
    _gpt.add_size_args(p)
    args = p.parse_args()
    model, x, y, params, optimizer, opt_state = _gpt.setup(args)

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
    print(f"\n{_gpt.describe(args, params)}; {common.machine()}\n")
    print(common.table(["recipe", "fp32 ms", "recipe ms", "ratio"], rows))
    # Every recipe leaves DotConfig.compute_dtype at None.
    print("\n" + compute_line(jaxmx.preset("mxfp8")))
    print("Dots of each compiled step (count x operand dtype, runner, contracting axes):")
    for line in layouts:
        print(f"  {line}")


if __name__ == "__main__":
    main()
