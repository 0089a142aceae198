"""Cost of vector-op emulation: a char-GPT training step with and without it.

The model and batch are ``examples/train_lm.py``'s defaults (4 blocks, width
64, context 64, batch 32) unless overridden. The step is the training
loop's own jitted step (forward, backward, AdamW update) of the unmodified
linen model, with its apply function under ``jaxmx.intercept``:

* matmuls ``fp32`` (no rule) or ``mxfp8`` (every matmul in the preset);
* without, and with ``vector_ops=VectorOps(format, rounding)``: every
  elementwise op and reduction of the forward pass rounded (bfloat16,
  nearest-even by default).

Each pair is timed interleaved in the same run (``common.compare``) and the
ratio of medians printed, with the machine's load average before and after
(these machines are shared: a ratio taken under load is noisier, not
biased, since both sides run alternately).

    python benchmarks/vector_ops.py [--format bfloat16] [--rounding nearest_even]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.requires import TRAINING, require

if __name__ == "__main__":  # every missing package named at once, before any import
    require(*TRAINING)

import _gpt
import common
from common import load

import jaxmx
from examples import training


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--format", default="bfloat16", help="element format of the emulated vector ops")
    p.add_argument("--rounding", default="nearest_even", help="nearest_even or stochastic")
    p.add_argument("--matmuls", default="fp32,mxfp8", help="comma-separated: fp32, mxfp8, ...")
    p.add_argument("--repeats", type=int, default=20, help="timed steps of each")
    _gpt.add_size_args(p)
    args = p.parse_args()
    model, x, y, params, optimizer, opt_state = _gpt.setup(args)
    apply_fn = training.linen_apply_fn(model)
    key = jax.random.key(1) if args.rounding == "stochastic" else None
    vector_ops = jaxmx.VectorOps(args.format, args.rounding, key=key)

    def step_for(matmuls, vops):
        rules = [] if matmuls == "fp32" else matmuls
        fn = jaxmx.intercept(apply_fn, rules, vector_ops=vops, warn=False)
        step = training.make_train_step(fn, optimizer, 0)
        return fn, lambda p, s: step(p, s, x, y, jnp.int32(0))

    print(f"before: {load()}", file=sys.stderr, flush=True)
    rows, reports = [], []
    for matmuls in [m.strip() for m in args.matmuls.split(",") if m.strip()]:
        _, base = step_for(matmuls, None)
        fn, emulated = step_for(matmuls, vector_ops)
        t, t0 = common.compare(emulated, base, (params, opt_state), repeats=args.repeats)
        rows.append([matmuls, f"{t0 * 1e3:.1f}", f"{t * 1e3:.1f}", f"{t / t0:.2f}x", load()])
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
        reports.append(f"{matmuls}: {fn.coverage.vector_ops.summary()}")
    print(
        f"\n{_gpt.describe(args, params)}; vector ops {args.format} {args.rounding}; "
        f"{common.machine()}\n"
    )
    print(common.table(["matmuls", "without ms", "with vector ops ms", "ratio", "after row"], rows))
    print("\nWhat the emulated steps round (forward pass; equations, a loop body once):")
    for r in reports:
        print("  " + r.replace("\n", "\n  "))


if __name__ == "__main__":
    main()
