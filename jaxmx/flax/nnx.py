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

from jaxmx.config import DotConfig
from jaxmx.flax._ops import MX_OPS, MXAttention, MXConv, MXDotGeneral, MXEinsumOp, as_config
from jaxmx.tensor import MXTensor

# An MXTensor assigned to an nnx Module attribute is data (a pytree of
# arrays that jit/grad/split see), like an array; nnx would otherwise ask for
# nnx.data(...). jaxmx.tensor registers it too when flax.nnx is already loaded.
nnx.register_data_type(MXTensor)

__all__ = [
    "Linear",
    "LinearGeneral",
    "Einsum",
    "Conv",
    "MultiHeadAttention",
    "configure",
    "held_config",
]

# The attribute each nnx layer takes its matmul from, and Flax's default.
# Other nnx layers that multiply (ConvTranspose, Embed.attend, LoRA) call
# lax/jnp directly and have no such attribute: jaxmx.flax.quantize_model lists
# them as kept in high precision, with that reason.
INJECTION_POINTS = {
    nnx.Linear: ("dot_general", lax.dot_general),
    nnx.LinearGeneral: ("dot_general", None),  # None: lax.dot_general
    nnx.Einsum: ("einsum_op", jnp.einsum),
    nnx.Conv: ("conv_general_dilated", lax.conv_general_dilated),
    nnx.MultiHeadAttention: ("attention_fn", nnx.dot_product_attention),
}


def configure(module: nnx.Module, config) -> bool:
    """Points an nnx matmul layer's injection point at jaxmx, or back at Flax; in place.

    Args:
      module: an ``nnx.Linear``, ``LinearGeneral``, ``Einsum``, ``Conv`` or
        ``MultiHeadAttention`` (or subclass).
      config: a DotConfig or preset name: the layer's matmul runs in MX with
        it (replacing an earlier jaxmx config). ``None`` (or an all-high-
        precision config): a matmul that jaxmx configured earlier goes back
        to Flax's default; Flax's default or the user's own function is left
        as it is.

    Returns:
      Whether the module was changed.

    Raises:
      ValueError: an MX config was asked for a module that has a custom
        matmul function (not Flax's, not jaxmx's).
      TypeError: the module is not one of the supported layers, or
        ``config`` is not a config.

    >>> from flax import nnx
    >>> layer = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
    >>> configure(layer, "mxfp8"), held_config(layer).lhs.name
    (True, 'mxfp8_e4m3')
    >>> configure(layer, None), held_config(layer), layer.dot_general is lax.dot_general
    (True, None, True)
    """
    cfg = as_config(config)
    field, default = _injection_point(module)
    current = getattr(module, field)
    if cfg is None:
        if not isinstance(current, MX_OPS):
            return False
        setattr(module, field, default)
        return True
    value = _MAKE[field](cfg)
    if not _is_flax_own(field, current) and not isinstance(current, MX_OPS):
        raise ValueError(
            f"{type(module).__name__} has a custom {field}={current!r}; jaxmx cannot replace it"
        )
    if getattr(module, f"{field}_cls", None) is not None:
        raise ValueError(
            f"{type(module).__name__} has a custom {field}_cls; jaxmx cannot replace it"
        )
    setattr(module, field, value)
    return True


def held_config(module: nnx.Module) -> DotConfig | None:
    """The DotConfig the layer's matmul runs with now; None if not jaxmx's.

    For ``MultiHeadAttention`` this is the config of its q.k and p.v
    matmuls (its projections are layers of their own).

    >>> from flax import nnx
    >>> held_config(Linear(4, 2, mx="mxfp6", rngs=nnx.Rngs(0))).rhs.name
    'mxfp6_e3m2'
    >>> held_config(nnx.Linear(4, 2, rngs=nnx.Rngs(0))) is None
    True
    """
    field, _ = _injection_point(module)
    current = getattr(module, field)
    return current.config if isinstance(current, MX_OPS) else None


def custom_op(module: nnx.Module) -> str | None:
    """The name of the field holding the user's own matmul function, if any.

    >>> from flax import nnx
    >>> custom_op(nnx.Linear(4, 2, dot_general=lambda *a, **k: None, rngs=nnx.Rngs(0)))
    'dot_general'
    >>> custom_op(Linear(4, 2, mx="mxfp8", rngs=nnx.Rngs(0))) is None
    True
    """
    field, _ = _injection_point(module)
    if getattr(module, f"{field}_cls", None) is not None:
        return f"{field}_cls"
    current = getattr(module, field)
    if _is_flax_own(field, current) or isinstance(current, MX_OPS):
        return None
    return field


def _injection_point(module) -> tuple[str, object]:
    kind = next((k for k in INJECTION_POINTS if isinstance(module, k)), None)
    if kind is None:
        raise TypeError(f"{type(module).__name__} is not an nnx matmul layer jaxmx can configure")
    return INJECTION_POINTS[kind]


def _is_flax_own(field: str, value) -> bool:
    # None means the lax function to the layers that default to None.
    return value is None or value is _FLAX_FUNCTIONS[field]


_FLAX_FUNCTIONS = {
    "dot_general": lax.dot_general,
    "einsum_op": jnp.einsum,
    "conv_general_dilated": lax.conv_general_dilated,
    "attention_fn": nnx.dot_product_attention,
}

# The jaxmx callable each injection point gets.
_MAKE = {
    "dot_general": MXDotGeneral,
    "einsum_op": MXEinsumOp,
    "conv_general_dilated": MXConv,
    "attention_fn": lambda cfg: MXAttention(cfg.for_activations()),
}


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
