"""The matmul parts of benchmarks/device.py: implementations checked against XLA, then timed.

* ``check_matmuls``: the quantized ``dot_general`` (forward and both
  gradients) with ``DotConfig(implementation="native")`` against
  ``"xla"``, within the float32 accumulation bound of each matmul on its
  quantized operands, and with ``"pallas"`` (the operands quantized by the
  kernels) bit for bit.
* ``train_steps``: the training step of benchmarks/train_step.py's MLP
  (256 x 1024 x 1024 x 1024, forward and backward) in MXFP8, emulated and
  native, as medians of interleaved runs, with ratios to the faster of the
  float32 step and the step with bfloat16 matmuls.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np

import jaxmx
from benchmarks.common import compare
from benchmarks.train_step import mlp_case

DIMS = (((1,), (0,)), ((), ()))
FORMATS = ("mxfp8_e4m3", "mxfp4_e2m1", "nvfp4")


def _grads(cfg, x, w, g):
    y, vjp = jax.vjp(lambda a, b: jaxmx.dot_general(a, b, DIMS, config=cfg), x, w)
    return [np.asarray(v, np.float64) for v in (y, *vjp(g))]


def _bounds(fmt, x, w, g):
    """``(n + 2) * 2^-24 * sum |products|`` of each matmul on its quantized operands."""

    def q(a, axis):
        return np.abs(np.asarray(jaxmx.fake_quantize(a, fmt, axis=axis), np.float64))

    (m, k), n = x.shape, w.shape[1]
    u = 2.0**-24
    return (
        (k + 2) * u * (q(x, 1) @ q(w, 0)),
        (n + 2) * u * (q(g, 1) @ q(w, 1).T),
        (m + 2) * u * (q(x, 0).T @ q(g, 0)),
    )


def check_matmuls(kernel: bool, shape=(256, 512, 256)) -> list[dict]:
    """One row per format: native (and pallas) against the emulation."""
    m, k, n = shape
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (m, k))
    w = jax.random.normal(kw, (k, n)) * 0.05
    g = jax.random.normal(kg, (m, n))
    rows = []
    for fmt in FORMATS:
        cfg = jaxmx.DotConfig(lhs=fmt, rhs=fmt, grad=fmt, implementation="xla")
        want = _grads(cfg, x, w, g)
        native = _grads(cfg.replace(implementation="native"), x, w, g)
        row = {"format": fmt, "matmul": "forward+dgrad+wgrad"}
        row["native_vs_xla"] = all(
            bool(np.all(np.abs(a - b) <= bound))
            for a, b, bound in zip(native, want, _bounds(fmt, x, w, g), strict=True)
        )
        ctx = contextlib.nullcontext() if kernel else jaxmx.pallas.interpret("mosaic_tpu")
        if kernel or fmt == FORMATS[0]:  # interpreted: one format (seconds each)
            small = (x[:32, :64], w[:64, :32], g[:32, :32])
            with ctx:
                got = _grads(cfg.replace(implementation="pallas"), *small)
            ref = _grads(cfg, *small)
            row["pallas_vs_xla"] = all(np.array_equal(a, b) for a, b in zip(got, ref, strict=True))
            row["pallas_interpreted"] = not kernel
        rows.append(row)
    return rows


def train_steps(repeats: int) -> list[dict]:
    """The MLP training step in MXFP8, emulated and native, against the faster of the
    float32 and the bfloat16-matmul step (on XLA:CPU float32 is often the faster)."""
    make, args = mlp_case(jax.random.key(0))
    cfg = jaxmx.preset("mxfp8")
    t_bf16, t_fp32 = compare(make("bf16", cfg), make("fp32", cfg), args, repeats=repeats)
    name, fast = ("bf16", make("bf16", cfg)) if t_bf16 <= t_fp32 else ("fp32", make("fp32", cfg))
    rows = []
    for label, c in (
        ("mxfp8, emulated (xla)", cfg.replace(implementation="xla")),
        ("mxfp8, native (lax.scaled_dot)", cfg.replace(implementation="native")),
    ):
        t, base = compare(make("mx", c), fast, args, repeats=repeats)
        rows.append(
            {"step": label, "baseline": name, "baseline_ms": 1e3 * base, "ms": 1e3 * t,
             "over_baseline": t / base, "bf16_over_fp32": t_bf16 / t_fp32}
        )  # fmt: skip
    return rows


def print_rows(matmuls: list[dict], steps: list[dict], table) -> None:
    cols = ["format", "native_vs_xla", "pallas_vs_xla"]
    print(table(cols, [[str(r.get(c, "-")) for c in cols] for r in matmuls]))
    cols = ["step", "baseline", "baseline_ms", "ms", "over_baseline"]
    rows = [[r["step"], r["baseline"]] + [f"{r[c]:.3g}" for c in cols[2:]] for r in steps]
    print(table(cols, rows))
