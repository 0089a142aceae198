"""Hashable MX callables for Flax's injection points, and config resolution.

Flax layers take their matmul as a field or attribute (``dot_general``,
``einsum_op``, ``conv_general_dilated``, ``attention_fn``). These frozen
dataclasses hold a :class:`~jaxmx.DotConfig` and compare by value, so a
module configured with them stays hashable and jit caches stay warm.
:func:`as_config` (the core's :func:`jaxmx.rules.resolve_config`) turns what
a user wrote (``mx=``, a rule's config) into a DotConfig.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxmx.config import DotConfig
from jaxmx.conv import conv_general_dilated
from jaxmx.dot import dot_general
from jaxmx.einsum import einsum
from jaxmx.rules import resolve_config

__all__ = ["MXDotGeneral", "MXEinsumOp", "MXConv", "MXAttention", "MX_OPS", "as_config"]


# Resolving `mx=` values and rule configs is the core's job (jaxmx.rules).
as_config = resolve_config


# Each forwards the arguments Flax passes (those of the lax function it
# replaces, plus out_sharding) unchanged, adding only the config.


@dataclasses.dataclass(frozen=True)
class MXDotGeneral:
    """``dot_general=`` for Dense / DenseGeneral / Linear / LinearGeneral."""

    config: DotConfig

    def __call__(self, *args: Any, **kwargs: Any) -> jax.Array:
        return dot_general(*args, config=self.config, **kwargs)


@dataclasses.dataclass(frozen=True)
class MXEinsumOp:
    """``einsum_op=`` for ``nnx.Einsum`` (and the linen counterpart)."""

    config: DotConfig

    def __call__(self, *args: Any, **kwargs: Any) -> jax.Array:
        return einsum(*args, config=self.config, **kwargs)


@dataclasses.dataclass(frozen=True)
class MXConv:
    """``conv_general_dilated=`` for linen ``Conv`` and ``nnx.Conv``."""

    config: DotConfig

    def __call__(self, *args: Any, **kwargs: Any) -> jax.Array:
        return conv_general_dilated(*args, config=self.config, **kwargs)


@dataclasses.dataclass(frozen=True)
class MXAttention:
    """``attention_fn=`` computing q.k and p.v as MX matmuls.

    Same contract as Flax's ``dot_product_attention`` (linen and nnx): the
    query is scaled by ``1/sqrt(depth)``, ``bias`` is added, ``mask`` (False
    = masked) and ``is_causal`` mask logits, softmax runs in float32, then
    dropout. Both matmuls quantize their two activation operands: q and k
    along the head depth, the weights and v along the key axis. Query heads
    may be a multiple of key/value heads (grouped-query attention).
    ``config`` is used as given; :func:`jaxmx.flax.quantize_model` passes
    ``DotConfig.for_activations()`` so weight formats do not apply here.
    """

    config: DotConfig

    def __call__(
        self,
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        bias: jax.Array | None = None,
        mask: jax.Array | None = None,
        broadcast_dropout: bool = True,
        dropout_rng: jax.Array | None = None,
        dropout_rate: float = 0.0,
        deterministic: bool = False,
        dtype: jax.typing.DTypeLike | None = None,
        precision: jax.lax.PrecisionLike = None,
        module: Any = None,
        is_causal: bool = False,
    ) -> jax.Array:
        dtype = dtype or jnp.result_type(query, key, value)
        query, key, value = (x.astype(dtype) for x in (query, key, value))
        if key.shape[-2] != query.shape[-2]:  # grouped-query attention
            rep = query.shape[-2] // key.shape[-2]
            key, value = jnp.repeat(key, rep, axis=-2), jnp.repeat(value, rep, axis=-2)
        query = query / jnp.sqrt(query.shape[-1]).astype(dtype)
        logits = einsum(
            "...qhd,...khd->...hqk", query, key, config=self.config, precision=precision
        )
        if bias is not None:
            logits = logits + bias
        if is_causal:
            q_len, k_len = logits.shape[-2:]
            causal = jnp.tril(jnp.ones((q_len, k_len), bool), k_len - q_len)
            mask = causal if mask is None else jnp.logical_and(mask, causal)
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)
        if module is not None and hasattr(module, "sow"):
            _sow(module, weights)
        if not deterministic and dropout_rate > 0.0:
            keep = 1.0 - dropout_rate
            shape = weights.shape
            if broadcast_dropout:  # one mask for every batch item and head
                shape = (1,) * (len(shape) - 2) + shape[-2:]
            kept = jax.random.bernoulli(dropout_rng, keep, shape)
            weights = weights * (kept / keep).astype(dtype)
        return einsum(
            "...hqk,...khd->...qhd", weights, value, config=self.config, precision=precision
        )


# Every callable jaxmx puts into a Flax injection point.
MX_OPS = (MXDotGeneral, MXEinsumOp, MXConv, MXAttention)


def _sow(module, weights) -> None:
    try:  # nnx
        from flax import nnx

        if isinstance(module, nnx.Module):
            module.sow(nnx.Intermediate, "attention_weights", weights)
            return
    except ImportError:  # pragma: no cover
        pass
    module.sow("intermediates", "attention_weights", weights)
