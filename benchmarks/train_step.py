"""Speed of an MX training step against the same step in float32.

Two models, forward + backward (``jax.grad``) under ``jit``:

* mlp: batch 256, 1024 -> 1024 -> 1024 with GELU, float32 params;
* block: a pre-norm transformer block (batch 8, 128 tokens, width 512,
  8 heads, MLP 4x): q/k/v/out projections, the two attention matmuls
  (q.k and p.v) and the MLP.

Each is timed with every matmul in plain float32 and with every matmul a
``jaxmx.dot_general`` / ``jaxmx.einsum`` in the MXFP8 recipe (six
quantizations per matmul), interleaved in the same run; the ratio of
medians is printed. A third row runs the float32 model with bfloat16
matmuls (what the MX emulation multiplies in on CPUs with bf16 dot
instructions), to show how much of the difference is the matmul dtype.

    python benchmarks/train_step.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import collections
import functools
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

import jaxmx
from jaxmx._operand import cpu_has_bf16_dot, dot_compute_dtype

DN = (((1,), (0,)), ((), ()))


def _ops(mode: str, cfg: jaxmx.DotConfig):
    """(dense, einsum) for a mode: fp32, bf16 (matmuls in bf16), or mx."""
    if mode == "mx":
        dense = lambda x, w: jaxmx.dot_general(  # noqa: E731
            x, w, (((x.ndim - 1,), (0,)), ((), ())), config=cfg
        )
        ein = functools.partial(jaxmx.einsum, config=cfg.for_activations())
        return dense, ein
    if mode == "bf16":

        def dense(x, w):
            return jax.lax.dot_general(
                x.astype(jnp.bfloat16),
                w.astype(jnp.bfloat16),
                (((x.ndim - 1,), (0,)), ((), ())),
                preferred_element_type=jnp.float32,
            )

        def ein(s, a, b):
            return jnp.einsum(
                s,
                a.astype(jnp.bfloat16),
                b.astype(jnp.bfloat16),
                preferred_element_type=jnp.float32,
            )

        return dense, ein
    return (lambda x, w: jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))), jnp.einsum


_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\S+?)(?:\{[^}]*\})? ([a-z-]+)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY )?%(\S+) \(")


def dot_layouts(fn, *args) -> str:
    """How XLA runs each dot of ``fn``'s compiled step, counted by kind.

    Each kind is ``dtype runner lhs_c=.. rhs_c=..`` (``batch=..`` if any):
    the operand dtype, ``library`` for a dot in a library fusion (YNNPACK,
    oneDNN) or ``DotThunk`` for XLA's own, and the contracting axes.
    """
    text = fn.lower(*args).compile().as_text()
    types, custom, dots, comp = {}, set(), [], None
    for line in text.splitlines():
        if m := _COMP.match(line):
            comp = m.group(1)
            continue
        if not (m := _INSTR.match(line)):
            continue
        name, typ, op, rest = m.groups()
        types[name] = typ.split("[")[0]
        if op == "fusion" and "kind=kCustom" in rest:
            custom.update(re.findall(r"calls=%([\w.-]+)", rest))
        if op == "dot":
            lhs = re.match(r"%(\S+?), %(\S+?)\)", rest)
            dims = dict(re.findall(r"(\w+_dims)=\{([\d,]*)\}", rest))
            dots.append((comp, lhs.group(1), lhs.group(2), dims))
    kinds = collections.Counter()
    for comp, a, b, dims in dots:
        dtype = (
            types.get(a, "?") if types.get(a) == types.get(b) else f"{types.get(a)}x{types.get(b)}"
        )
        runner = "library" if comp in custom else "DotThunk"
        kind = f"{dtype} {runner} lhs_c={{{dims.get('lhs_contracting_dims', '')}}}"
        kind += f" rhs_c={{{dims.get('rhs_contracting_dims', '')}}}"
        if dims.get("lhs_batch_dims"):
            kind += f" batch={{{dims['lhs_batch_dims']}}}"
        kinds[kind] += 1
    return "; ".join(f"{n}x {k}" for k, n in sorted(kinds.items())) or "no dots"


def compute_line(cfg: jaxmx.DotConfig) -> str:
    """Which dtype the MX matmuls decode their operands into, and why."""
    why = f"compute_dtype={cfg.compute_dtype!r}"
    if cfg.compute_dtype is None and jax.default_backend() == "cpu":
        why += f" on a CPU {'with' if cpu_has_bf16_dot() else 'without'} bf16 dot instructions"
    backend = jax.default_backend()
    platform = jaxmx.platforms.PLATFORMS.get({"gpu": "cuda"}.get(backend, backend), "cpu")
    cdt = dot_compute_dtype(cfg, platform)
    return f"MX matmuls multiply dequantized operands in {cdt} ({why}; exact)"


def mlp_case(key):
    k = jax.random.split(key, 3)
    x = jax.random.normal(k[0], (256, 1024))
    params = (
        jax.random.normal(k[1], (1024, 1024)) * 0.03,
        jax.random.normal(k[2], (1024, 1024)) * 0.03,
    )

    def make(mode, cfg):
        dense, _ = _ops(mode, cfg)

        def loss(p, x):
            h = jax.nn.gelu(dense(x, p[0]))
            return jnp.mean(dense(h, p[1]) ** 2)

        return jax.jit(jax.grad(loss))

    return make, (params, x)


def block_case(key, batch=8, seq=128, width=512, heads=8):
    k = jax.random.split(key, 6)
    hd = width // heads
    x = jax.random.normal(k[0], (batch, seq, width))
    s = width**-0.5
    params = dict(
        qkv=jax.random.normal(k[1], (width, 3 * width)) * s,
        out=jax.random.normal(k[2], (width, width)) * s,
        up=jax.random.normal(k[3], (width, 4 * width)) * s,
        down=jax.random.normal(k[4], (4 * width, width)) * (4 * width) ** -0.5,
    )
    mask = jnp.tril(jnp.ones((seq, seq), bool))

    def make(mode, cfg):
        dense, ein = _ops(mode, cfg)

        def norm(v):
            return (v - v.mean(-1, keepdims=True)) * jax.lax.rsqrt(v.var(-1, keepdims=True) + 1e-5)

        def loss(p, x):
            q, kk, v = jnp.split(dense(norm(x), p["qkv"]).reshape(batch, seq, 3 * heads, hd), 3, 2)
            att = ein("bqhd,bkhd->bhqk", q, kk) * hd**-0.5
            att = jax.nn.softmax(jnp.where(mask, att, -1e9), axis=-1)
            o = ein("bhqk,bkhd->bqhd", att, v).reshape(batch, seq, width)
            h = x + dense(o, p["out"])
            h = h + dense(jax.nn.gelu(dense(norm(h), p["up"])), p["down"])
            return jnp.mean(h**2)

        return jax.jit(jax.grad(loss))

    return make, (params, x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=20, help="timed steps of each")
    p.add_argument("--recipe", default="mxfp8", help="a jaxmx preset name")
    args = p.parse_args()
    cfg = jaxmx.preset(args.recipe)
    rows, layouts = [], []
    for name, case in (("mlp 256x1024x1024x1024", mlp_case), ("transformer block", block_case)):
        make, fargs = case(jax.random.key(0))
        fp32 = make("fp32", cfg)
        layouts.append(f"{name}, float32: {dot_layouts(fp32, *fargs)}")
        for mode, label in (
            ("mx", f"{args.recipe} (6 quantizations/matmul)"),
            ("bf16", "float32 model, bf16 matmuls"),
        ):
            step = make(mode, cfg)
            layouts.append(f"{name}, {label}: {dot_layouts(step, *fargs)}")
            t, base = common.compare(step, fp32, fargs, repeats=args.repeats)
            rows.append([name, label, f"{base * 1e3:.1f}", f"{t * 1e3:.1f}", f"{t / base:.2f}x"])
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(f"\nforward+backward, median of {args.repeats} steps; {common.machine()}")
    print(compute_line(cfg) + "\n")
    print(common.table(["model", "step", "float32 ms", "ms", "ratio to float32"], rows))
    print("\nDots of each compiled step (count x operand dtype, runner, contracting axes):")
    for line in layouts:
        print(f"  {line}")


if __name__ == "__main__":
    main()
