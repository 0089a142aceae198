"""Optimizer update step: compressed states and low-precision params against plain optax.

A ~10M-parameter tree (two 2048 x 2048 matrices, one 1024 x 1536, biases);
each variant's jitted ``update`` + ``optax.apply_updates`` is timed
interleaved with ``optax.adamw`` (DropBack with ``optax.sgd``) in the same
run, median of ``--repeats``. Bytes per parameter are those the state
really holds (``jaxmx.optax.bytes_per_param``). The load average is printed
before and after: these machines are shared.

    python benchmarks/optimizer.py [--repeats 20] [--json docs/results/optax_bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common

import jaxmx.optax as jo

KEY = jax.random.key(0)


def tree() -> dict:
    shapes = {"w1": (2048, 2048), "w2": (2048, 2048), "w3": (1024, 1536), "b1": (2048,)}
    return jo.initial_params(
        KEY, {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
    )


def variants() -> dict:
    adamw = optax.adamw(1e-3)
    key = jax.random.key(1)
    return {
        "8-bit state (bitsandbytes)": (jo.compress_state(adamw, "8bit"), "adamw"),
        "4-bit state (Li et al.)": (jo.compress_state(adamw, "4bit"), "adamw"),
        "MXFP8 first moment": (jo.compress_state(adamw, "mxfp8"), "adamw"),
        "MXINT8 first moment": (jo.compress_state(adamw, "mxint8"), "adamw"),
        "bf16 moments": (jo.compress_state(adamw, "bf16"), "adamw"),
        "bf16 params, nearest": (jo.low_precision_params(adamw), "adamw"),
        "bf16 params, stochastic": (
            jo.low_precision_params(adamw, rounding="stochastic", key=key),
            "adamw",
        ),
        "bf16 params, Kahan (bf16)": (
            jo.low_precision_params(adamw, compensation="bfloat16"),
            "adamw",
        ),
        "8-bit state + bf16 params, stochastic": (
            jo.low_precision_params(
                jo.compress_state(adamw, "8bit"), rounding="stochastic", key=key
            ),
            "adamw",
        ),
        "DropBack 10% (sgd)": (
            optax.chain(optax.sgd(1e-3), jo.dropback(0.1, init_key=KEY)),
            "sgd",
        ),
        "Procrustes 10%, quantile (sgd)": (
            optax.chain(
                optax.sgd(1e-3),
                jo.dropback(0.1, init_key=KEY, threshold="quantile", init_decay=0.999),
            ),
            "sgd",
        ),
    }


def step_fn(opt):
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--only", help="comma-separated substrings of variant names to run")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    params = tree()
    n = sum(x.size for x in jax.tree.leaves(params))
    grads = jax.tree.map(lambda x: x * 1e-3 + 1e-4, params)
    baselines = {"adamw": optax.adamw(1e-3), "sgd": optax.sgd(1e-3)}
    base_steps = {k: (step_fn(o), o.init(params)) for k, o in baselines.items()}
    load_before = os.getloadavg()
    print(f"{common.machine()}; {n:,} params; load average before: {load_before}")
    rows = []
    for name, (opt, base) in variants().items():
        if args.only and not any(s in name for s in args.only.split(",")):
            continue
        state = opt.init(params)
        step = step_fn(opt)
        base_step, base_state = base_steps[base]
        t, tb = common.compare(
            step,
            base_step,
            (params, state, grads),
            (params, base_state, grads),
            repeats=args.repeats,
        )
        rows.append(
            {
                "variant": name,
                "baseline": f"optax.{base}",
                "ms": 1e3 * t,
                "baseline_ms": 1e3 * tb,
                "ratio": t / tb,
                "state_bytes_per_param": jo.bytes_per_param(state, params),
                "baseline_state_bytes_per_param": jo.bytes_per_param(base_state, params),
            }
        )
        r = rows[-1]
        print(
            f"  {name}: {r['ms']:.1f} ms vs {r['baseline_ms']:.1f} ms ({r['ratio']:.2f}x)",
            flush=True,
        )
    load_after = os.getloadavg()
    print(f"load average after: {load_after}")
    print(
        common.table(
            [
                "variant",
                "baseline",
                "ms",
                "baseline ms",
                "ratio",
                "state B/param",
                "baseline B/param",
            ],
            [
                [
                    r["variant"],
                    r["baseline"],
                    f"{r['ms']:.1f}",
                    f"{r['baseline_ms']:.1f}",
                    f"{r['ratio']:.2f}x",
                    f"{r['state_bytes_per_param']:.3f}",
                    f"{r['baseline_state_bytes_per_param']:.3f}",
                ]
                for r in rows
            ],
        )
    )
    if args.json:
        out = {
            "machine": common.machine(),
            "cpus": os.cpu_count(),
            "params": n,
            "repeats": args.repeats,
            "load_before": load_before,
            "load_after": load_after,
            "rows": rows,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
