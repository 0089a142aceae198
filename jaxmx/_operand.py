"""How one operand of one MX matmul is quantized, shared by dot_general and conv.

Private to jaxmx's ops: the compute dtype, the random bits of stochastic
rounding (a key, or a hash of the tensor), fake-quantizing an operand along
its contraction, argument checks, and a ``lax.dot_general`` that runs on
XLA:CPU for every layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxmx.config import DotConfig
from jaxmx.formats import MXFormat
from jaxmx.quantize import dequantize, fake_quantize_spec
from jaxmx.spec import QuantSpec
from jaxmx.tensor import MXTensor

__all__ = [
    "check_key",
    "check_operands",
    "compute_dtype",
    "fake_operand",
    "lax_dot",
    "operand_spec",
    "random_bits",
]

# Distinct salts/fold-ins for the random bits of the six quantizations.
_ROLE_IDS = {"lhs": 1, "rhs": 2, "grad_dgrad": 3, "rhs_bwd": 4, "lhs_bwd": 5, "grad_wgrad": 6}


def compute_dtype(config: DotConfig):
    if config.compute_dtype is not None:
        return jnp.dtype(config.compute_dtype)
    # Every MX value (down to 2^-133) is exact in bfloat16 and products
    # accumulate in float32, so the choice is only about speed: bfloat16 on
    # accelerators. On CPU the dot itself runs in float32 either way (see
    # lax_dot), so converting to bfloat16 first would only cost time.
    if jax.default_backend() != "cpu":
        return jnp.dtype(jnp.bfloat16)
    return jnp.dtype(jnp.float32)


def hash_bits(x: jax.Array, salt: int) -> jax.Array:
    """Pseudo-random uint32 per element from its bits and position.

    Stochastic rounding inside a backward pass needs random bits but gets no
    key from Flax layers; a hash of the value and its index (the lowbias32
    mixer) is cheap, differs from step to step as the values do, and is
    deterministic for a given input.
    """
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    idx = lax.iota(jnp.uint32, x.size).reshape(x.shape)
    h = bits ^ (idx * jnp.uint32(0x9E3779B9)) ^ jnp.uint32((salt * 0x85EBCA6B) & 0xFFFFFFFF)
    for shift, mul in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        h = (h ^ lax.shift_right_logical(h, jnp.uint32(shift))) * jnp.uint32(mul)
    return h ^ lax.shift_right_logical(h, jnp.uint32(16))


def random_bits(x, spec: QuantSpec, key, role: str):
    if not spec.random_bits:
        return None
    if key is None:
        return hash_bits(x, _ROLE_IDS[role])
    return jax.random.bits(jax.random.fold_in(key, _ROLE_IDS[role]), x.shape, jnp.uint32)


def fake_operand(x, fmt: MXFormat | None, axis: int | None, config: DotConfig, rounding, key, role):
    """``x`` fake-quantized to ``fmt`` with blocks along ``axis``, in compute dtype.

    ``axis=None``: nothing to contract, one element per block. An
    :class:`~jaxmx.MXTensor` is already quantized: it is only decoded.
    """
    if isinstance(x, MXTensor):
        return dequantize(x, compute_dtype(config))
    if fmt is None:
        return x
    if axis is None:
        # Nothing to contract: each element is a block of its own, along a
        # new last axis (a block of 1, or a partial one where the format's
        # blocks are fixed; the same values either way).
        x = x[..., None]
    spec = operand_spec(
        x.ndim,
        fmt,
        x.ndim - 1 if axis is None else axis,
        config,
        rounding,
        single=axis is None,
        role=role,
    )
    q = fake_quantize_spec(x, random_bits(x, spec, key, role), None, spec)
    if axis is None:
        q = q[..., 0]
    return q.astype(compute_dtype(config))


_WEIGHT_ROLES = ("rhs", "rhs_bwd")


def operand_spec(
    ndim: int,
    fmt: MXFormat,
    axis: int,
    config: DotConfig,
    rounding: str,
    single: bool = False,
    role: str = "lhs",
) -> QuantSpec:
    """The spec of an operand of rank ``ndim`` blocked along ``axis`` (0-based).

    ``config.block_size`` applies to the formats whose block size is free
    (the OCP ones and NVFP4), ``config.rhs_block_size`` instead to the
    weight's roles; the BDR formats keep their own blocks, and per-tensor
    formats have none. 2-D tiles cover the operand's last two axes, one of
    which must be ``axis``. ``single``: blocks of one element (nothing to
    contract).
    """
    free = QuantSpec.block_size_is_free(fmt)
    bs = config.block_size
    if role in _WEIGHT_ROLES and config.rhs_block_size is not None:
        bs = config.rhs_block_size
    if isinstance(bs, tuple) and not single:
        if axis not in (ndim - 2, ndim - 1):
            raise ValueError(
                f"rhs_block_size={bs} tiles the weight's last two axes, but this matmul "
                f"contracts its axis {axis} (of {ndim}); move the contraction axis into the "
                "last two, or use an int block size"
            )
        axis = ndim - 1
    bs = (1 if single else bs) if free else None
    # A format whose scales follow their own rule (NVFP4, BDR, per-tensor)
    # keeps it; config.scale_mode is for the formats that have a choice.
    modes = QuantSpec.scale_modes_of(fmt)
    mode = config.scale_mode if config.scale_mode in modes else modes[0]
    return QuantSpec.make(fmt, ndim, axis=axis, block_size=bs, scale_mode=mode, rounding=rounding)


def lax_dot(lhs, rhs, dims, precision=None, preferred_element_type=None, out_sharding=None):
    """``lax.dot_general`` that runs on XLA:CPU for every legal layout.

    XLA:CPU implements a bfloat16 x bfloat16 -> float32 dot for some layouts
    only ("DotThunk::Execute: BF16 x BF16 = F32"), and its layout passes can
    re-create such a layout after any canonicalization (seen in the gradient
    of a rematerialized scan). Products of two bfloat16 values are exact in
    float32, so on CPU bfloat16 operands are widened to float32 first: the
    result is the same float32-accumulated sum, and nothing crashes where
    float32 works. Other backends get the call as it is.
    """
    kwargs = {} if out_sharding is None else {"out_sharding": out_sharding}
    out_dtype = jnp.dtype(preferred_element_type or jnp.promote_types(lhs.dtype, rhs.dtype))
    if jax.default_backend() == "cpu" and jnp.bfloat16 in (lhs.dtype, rhs.dtype):
        widen = jnp.promote_types(jnp.float32, out_dtype)
        out = lax.dot_general(
            lhs.astype(widen),
            rhs.astype(widen),
            dims,
            precision,
            preferred_element_type=widen,
            **kwargs,
        )
        return out.astype(out_dtype)
    return lax.dot_general(
        lhs, rhs, dims, precision, preferred_element_type=preferred_element_type, **kwargs
    )


def check_operands(lhs, rhs, op: str) -> tuple[jax.Array, jax.Array]:
    """Both operands as arrays (or MXTensors) of a float dtype MX quantizes
    (float32, bfloat16, float16)."""
    lhs, rhs = (x if isinstance(x, MXTensor) else jnp.asarray(x) for x in (lhs, rhs))
    for name, x in (("lhs", lhs), ("rhs", rhs)):
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == jnp.float64:
            raise TypeError(
                f"{name} has dtype {x.dtype}; jaxmx.{op} takes float32, bfloat16 or "
                "float16 operands"
            )
    return lhs, rhs


def check_key(key, config: DotConfig) -> None:
    """A key is only for configs that round stochastically; anything else is a mistake."""
    if key is not None and not config.uses_random_bits:
        raise ValueError(
            "a key was given but the config rounds nothing stochastically "
            f"(rounding={config.rounding!r}, grad_rounding={config.grad_rounding!r}); "
            "drop the key or set rounding/grad_rounding='stochastic'"
        )
