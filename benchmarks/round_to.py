"""round_to's float32 nearest-even fast paths against its general path.

For bfloat16 and float16 (nearest-even, subnormals kept, no saturation) a
float32 ``round_to`` runs a few integer ops (``jaxmx.rounding._FAST``)
instead of the general encode / decode of any element format
(``jaxmx.rounding._round_general``). Both are jitted and timed interleaved
in the same run (``common.compare``) on the same array, alone and fused
after an elementwise op (``round_to(tanh(x) * y)``, as vector-op emulation
rounds each op's output); the ratio of medians is printed with the load
average before and after (the machines are shared: a ratio taken under load
is noisier, not biased, since both sides run alternately). Each case first
checks that the two give the same bits.

    python benchmarks/round_to.py [--size 4194304] [--repeats 50]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common
from common import load

from jaxmx.formats import BF16, FP16
from jaxmx.rounding import _fast_path, _round_general, _RoundSpec


def cases(spec, x, y):
    """``(label, (fast, general, args))`` for one spec, both jitted."""
    fast = _fast_path(spec, jnp.float32)
    yield "alone", (jax.jit(fast), jax.jit(lambda v: _round_general(v, None, spec)), (x,))
    yield (
        "after tanh(x) * y",
        (
            jax.jit(lambda v, w: fast(jnp.tanh(v) * w)),
            jax.jit(lambda v, w: _round_general(jnp.tanh(v) * w, None, spec)),
            (x, y),
        ),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=1 << 22, help="float32 elements")
    p.add_argument("--repeats", type=int, default=50, help="timed calls of each")
    args = p.parse_args()
    kx, ky = jax.random.split(jax.random.key(0))
    # Values across float32's range, subnormals and both formats' overflow included.
    x = jax.random.normal(kx, (args.size,)) * jnp.exp2(
        jax.random.randint(ky, (args.size,), -140, 128).astype(jnp.float32)
    )
    y = jax.random.normal(ky, (args.size,))

    print(f"before: {load()}", file=sys.stderr, flush=True)
    rows = []
    for elem in (BF16, FP16):
        for label, (f, g, a) in cases(_RoundSpec(elem, "nearest_even", True, False), x, y):
            np.testing.assert_array_equal(
                np.asarray(f(*a)).view(np.uint32), np.asarray(g(*a)).view(np.uint32)
            )
            t, t0 = common.compare(f, g, a, repeats=args.repeats)
            rows.append(
                [elem.name, label, f"{t0 * 1e3:.2f}", f"{t * 1e3:.2f}", f"{t0 / t:.2f}x", load()]
            )
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(
        f"\nround_to of {args.size:,} float32 elements, nearest-even, jitted, median of "
        f"{args.repeats}; {common.machine()}\n"
    )
    header = ["format", "rounding", "general ms", "fast ms", "speedup", "after row"]
    print(common.table(header, rows))


if __name__ == "__main__":
    main()
