"""What FSDP moves per training step: all-gather bytes of bf16 weights against MX weights.

One training step of the char-GPT (``examples/train_lm.py``'s model and
loop: forward, backward, AdamW) with fully-sharded parameters on a mesh of
8 CPU devices in one process (``--xla_force_host_platform_device_count``).
Parameters and Adam moments are cut by :func:`jaxmx.fsdp_shardings`, the
batch along its first axis. Every matmul weight is gathered by the quantized
dot (``DotConfig(fsdp="data")``):

* ``bf16``: ``DotConfig(compute_dtype="bfloat16", fsdp="data")``, no
  quantization: each weight shard cast to bfloat16 and gathered. The
  forward and the input-gradient matmul gather the same array, and XLA
  gathers it once and keeps it for the backward pass.
* ``mxfp8`` / ``mxfp4``: the presets with ``fsdp="data"`` and
  ``residuals="quantized"``: each shard quantized along the forward's
  contraction, its codes (FP4 packed two per byte) and E8M0 scales gathered
  as bytes, and the gathered MX copy kept for the backward pass, which
  re-quantizes it along the other axis (as ``residuals="quantized"`` does
  unsharded). One gather per weight per step, like ``bf16``: the ratios of
  the last line compare these.
* ``..., regathered``: the presets with ``fsdp="data"`` as the MX paper
  trains (high-precision residuals): the input-gradient matmul quantizes the
  weight along its other axis from the high-precision shards and gathers
  those codes and scales too. Two gathers per weight per step, against
  bf16's one.

Embeddings, LayerNorm parameters and biases are gathered by XLA as float32
in all three. The figures are read from the compiled program
(``jax.jit(step).lower(...).compile().as_text()``): every ``all-gather``,
its operands' shapes and dtypes (the shard each device sends) and its
result (the whole array each device receives). Bytes per step are result
bytes summed over the all-gathers; the last line gives the ratios.

    python benchmarks/collectives.py [--depth 4] [--width 256] [--show-ops]
"""

from __future__ import annotations

import os
import re

os.environ["XLA_FLAGS"] = (
    re.sub(r"--xla_force_host_platform_device_count=\S*", "", os.environ.get("XLA_FLAGS", ""))
    + " --xla_force_host_platform_device_count=8"
).strip()

import argparse
import collections
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.requires import TRAINING, require

if __name__ == "__main__":  # every missing package named at once, before any import
    require(*TRAINING)

import common

import jaxmx
import jaxmx.flax
from examples import training
from examples.parallel import Parallel
from models import GPT, GPTConfig

# Bytes per element of the HLO element types that can appear.
_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e8m0fnu": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def _arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """``[(dtype, shape)]`` of an HLO type, a tuple type giving several."""
    return [
        (dt, tuple(int(d) for d in dims.split(",") if d))
        for dt, dims in _ARRAY.findall(type_text)
        if dt in _BYTES
    ]


def _nbytes(arrays) -> int:
    return sum(math.prod(shape) * _BYTES[dt] for dt, shape in arrays)


def collectives(hlo: str) -> list[dict]:
    """Every collective of a compiled HLO module: op, operands and result.

    Operand types are looked up by name among the module's instructions
    (``%x = u8[32,512]{...} fusion(...)``), since the compiled text names
    operands without their shapes.
    """
    types, ops = {}, []
    for line in hlo.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, type_text, opcode, rest = m.groups()
        types[name] = type_text
        base = opcode.removesuffix("-start")
        if base in COLLECTIVES and not opcode.endswith("-done"):
            operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
            ops.append({"op": base, "result": _arrays(type_text), "operands": operands})
    for op in ops:
        op["operands"] = [a for name in op["operands"] for a in _arrays(types.get(name, ""))]
    return ops


def _fmt(arrays) -> str:
    return ", ".join(f"{dt}[{','.join(map(str, s))}]" for dt, s in arrays)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--depth", type=int, default=4, help="transformer blocks")
    p.add_argument("--width", type=int, default=256, help="a multiple of 8 devices x 32")
    p.add_argument("--heads", type=int, default=2, help="attention heads")
    p.add_argument("--context", type=int, default=64, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per batch")
    p.add_argument("--show-ops", action="store_true", help="list every all-gather")
    args = p.parse_args()
    if jax.device_count() != 8:
        raise SystemExit(f"needs 8 devices, found {jax.device_count()}")
    parallel = Parallel.over_devices(fsdp=True)
    cfg = GPTConfig(
        vocab_size=84,
        context=args.context,
        depth=args.depth,
        width=args.width,
        heads=args.heads,
    )
    model = GPT(cfg)
    x = jax.random.randint(jax.random.key(0), (args.batch_size, args.context), 0, 84)
    y = jnp.roll(x, -1, axis=1)
    params = training.init_linen_params(model, x, 0)
    optimizer = training.make_optimizer(training.TrainConfig(steps=1000))
    params = parallel.put(params)
    opt_state = parallel.init_state(optimizer, params)
    xs, ys = parallel.put_batch(x), parallel.put_batch(y)
    variants = {
        "bf16": jaxmx.DotConfig(compute_dtype="bfloat16", fsdp="data"),
        "mxfp8": jaxmx.preset("mxfp8", fsdp="data", residuals="quantized"),
        "mxfp4": jaxmx.preset("mxfp4", fsdp="data", residuals="quantized"),
        "mxfp8, regathered": jaxmx.preset("mxfp8", fsdp="data"),
        "mxfp4, regathered": jaxmx.preset("mxfp4", fsdp="data"),
    }
    weights = sum(
        math.prod(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if "kernel" in jax.tree_util.keystr(path)
    )
    rows, totals, listing, by_dot = [], {}, [], {}
    for name, dot_config in variants.items():
        apply_fn = training.apply_fn_for(jaxmx.flax.quantize_model(model, dot_config))
        step = training.make_train_step(apply_fn, optimizer, 0, parallel)
        with jax.set_mesh(parallel.mesh):
            hlo = step.__wrapped__.lower(params, opt_state, xs, ys, jnp.int32(0)).compile()
        ops = collectives(hlo.as_text())
        gathers = [o for o in ops if o["op"] == "all-gather"]
        by_dtype = collections.Counter()
        for o in gathers:
            for dt, shape in o["result"]:
                by_dtype[dt] += math.prod(shape) * _BYTES[dt]
        total = sum(by_dtype.values())
        # The quantized dot gathers bytes (u8) or bfloat16 bits (u16); XLA's own
        # gathers of the other parameters are float32.
        by_dot[name] = by_dtype["u8"] + by_dtype["u16"]
        sent = sum(_nbytes(o["operands"]) for o in gathers)
        totals[name] = total
        others = collections.Counter()
        for o in ops:
            if o["op"] != "all-gather":
                others[o["op"]] += _nbytes(o["result"])
        rows.append(
            [
                name,
                str(len(gathers)),
                f"{sent:,}",
                f"{total:,}",
                ", ".join(f"{dt} {b:,}" for dt, b in sorted(by_dtype.items())),
                f"{total / totals['bf16']:.3f}",
                ", ".join(f"{k} {v:,}" for k, v in sorted(others.items())) or "-",
            ]
        )
        listing.append((name, gathers))
    n = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
    print(
        f"GPT {args.depth}x{args.width}, heads {args.heads}, context {args.context}, batch "
        f"{args.batch_size} ({n:,} params, {weights:,} in matmul weights), FSDP over "
        f"{parallel.size} devices; one train step (fwd+bwd+AdamW), compiled; {common.machine()}\n"
    )
    header = [
        "weights",
        "all-gathers",
        "bytes sent per device",
        "bytes gathered per device",
        "by dtype",
        "vs bf16",
        "other collectives (result bytes)",
    ]
    print(common.table(header, rows))
    if args.show_ops:
        for name, gathers in listing:
            print(f"\n{name}:")
            for o in gathers:
                print(f"  all-gather {_fmt(o['operands'])} -> {_fmt(o['result'])}")
    print(
        "\nMatmul weights alone (the quantized dot's u8/u16 gathers), against bf16: "
        + ", ".join(f"{k} {v / by_dot['bf16']:.3f}" for k, v in by_dot.items() if k != "bf16")
    )
    print(
        f"\ncollectives: mxfp8/bf16 {totals['mxfp8'] / totals['bf16']:.3f}, "
        f"mxfp4/bf16 {totals['mxfp4'] / totals['bf16']:.3f}"
    )


if __name__ == "__main__":
    main()
