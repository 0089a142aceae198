"""Weight-only serving of one matmul: packed MX weights against float32 and bf16.

The product ``x @ W`` with ``W`` of shape (2048, 8192), at a decode shape
(``x`` of 1 x 2048: every weight is read once per token, so float32 is
memory-bound) and a prefill shape (``x`` of 64 x 2048). Weights are stored
the way serving stores them (docs/serving.md): ``jaxmx.quantize_params``
(packed where sub-byte, blocks along the contracted axis) and run under
``jaxmx.intercept(fn, None)``, which decodes each MXTensor into the matmul's
compute dtype. The baselines are the same jitted ``x @ W`` with float32 and
with bfloat16 weights. All variants of a shape run interleaved, round by
round, and each ratio is to the faster of the two baselines in that run.

    python benchmarks/decode.py                 # the table in docs/studies/speed.md
    python benchmarks/decode.py --rounds 10 --formats mxfp4
    python benchmarks/decode.py --hlo mxfp4     # print the optimized program and exit
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

import jaxmx

FORMATS = ("mxfp4", "nvfp4", "mxfp8")
SHAPES = {"decode": 1, "prefill": 64}


def matmul(params, x):
    return x @ params["kernel"]  # a Flax-style (in, out) kernel: blocks along in


def variants(w, formats) -> dict:
    """name -> (jitted fn(params, x), params)."""
    plain = jax.jit(matmul)
    mx = jax.jit(jaxmx.intercept(matmul, None, warn=False))
    out = {
        "float32": (plain, {"kernel": w}),
        "bfloat16": (plain, {"kernel": w.astype(jnp.bfloat16)}),
    }
    for fmt in formats:
        out[fmt] = (mx, jaxmx.quantize_params({"kernel": w}, fmt))
    return out


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def time_round_robin(table: dict, x, rounds: int) -> tuple[dict, dict]:
    """Median wall and process CPU seconds per variant, interleaved call by call.

    The CPU time (user + system, all threads) is what the call cost this
    process; on a loaded machine the wall time also holds the time other
    processes held the cores.
    """
    for fn, p in table.values():  # compile and warm up
        for _ in range(2):
            jax.block_until_ready(fn(p, x))
    wall = {name: [] for name in table}
    cpu = {name: [] for name in table}
    for _ in range(rounds):
        for name, (fn, p) in table.items():
            t0, c0 = time.perf_counter(), _cpu_seconds()
            jax.block_until_ready(fn(p, x))
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(_cpu_seconds() - c0)
    med = statistics.median
    return {n: med(t) for n, t in wall.items()}, {n: med(t) for n, t in cpu.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--k", type=int, default=2048, help="contraction length of the weight")
    p.add_argument("--n", type=int, default=8192, help="output features of the weight")
    p.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds (median)")
    p.add_argument("--formats", default=",".join(FORMATS), help="comma-separated weight formats")
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated activation shapes")
    p.add_argument("--hlo", metavar="FORMAT", help="print the optimized decode-shape program")
    args = p.parse_args()

    w = jax.random.normal(jax.random.key(0), (args.k, args.n), jnp.float32) * 0.02
    formats = [f for f in args.formats.split(",") if f]
    table = variants(w, formats)
    if args.hlo:
        fn, params = table[args.hlo]
        x = jnp.ones((1, args.k), jnp.float32)
        print(fn.lower(params, x).compile().as_text())
        return
    rows = []
    loads = [common.load()]
    for shape in [s for s in args.shapes.split(",") if s]:
        x = jax.random.normal(jax.random.key(1), (SHAPES[shape], args.k), jnp.float32)
        wall, cpu = time_round_robin(table, x, args.rounds)
        loads.append(common.load())
        base = {}
        for med in (wall, cpu):
            name = min(("float32", "bfloat16"), key=med.get)
            base[id(med)] = (name, med[name])
        for name, (_, params) in table.items():
            rows.append(
                [
                    f"{SHAPES[shape]} x {args.k} @ {args.k} x {args.n}",
                    name,
                    f"{jaxmx.param_bytes(params) / 2**20:.1f}",
                    *(
                        f"{med[name] * 1e3:.2f} ({med[name] / base[id(med)][1]:.2f}x)"
                        for med in (wall, cpu)
                    ),
                ]
            )
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
        names = [base[id(med)][0] for med in (wall, cpu)]
        rows.append(["", "baseline (faster)", "", *names])
    print(f"\n{common.machine()}")
    print(f"median of {args.rounds} interleaved rounds; " + "; then ".join(loads))
    print("ratios are to the faster of float32 and bfloat16 weights, in the same run")
    header = ["product", "weights", "weight MiB", "wall ms (ratio)", "CPU ms (ratio)"]
    print(common.table(header, rows))


if __name__ == "__main__":
    main()
