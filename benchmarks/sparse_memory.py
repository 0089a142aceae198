"""Temporaries of a served model with N:M-sparse weights: densified where read vs at the start.

``jaxmx.intercept`` keeps each NMSparseTensor compact until the operation
that reads it. This prints XLA's temporary-buffer size
(``jax.jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes``)
of two 6-layer models with 2:4 MXFP4 weights of ``--dim`` x ``--dim``, under
MXFP8 and weight-only rules, served as they are and with every weight
densified at the start of the call (what intercept did before):

* ``scan``: the layers stacked and run by ``lax.scan``;
* ``unrolled``: a Python loop over the layers, with XLA's default scheduler
  and with its memory-optimized one.

    python benchmarks/sparse_memory.py
    python benchmarks/sparse_memory.py --dim 1024
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from jax import lax

import jaxmx

SP = jaxmx.NMSparsity(2, 4)
MEMORY_OPTIMIZED = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def _scan_model(params, x):
    def layer(h, w):
        return jnp.tanh(h @ w), None

    return lax.scan(layer, x, params["stack"])[0] @ params["head"]


def _loop_model(params, x):
    for w in params["layers"]:
        x = jnp.tanh(x @ w)
    return x


def _densified(tree):
    sparse = lambda x: isinstance(x, jaxmx.NMSparseTensor)  # noqa: E731
    return jax.tree.map(lambda x: x.densify() if sparse(x) else x, tree, is_leaf=sparse)


def _temp(fn, params, x, options=None) -> int:
    compiled = jax.jit(fn).lower(params, x).compile(compiler_options=options)
    return int(compiled.memory_analysis().temp_size_in_bytes)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=512, help="rows and columns of each layer")
    p.add_argument("--layers", type=int, default=6, help="number of layers")
    args = p.parse_args(argv)
    d, n = args.dim, args.layers
    w = jax.random.normal(jax.random.key(0), (n, d, d)) * d**-0.5
    x = jax.random.normal(jax.random.key(1), (8, d))
    head = jax.random.normal(jax.random.key(2), (d, 16))
    stack = jaxmx.quantize_sparse(w, "mxfp4", SP, axis=1)
    models = {
        "scan": (_scan_model, {"stack": stack, "head": head}),
        "unrolled": (
            _loop_model,
            {"layers": [jaxmx.quantize_sparse(w[i], "mxfp4", SP, axis=0) for i in range(n)]},
        ),
    }
    print(f"{jax.devices()[0].platform}, jax {jax.__version__}; {n} layers of {d}x{d}, 2:4 MXFP4")
    print("| model | rules | scheduler | densified where read (MB) | densified at start (MB) |")
    print("|---|---|---|---|---|")
    for name, (model, params) in models.items():
        for rules in ("mxfp8", None):
            served = jaxmx.intercept(model, rules, warn=False)
            at_start = lambda p, x, s=served: s(_densified(p), x)  # noqa: E731
            schedulers = {"default": None}
            if name == "unrolled":
                schedulers["memory-optimized"] = MEMORY_OPTIMIZED
            for label, options in schedulers.items():
                new = _temp(served, params, x, options) / 1e6
                old = _temp(at_start, params, x, options) / 1e6
                rule = rules or "weight-only"
                print(f"| {name} | {rule} | {label} | {new:.2f} | {old:.2f} |")


if __name__ == "__main__":
    main()
