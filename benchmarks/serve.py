"""Serving SmolLM2-135M from MX weights: greedy decode and prefill, side by side.

Weights: FP32 (the dequantized GGUF), bf16, and MX formats stored as
MXTensors by :func:`jaxmx.quantize_params` (packed where sub-byte) and run
weight-only under :func:`jaxmx.intercept`, which takes each MXTensor into
the matmul that contracts along its blocks and decodes it there. Every
variant runs the same jitted program shape; timings interleave the variants
round by round and report medians, so machine load hits all alike.

    python benchmarks/serve.py                 # decode batch 1, prefill 8 x 256
    python benchmarks/serve.py --quick         # smaller, for a smoke run

Printed: weight bytes, decode tokens/s and prefill tokens/s per variant, and
their ratios to the faster of FP32 and bf16 in the same run (the baseline),
to FP32 and to bf16. Decode at batch 1 reads every weight once
per token, so it is memory-bound on accelerators; on a CPU the decoding of
codes to floats is compute the bf16 path does not pay.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jaxmx
from benchmarks.common import machine, table
from examples import pretrained
from models.llama import generate

FORMATS = ("mxfp8", "mxfp4", "nvfp4")


def variants(params, formats):
    """name -> (params, apply wrapper) for every weight variant."""
    out = {"fp32": (params, None)}
    out["bf16"] = (
        jax.tree.map(lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a, params),
        None,
    )
    for fmt in formats:
        out[fmt] = (jaxmx.quantize_params(params, fmt), "intercept")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer rounds")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per decode")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens before decoding")
    parser.add_argument("--prefill-batch", type=int, default=8, help="sequences per prefill")
    parser.add_argument(
        "--prefill-length", type=int, default=256, help="tokens per prefill sequence"
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median)")
    parser.add_argument(
        "--formats", default=",".join(FORMATS), help="comma-separated weight formats"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.new_tokens, args.prefill_batch, args.prefill_length, args.rounds = 8, 2, 64, 2

    pre = pretrained.load_smollm2()  # fetches the GGUF once if missing
    model, cfg = pre.model, pre.config
    table_rows = variants(pre.params, [f for f in args.formats.split(",") if f])
    apply_plain = model.apply
    apply_mx = jaxmx.intercept(model.apply, None, warn=False)  # weight-only

    prompt = jax.random.randint(jax.random.key(0), (1, args.prompt), 0, cfg.vocab_size)
    batch = jax.random.randint(
        jax.random.key(1), (args.prefill_batch, args.prefill_length), 0, cfg.vocab_size
    )
    decode, prefill = {}, {}
    for name, (params, how) in table_rows.items():
        fn = apply_mx if how else apply_plain
        decode[name] = lambda p=params, f=fn: generate(
            f, p, prompt, config=cfg, max_new_tokens=args.new_tokens
        )
        prefill[name] = (jax.jit(lambda p, t, f=fn: f(p, t)), params)

    times = {("decode", n): [] for n in table_rows} | {("prefill", n): [] for n in table_rows}
    print(f"compiling {len(table_rows)} variants x 2 programs ...", flush=True)
    for name in table_rows:  # warm-up: compile everything first
        jax.block_until_ready(decode[name]())
        f, p = prefill[name]
        jax.block_until_ready(f(p, batch))
    loads = []
    for r in range(args.rounds):
        loads.append(os.getloadavg()[0])
        for name in table_rows:
            t0 = time.perf_counter()
            jax.block_until_ready(decode[name]())
            times["decode", name].append(time.perf_counter() - t0)
            f, p = prefill[name]
            t0 = time.perf_counter()
            jax.block_until_ready(f(p, batch))
            times["prefill", name].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    dec = {n: args.new_tokens / statistics.median(times["decode", n]) for n in table_rows}
    pf_tokens = args.prefill_batch * args.prefill_length
    pf = {n: pf_tokens / statistics.median(times["prefill", n]) for n in table_rows}
    # The baseline is the faster of the FP32 and bf16 weights in this run: on
    # a CPU without bfloat16 dot instructions bf16 weights are the slower.
    best_dec = max(dec["fp32"], dec["bf16"])
    best_pf = max(pf["fp32"], pf["bf16"])
    rows = []
    for name, (params, _) in table_rows.items():
        nbytes = jaxmx.param_bytes(params)
        rows.append(
            [
                name,
                f"{nbytes / 2**20:.1f} MiB",
                f"{dec[name]:.1f}",
                f"{dec[name] / best_dec:.2f}x",
                f"{dec[name] / dec['fp32']:.2f}x",
                f"{dec[name] / dec['bf16']:.2f}x",
                f"{pf[name]:.0f}",
                f"{pf[name] / best_pf:.2f}x",
                f"{pf[name] / pf['fp32']:.2f}x",
                f"{pf[name] / pf['bf16']:.2f}x",
            ]
        )
    header = [
        "weights",
        "weight bytes",
        "decode tok/s",
        "vs faster",
        "vs fp32",
        "vs bf16",
        "prefill tok/s",
        "vs faster",
        "vs fp32",
        "vs bf16",
    ]
    print()
    print(f"SmolLM2-135M, {machine()}")
    print(
        f"decode: batch 1, prompt {args.prompt}, {args.new_tokens} new tokens (KV cache); "
        f"prefill: {args.prefill_batch} x {args.prefill_length}; median of {args.rounds} "
        f"interleaved rounds; load average during the rounds {min(loads):.1f}-{max(loads):.1f} "
        f"on {os.cpu_count()} cores"
    )
    print(table(header, rows))


if __name__ == "__main__":
    main()
