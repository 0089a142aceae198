"""Calibration Hessians ``X^T X`` of a model's matmul weights, for GPTQ and weighted search."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def gram(x: jax.Array, axis: int = -1) -> jax.Array:
    """``X^T X`` of the rows ``X`` of ``x`` along ``axis`` (float32 products at full precision)."""
    rows = jnp.moveaxis(x, axis, -1).reshape(-1, x.shape[axis]).astype(jnp.float32)
    return jnp.matmul(rows.T, rows, precision=lax.Precision.HIGHEST)


def _hessian_of(hessians, path, who):
    if path not in hessians:
        some = ", ".join(sorted(hessians)[:4]) or "none"
        raise ValueError(
            f"{who} has no Hessian for {path!r}; it has {len(hessians)} ({some}, ...). "
            "Collect it (collect_hessians) or keep this weight out of the rules"
        )
    return hessians[path]


def collect_hessians(
    model: Any, variables: Any, batches: Iterable[Any], *, method: str = "__call__"
) -> dict:
    """``X^T X`` of the inputs of every ``nn.Dense`` (and ``nn.Embed.attend``) of a linen model.

    Runs ``model.apply(variables, *batch)`` for each batch (unjitted) under
    ``flax.linen.intercept_methods`` and accumulates, for each Dense call,
    the Gram matrix of its input rows (float32 products, float64 sums). Keys are the kernels'
    paths as :func:`jaxmx.quantize_params` names them
    (``"params/layers_0/mlp/up_proj/kernel"``; ``".../embedding"`` for the
    input of an embedding table used as a tied output head, contracted
    along its features, axis 1).

    Args:
      model: a ``flax.linen`` Module.
      variables: its variables, ``{"params": ...}``.
      batches: an iterable of argument tuples (or single arrays) for
        ``model.apply``.
      method: the model method to run.

    Returns:
      ``{path: np.ndarray (in, in)}``.

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxmx
    >>> model = nn.Dense(4)
    >>> v = model.init(jax.random.key(0), jnp.ones((1, 8)))
    >>> h = jaxmx.ptq.collect_hessians(model, v, [jnp.ones((3, 8))])
    >>> h["params/kernel"][0, :2]
    array([3., 3.])
    """
    from flax import linen as nn

    sums: dict[str, np.ndarray] = {}
    last: list = [None, None]  # (input, its Gram matrix): q/k/v share one input

    def record(next_fun, args, kwargs, context):
        module, name = context.module, context.method_name
        leaf = None
        if isinstance(module, nn.Dense) and name == "__call__":
            leaf = "kernel"
        elif isinstance(module, nn.Embed) and name == "attend":
            leaf = "embedding"  # a tied output head: the table along its features
        if leaf is not None:
            x = args[0]
            if last[0] is not x:
                last[:] = [x, np.asarray(gram(x), np.float64)]
            key = "/".join(("params", *module.path, leaf))
            sums[key] = sums.get(key, 0.0) + last[1]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        for batch in batches:
            batch = batch if isinstance(batch, tuple) else (batch,)
            model.apply(variables, *batch, method=method)
    if not sums:
        raise ValueError("no nn.Dense or nn.Embed.attend ran in the model: nothing to collect")
    return sums
