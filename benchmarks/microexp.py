"""Speed of MX9 / MX6 fake_quantize against a jitted copy.

For a 4096 x 4096 float32 array under ``jit``, the median time of the fused
shared-microexponent fake_quantize (jaxmx/families/microexp/_kernels.py) divided by
the median time of a jitted float32 elementwise pass over the same array
(``x * 1.0001``, which reads and writes the array once: the floor for any
quantizer returning a float32 array), measured interleaved in one run. The
goal is 1.6x. A two-pass skeleton (block max of |x|, then one multiply)
shows what the memory traffic alone costs.

    python benchmarks/microexp.py
    python benchmarks/microexp.py --size 1024 --repeats 10 --formats mx9
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

from jaxmx.families.microexp import _kernels as microexp

GOAL = 1.6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=4096, help="the array is size x size float32")
    p.add_argument("--repeats", type=int, default=20, help="timed calls of each")
    p.add_argument("--formats", default="mx6,mx9", help="comma-separated: mx4, mx6, mx9")
    p.add_argument("--axes", default="-1,0", help="comma-separated block axes")
    args = p.parse_args()

    x = jax.random.normal(jax.random.key(0), (args.size, args.size), jnp.float32)
    copy = jax.jit(lambda v: v * 1.0001)
    n = args.size

    def skeleton(v):
        b = v.reshape(v.shape[0], n // 16, 16)
        return (b * jnp.max(jnp.abs(b), axis=-1, keepdims=True)).reshape(v.shape)

    rows = []
    t, base = common.compare(jax.jit(skeleton), copy, (x,), repeats=args.repeats)
    rows.append(
        [
            "two-pass skeleton (block max, one multiply)",
            "-1",
            f"{t * 1e3:.1f}",
            f"{base * 1e3:.1f}",
            f"{t / base:.2f}x",
            "",
        ]
    )
    for name in args.formats.split(","):
        for axis in (int(a) for a in args.axes.split(",")):
            fq = jax.jit(lambda v, n=name, a=axis: microexp.fake_quantize(v, n, axis=a))
            t, base = common.compare(fq, copy, (x,), repeats=args.repeats)
            ok = "yes" if t / base <= GOAL else "no"
            rows.append(
                [
                    f"{name} fake_quantize",
                    str(axis),
                    f"{t * 1e3:.1f}",
                    f"{base * 1e3:.1f}",
                    f"{t / base:.2f}x",
                    ok,
                ]
            )
    print(common.machine())
    print(common.load())
    print(f"{args.size}x{args.size} float32, median of {args.repeats} interleaved runs\n")
    print(common.table(["operation", "axis", "ms", "copy ms", "ratio", f"<= {GOAL}x"], rows))


if __name__ == "__main__":
    main()
