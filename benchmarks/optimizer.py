"""Optimizer update step: compressed states and low-precision params against plain optax.

A ~10M-parameter tree (two 2048 x 2048 matrices, one 1024 x 1536, a bias).
Each variant's jitted ``update`` + ``optax.apply_updates`` runs as a
training loop runs it: params and state donated and carried from step to
step. Its steps alternate with those of ``optax.adamw`` (DropBack: with
``optax.sgd``) in the same run; the ratio of the medians is reported, with
the minima. The load average is printed before and after: these machines
are shared, and a loaded machine stretches programs of many kernels more
than one fused pass.

Also reported per variant: the bytes of state per parameter
(``jaxmx.optax.bytes_per_param``), the bytes of temporaries XLA allocates
for one step (``compiled.memory_analysis()``) and the minor page faults one
step costs. XLA:CPU allocates a step's temporaries afresh on every call, so
each page of them is faulted in again at every step; plain AdamW fuses into
one in-place pass and has none.

    python benchmarks/optimizer.py [--repeats 20] [--json docs/results/optax_bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.requires import require

if __name__ == "__main__":  # every missing package named at once, before any import
    require("optax")

import common
import optax

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


class Loop:
    """One optimizer's jitted step with params and state donated and carried."""

    def __init__(self, opt, params, grads):
        def step(params, state, grads):
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        self.params = jax.tree.map(jnp.copy, params)
        self.state = opt.init(self.params)
        self.grads = grads
        self.step = jax.jit(step, donate_argnums=(0, 1))
        compiled = self.step.lower(self.params, self.state, grads).compile()
        self.temp_bytes = compiled.memory_analysis().temp_size_in_bytes
        self.state_bytes_per_param = jo.bytes_per_param(self.state, params)
        self.times, self.faults = [], []

    def run(self, record: bool = True) -> None:
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        self.params, self.state = jax.block_until_ready(
            self.step(self.params, self.state, self.grads)
        )
        t = time.perf_counter() - t0
        if record:
            self.times.append(t)
            self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)


def compare(loop: Loop, base: Loop, repeats: int, warmup: int = 3) -> None:
    """Runs the two loops alternately; ``warmup`` steps of each are not recorded."""
    for i in range(warmup + repeats):
        loop.run(record=i >= warmup)
        base.run(record=i >= warmup)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=20, help="timed steps of each variant")
    p.add_argument("--only", help="comma-separated substrings of variant names to run")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    params = tree()
    n = sum(x.size for x in jax.tree.leaves(params))
    grads = jax.tree.map(lambda x: x * 1e-3 + 1e-4, params)
    baselines = {"adamw": optax.adamw(1e-3), "sgd": optax.sgd(1e-3)}
    load_before = os.getloadavg()
    print(f"{common.machine()}; {n:,} params; load average before: {load_before}")
    rows = []
    for name, (opt, base_name) in variants().items():
        if args.only and not any(s in name for s in args.only.split(",")):
            continue
        loop = Loop(opt, params, grads)
        base = Loop(baselines[base_name], params, grads)
        compare(loop, base, args.repeats)
        ms, base_ms = 1e3 * statistics.median(loop.times), 1e3 * statistics.median(base.times)
        rows.append(
            {
                "variant": name,
                "baseline": f"optax.{base_name}",
                "ms": ms,
                "baseline_ms": base_ms,
                "ratio": ms / base_ms,
                "min_ms": 1e3 * min(loop.times),
                "baseline_min_ms": 1e3 * min(base.times),
                "ratio_of_minima": min(loop.times) / min(base.times),
                "state_bytes_per_param": loop.state_bytes_per_param,
                "baseline_state_bytes_per_param": base.state_bytes_per_param,
                "temp_mib": loop.temp_bytes / 2**20,
                "baseline_temp_mib": base.temp_bytes / 2**20,
                "page_faults_per_step": statistics.median(loop.faults),
                "baseline_page_faults_per_step": statistics.median(base.faults),
            }
        )
        r = rows[-1]
        print(
            f"  {name}: {r['ms']:.1f} ms vs {r['baseline_ms']:.1f} ms ({r['ratio']:.2f}x; "
            f"minima {r['ratio_of_minima']:.2f}x), temporaries {r['temp_mib']:.0f} MiB, "
            f"{r['page_faults_per_step']:.0f} page faults/step",
            flush=True,
        )
        del loop, base
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
                "ratio of minima",
                "state B/param",
                "baseline B/param",
                "temp MiB",
                "page faults/step",
            ],
            [
                [
                    r["variant"],
                    r["baseline"],
                    f"{r['ms']:.1f}",
                    f"{r['baseline_ms']:.1f}",
                    f"{r['ratio']:.2f}x",
                    f"{r['ratio_of_minima']:.2f}x",
                    f"{r['state_bytes_per_param']:.3f}",
                    f"{r['baseline_state_bytes_per_param']:.3f}",
                    f"{r['temp_mib']:.0f}",
                    f"{r['page_faults_per_step']:.0f}",
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
            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
            "load_before": load_before,
            "load_after": load_after,
            "rows": rows,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
