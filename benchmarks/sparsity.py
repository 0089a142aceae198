"""Cost of N:M masking next to quantization, against a float32 copy.

For a 4096 x 4096 float32 array under ``jit``, each N:M pattern and format:
the median time of ``fake_quantize(sparsify(x))`` and of ``fake_quantize(x)``
alone, each divided by the median time of a jitted elementwise pass over the
same array (``x * 1.0001``, the floor for anything that returns a float32
array), all measured interleaved in the same run. "masking adds" is the
difference of the two ratios: what choosing and applying the mask costs, in
copies of the array. The goal is at most 0.3 of a copy.

    python benchmarks/sparsity.py
    python benchmarks/sparsity.py --size 1024 --repeats 10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

import jaxmx

GOAL = 0.3  # masking adds at most 0.3 of a copy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=4096, help="rows and columns of the float32 array")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per case (median)")
    p.add_argument("--formats", default="mxfp8,mxfp4,nvfp4", help="comma-separated format names")
    p.add_argument("--patterns", default="2:4,4:8,8:16", help="comma-separated N:M patterns")
    args = p.parse_args()

    n = args.size
    x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    copy = jax.jit(lambda v: v * 1.0001)
    print(common.machine())
    print(common.load(), "(before)")
    rows = []
    for pattern in args.patterns.split(","):
        kept, group = (int(v) for v in pattern.split(":"))
        sp = jaxmx.NMSparsity(kept, group)
        mask_only = jax.jit(lambda v, sp=sp: jaxmx.sparsify(v, sp, axis=1))
        t_mask, t_copy = common.compare(mask_only, copy, (x,), repeats=args.repeats)
        rows.append([pattern, "none", f"{t_mask / t_copy:.2f}x", "-", f"{t_mask / t_copy:.2f}x"])
        for fmt in args.formats.split(","):
            quant = jax.jit(lambda v, f=fmt: jaxmx.fake_quantize(v, f, axis=1))
            both = jax.jit(
                lambda v, f=fmt, sp=sp: jaxmx.fake_quantize(
                    jaxmx.sparsify(v, sp, axis=1), f, axis=1
                )
            )
            t_both, t_copy = common.compare(both, copy, (x,), repeats=args.repeats)
            t_quant, t_copy2 = common.compare(quant, copy, (x,), repeats=args.repeats)
            r_both, r_quant = t_both / t_copy, t_quant / t_copy2
            rows.append(
                [pattern, fmt, f"{r_both:.2f}x", f"{r_quant:.2f}x", f"{r_both - r_quant:+.2f}x"]
            )
    header = [
        "N:M (magnitude)",
        "format",
        "sparsify + quantize / copy",
        "quantize / copy",
        "masking adds (copies)",
    ]
    print(
        f"{n}x{n} float32, median of {args.repeats} interleaved runs; goal: masking adds at most "
        f"{GOAL} of a copy"
    )
    print(common.table(header, rows))
    print(common.load(), "(after)")


if __name__ == "__main__":
    main()
