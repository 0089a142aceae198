"""MX counterparts of Flax nnx's matmul layers.

Each class is the nnx layer with one more keyword argument, ``mx``: a
:class:`~jaxmx.DotConfig` (or preset name) for its matmuls, or ``None``.
It only sets the layer's own injection point (``dot_general``,
``einsum_op``, ``conv_general_dilated``, ``attention_fn``), so parameters,
state and checkpoints are exactly those of the nnx original.

>>> from flax import nnx
>>> from jaxmx.flax import nnx as mxnnx
>>> layer = mxnnx.Linear(32, 8, mx="mxfp8", rngs=nnx.Rngs(0))
>>> layer.kernel.shape
(32, 8)
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxmx.flax._ops import MXAttention, MXConv, MXDotGeneral, MXEinsumOp
from jaxmx.flax.linen import as_config

__all__ = ["Linear", "LinearGeneral", "Einsum", "Conv", "MultiHeadAttention", "configure"]

# The attribute each nnx layer takes its matmul from, and Flax's default.
INJECTION_POINTS = {
    nnx.Linear: ("dot_general", lax.dot_general),
    nnx.LinearGeneral: ("dot_general", lax.dot_general),
    nnx.Einsum: ("einsum_op", jnp.einsum),
    nnx.Conv: ("conv_general_dilated", lax.conv_general_dilated),
    nnx.MultiHeadAttention: ("attention_fn", nnx.dot_product_attention),
}


def configure(module: nnx.Module, config) -> bool:
    """Points an nnx matmul layer's injection point at jaxmx; in place.

    Args:
      module: an ``nnx.Linear``, ``LinearGeneral``, ``Einsum``, ``Conv`` or
        ``MultiHeadAttention`` (or subclass).
      config: a DotConfig, preset name or None (leaves the module alone).

    Returns:
      Whether the module was changed.

    Raises:
      ValueError: the module already has a custom matmul function.
      TypeError: the module is not one of the supported layers.
    """
    cfg = as_config(config)
    kind = next((k for k in INJECTION_POINTS if isinstance(module, k)), None)
    if kind is None:
        raise TypeError(f"{type(module).__name__} is not an nnx matmul layer jaxmx can configure")
    if cfg is None:
        return False
    field, default = INJECTION_POINTS[kind]
    value = {
        "dot_general": MXDotGeneral,
        "einsum_op": MXEinsumOp,
        "conv_general_dilated": MXConv,
    }.get(field, None)
    value = MXAttention(cfg.for_activations()) if value is None else value(cfg)
    current = getattr(module, field)
    # Some layers default to None (meaning the lax function), others to the function.
    if current not in (None, default) and not isinstance(current, type(value)):
        raise ValueError(
            f"{type(module).__name__} has a custom {field}={current!r}; jaxmx cannot replace it"
        )
    if getattr(module, f"{field}_cls", None) is not None:
        raise ValueError(
            f"{type(module).__name__} has a custom {field}_cls; jaxmx cannot replace it"
        )
    setattr(module, field, value)
    return True


class _MXInit:
    """Mixin: the layer's own constructor, then :func:`configure` with ``mx``."""

    def __init__(self, *args, mx=None, **kwargs):
        super().__init__(*args, **kwargs)
        configure(self, mx)


class Linear(_MXInit, nnx.Linear):
    """``nnx.Linear`` whose matmul is a :func:`jaxmx.dot_general` with config ``mx``."""


class LinearGeneral(_MXInit, nnx.LinearGeneral):
    """``nnx.LinearGeneral`` with an MX matmul."""


class Einsum(_MXInit, nnx.Einsum):
    """``nnx.Einsum`` whose contraction is a :func:`jaxmx.einsum`."""


class Conv(_MXInit, nnx.Conv):
    """``nnx.Conv`` whose convolution is a :func:`jaxmx.conv_general_dilated`."""


class MultiHeadAttention(nnx.MultiHeadAttention):
    """``nnx.MultiHeadAttention`` with MX projections and attention matmuls.

    The q/k/v/out projections use ``mx``; the two attention matmuls use
    ``mx.for_activations()``.
    """

    def __init__(self, *args, mx=None, **kwargs):
        super().__init__(*args, **kwargs)
        configure(self, mx)
        for proj in (self.query, self.key, self.value, self.out):
            configure(proj, mx)
