"""Speed of quantize / dequantize / fake_quantize against an elementwise pass.

For a 4096 x 4096 float32 array under ``jit``, each format and axis, the
median time of each operation is divided by the median time of a jitted
float32 elementwise pass over the same array (``x * 1.0001``), measured
interleaved in the same run. The elementwise pass reads and writes the
array once, so it is the floor for any fused quantizer that returns a
float32 array.

    python benchmarks/quantize.py            # the README table
    python benchmarks/quantize.py --size 1024 --repeats 10
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

GOALS = {"mxfp8": 1.5, "mxfp6": 2.0, "mxfp4": 2.0}


def reference_passes(x, copy, repeats: int) -> list[list[str]]:
    """Floors that explain the table, measured against the same copy.

    * two-pass skeleton: a blockwise max of |x| and one multiply by it: the
      memory traffic of fake_quantize with almost no arithmetic;
    * float4 copy: an elementwise pass over a float4_e2m1fn array, which shows
      what XLA:CPU charges for any 4-bit array.
    """
    n = x.shape[-1]

    def skeleton(v):
        b = v.reshape(v.shape[0], n // 32, 32)
        return (b * jnp.max(jnp.abs(b), axis=-1, keepdims=True)).reshape(v.shape)

    f4 = jnp.clip(x, -6, 6).astype(jnp.float4_e2m1fn)
    f4_copy = jax.jit(lambda v: jnp.where(v == v, v, v))
    rows = []
    for label, fn, arg in (
        ("two-pass skeleton (block max, one multiply)", jax.jit(skeleton), x),
        ("elementwise pass over a float4_e2m1fn array", f4_copy, f4),
    ):
        t, base = common.compare(fn, copy, (arg,), (x,), repeats=repeats)
        rows.append([label, f"{t * 1e3:.1f}", f"{t / base:.2f}x"])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=4096, help="the array is size x size float32")
    p.add_argument("--repeats", type=int, default=20, help="timed calls of each")
    p.add_argument(
        "--formats",
        default=",".join(jaxmx.list_formats()),
        help="comma-separated jaxmx format names (default: every registered format)",
    )
    args = p.parse_args()

    x = jax.random.normal(jax.random.key(0), (args.size, args.size), jnp.float32)
    copy = jax.jit(lambda v: v * 1.0001)
    rows = []
    for name in args.formats.split(","):
        for axis in (-1, 0):
            fq = jax.jit(lambda v, n=name, a=axis: jaxmx.fake_quantize(v, n, axis=a))
            q = jax.jit(lambda v, n=name, a=axis: jaxmx.quantize(v, n, axis=a))
            qp = jax.jit(lambda v, n=name, a=axis: jaxmx.quantize(v, n, axis=a, packed=True))
            t = q(x)
            dq = jax.jit(jaxmx.dequantize)
            times = [
                common.compare(fn, copy, (arg,), (x,), repeats=args.repeats)
                for fn, arg in ((fq, x), (q, x), (qp, x), (dq, t))
            ]
            ratios = [t_fn / t_base for t_fn, t_base in times]
            ms = times[0][0]
            goal = next((g for k, g in GOALS.items() if name.startswith(k)), None)
            verdict = "" if goal is None else ("yes" if ratios[0] <= goal else "NO")
            rows.append(
                [
                    name,
                    str(axis),
                    f"{ms * 1e3:.1f}",
                    *(f"{r:.2f}x" for r in ratios),
                    f"{goal}x {verdict}" if goal else "-",
                ]
            )
            print(" ".join(rows[-1]), file=sys.stderr, flush=True)
    print(f"\n{args.size}x{args.size} float32, median of {args.repeats} runs; {common.machine()}")
    print("ratios are to a jitted x * 1.0001 over the same array, measured interleaved\n")
    print(
        common.table(
            [
                "format",
                "axis",
                "fake_quantize ms",
                "fake_quantize",
                "quantize",
                "quantize packed",
                "dequantize",
                "goal (fake_quantize)",
            ],
            rows,
        )
    )
    print("\nreference passes, same array and copy:\n")
    print(common.table(["pass", "ms", "ratio"], reference_passes(x, copy, args.repeats)))


if __name__ == "__main__":
    main()
