"""Code-wise MXTensor operations: signs, powers of two (scales only), the dtype stood for."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmx._bitmove import move as _move
from jaxmx.array_ops._layout import (
    _OUT_DTYPES,
    _block_aligned,
    _replace,
    _scale_bytes,
    _scale_from_bytes,
    _tensor,
    _via_unpacked,
    _where,
)
from jaxmx.blocks import pack_group, to_blocks
from jaxmx.codes import raw_to_storage, storage_to_raw
from jaxmx.tensor import MXTensor

# --------------------------------------------------------------------------
# Code-wise operations: signs, powers of two.
# --------------------------------------------------------------------------


def _byte_pattern(t: MXTensor, code_mask: int) -> np.ndarray:
    """Per byte of packed ``data`` along the block axis: ``code_mask`` at every real code."""
    bits = t.format.element.bits
    g, nbytes = pack_group(bits)

    def group(count: int) -> np.ndarray:
        word = sum(code_mask << (bits * j) for j in range(count))
        return np.frombuffer(word.to_bytes(nbytes, "little"), np.uint8)

    full, rem = divmod(t.length, g)
    parts = [np.tile(group(g), full)] + ([group(rem)] if rem else [])
    pattern = np.concatenate(parts)
    return pattern.reshape(pattern.shape + (1,) * (-t.axis - 1))


def _to_data(mask: jax.Array, t: MXTensor) -> jax.Array:
    """A per-block array (scale-shaped) repeated over each block's entries of ``data``."""
    per = t.block_size * t.format.element.bits // 8 if t.packed else t.block_size
    ax = t.ndim + t.axis
    rep = jnp.repeat(mask, per, axis=ax)
    return lax.slice_in_dim(rep, 0, t.data.shape[ax], axis=ax)


def _per_block_any(flags: jax.Array, t: MXTensor) -> jax.Array:
    """Scale-shaped: whether any entry of ``data`` in the block is flagged."""
    per = t.block_size * t.format.element.bits // 8 if t.packed else t.block_size
    blocked = to_blocks(flags, t.axis, per)
    return jnp.any(blocked, axis=blocked.ndim + t.axis)


def _nan_blocks(t: MXTensor) -> jax.Array:
    return _scale_bytes(t) == jnp.uint8(t.format.scale.nan_code)


def _with_nan_blocks(t: MXTensor, bad: jax.Array, data: jax.Array, sbytes=None) -> MXTensor:
    """Gives the blocks flagged ``bad`` the NaN scale and zero codes (the invariant)."""
    sbytes = _scale_bytes(t) if sbytes is None else sbytes
    sbytes = jnp.where(bad, jnp.uint8(t.format.scale.nan_code), sbytes)
    data = _move(data, lambda a: jnp.where(_to_data(bad, t), jnp.zeros((), a.dtype), a))
    return _replace(t, data=data, scale=_scale_from_bytes(sbytes, t))


def _sign_op(t: MXTensor, op: str) -> MXTensor:
    elem = t.format.element
    if elem.kind == "int":
        return _via_unpacked(t, lambda u: _int_sign_op(u, op))
    if t.packed and not _block_aligned(t) and op == "neg":
        return _via_unpacked(t, lambda u: _sign_op(u, op))
    if t.packed:
        sign = jnp.asarray(_byte_pattern(t, elem.sign_bit))
        if op == "abs":
            return _replace(t, data=t.data & ~sign)
        # NaN blocks keep their (zero) codes.
        flip = jnp.where(_to_data(_nan_blocks(t), t), jnp.uint8(0), sign)
        return _replace(t, data=t.data ^ flip)
    raw = storage_to_raw(t.data, elem)
    sign = raw.dtype.type(elem.sign_bit)
    if op == "abs":
        raw = raw & ~sign
    else:
        raw = raw ^ jnp.where(_to_data(_nan_blocks(t), t), raw.dtype.type(0), sign)
    return _replace(t, data=raw_to_storage(raw, elem))


def _int_sign_op(t: MXTensor, op: str) -> MXTensor:
    elem = t.format.element
    c = t.data.astype(jnp.int32)
    out = (-c if op == "neg" else jnp.abs(c)).astype(t.data.dtype)
    # -(-2^(bits-1)) has no code: that block becomes NaN rather than a wrong number.
    bad = _per_block_any(c == -elem.sign_bit, t)
    return _with_nan_blocks(t, bad, out)


def negative(t: MXTensor) -> MXTensor:
    """``-t``: flips the sign of every code; scales are unchanged.

    Float codes flip their sign bit (FP8, FP6 in bit 5 of a byte, FP4 in bit
    3, packed or not); MXINT codes are negated as integers. Exact, with two
    caveats (see the module docstring): MXINT has no -0, and an MXINT block
    holding the code -2^(bits-1) (never written by :func:`jaxmx.quantize`)
    becomes NaN. NaN blocks stay NaN.

    >>> import jax.numpy as jnp, jaxmx
    >>> t = jaxmx.quantize(jnp.array([1.0, -1.5, 0.0, 6.0]), "mxfp4", block_size=4)
    >>> jaxmx.dequantize(-t)
    Array([-1. ,  1.5, -0. , -6. ], dtype=float32)
    """
    return _sign_op(_tensor(t, "negative"), "neg")


def absolute(t: MXTensor) -> MXTensor:
    """``abs(t)``: clears the sign of every code; scales are unchanged.

    Same rules as :func:`negative` (an MXINT block holding -2^(bits-1)
    becomes NaN). ``abs`` of an FP8 NaN code is NaN, of E5M2 -Inf is +Inf.

    >>> import jax.numpy as jnp, jaxmx
    >>> t = jaxmx.quantize(jnp.array([1.0, -2.5, -0.0, -6.0]), "mxint8", block_size=4)
    >>> jaxmx.dequantize(abs(t))
    Array([1. , 2.5, 0. , 6. ], dtype=float32)
    """
    return _sign_op(_tensor(t, "absolute"), "abs")


def ldexp(t: MXTensor, k: jax.typing.ArrayLike) -> MXTensor:
    """``t * 2**k`` exactly: every block's scale exponent moves by ``k``, codes do not.

    Args:
      t: the tensor.
      k: an integer exponent: a Python int, or an integer scalar array (may
        be traced).

    Every value of a block is the block's scale times a code, so adding
    ``k`` to the exponent multiplies each value by exactly 2^k. Where the new
    exponent leaves the scale format's range (E8M0: [-127, 127]), no scale
    can hold the result exactly, so:

    * a Python ``k`` so large that every nonzero block would leave the range
      (``|k| > 254`` for E8M0) is refused with a ValueError;
    * otherwise it depends on the data: a nonzero block whose exponent would
      leave the range gets the NaN scale (and zero codes), never a clamped,
      wrong value. Blocks whose codes are all zero keep their scale (zero
      times anything is zero), and NaN blocks stay NaN.

    >>> import jax.numpy as jnp, jaxmx
    >>> t = jaxmx.quantize(jnp.array([1.0, -1.5, 0.0, 6.0]), "mxfp4", block_size=4)
    >>> jaxmx.dequantize(jaxmx.ldexp(t, -3))
    Array([ 0.125 , -0.1875,  0.    ,  0.75  ], dtype=float32)
    """
    t = _tensor(t, "ldexp")
    sf = t.format.scale
    span = sf.max_exponent - sf.min_exponent
    if isinstance(k, (bool, np.bool_)):
        raise TypeError(f"ldexp exponent must be an integer, got {k!r}")
    if isinstance(k, (int, np.integer)):
        k = int(k)
        if abs(k) > span:
            raise ValueError(
                f"ldexp by 2^{k} moves every nonzero block of {_where(t)} out of the "
                f"{sf.name} scale range 2^{sf.min_exponent}..2^{sf.max_exponent}; allowed: "
                f"|k| <= {span} (dequantize first for a float result)"
            )
        if k == 0:
            return t
    else:
        k = jnp.asarray(k)
        if k.ndim != 0 or not jnp.issubdtype(k.dtype, jnp.integer):
            raise TypeError(
                f"ldexp exponent must be an integer scalar, got shape {k.shape} dtype {k.dtype}"
            )
    return _via_unpacked(t, lambda u: _ldexp(u, k)) if not _block_aligned(t) else _ldexp(t, k)


def _ldexp(t: MXTensor, k) -> MXTensor:
    elem, sf = t.format.element, t.format.scale
    value_bits = elem.sign_bit - 1 if elem.kind == "float" else (1 << elem.bits) - 1
    if t.packed:
        nonzero = (t.data & jnp.asarray(_byte_pattern(t, value_bits))) != 0
    else:
        nonzero = (storage_to_raw(t.data, elem) & value_bits) != 0
    live = _per_block_any(nonzero, t)
    biased = _scale_bytes(t).astype(jnp.int32)
    nan = biased == sf.nan_code
    e = biased - sf.bias + k
    out = (e < sf.min_exponent) | (e > sf.max_exponent)
    moved = jnp.where(live & ~nan & ~out, e + sf.bias, biased)
    return _with_nan_blocks(t, live & ~nan & out, t.data, moved.astype(jnp.uint8))


def _pow2(c) -> int | None:
    """``k`` with ``c == 2**k`` for a concrete positive power of two, else None."""
    m, e = math.frexp(c)
    return e - 1 if m == 0.5 else None


def multiply(t: MXTensor, c) -> MXTensor:
    """``t * c`` for a concrete ``c = +-2**k``: :func:`ldexp` (and a sign flip for c < 0).

    Any other factor would need new codes, and a traced factor cannot be
    checked, so both raise; use :func:`ldexp` with a traced integer
    exponent, or dequantize first.

    >>> import jax.numpy as jnp, jaxmx
    >>> t = jaxmx.quantize(jnp.array([1.0, -1.5, 0.0, 6.0]), "mxfp4", block_size=4)
    >>> jaxmx.dequantize(t * -0.5)
    Array([-0.5 ,  0.75, -0.  , -3.  ], dtype=float32)
    """
    t = _tensor(t, "multiply")
    if isinstance(c, MXTensor):
        raise TypeError(
            "multiplying two MXTensors element by element does not keep the codes; "
            "dequantize them (or use jaxmx.dot_general/einsum for products that contract)"
        )
    if isinstance(c, (jax.core.Tracer, bool, np.bool_)) or getattr(c, "shape", ()) != ():
        raise TypeError(
            f"an MXTensor can be multiplied only by a concrete scalar power of two (+-2**k); "
            f"got {type(c).__name__}{getattr(c, 'shape', '')}. For a traced power of two use "
            "t.ldexp(k) with an integer k"
        )
    try:
        v = float(c)
    except (TypeError, ValueError):
        raise TypeError(
            f"an MXTensor can be multiplied only by a scalar power of two (+-2**k), got "
            f"{type(c).__name__}{getattr(c, 'shape', '')}; dequantize first"
        ) from None
    k = _pow2(abs(v)) if math.isfinite(v) and v != 0 else None
    if k is None:
        raise ValueError(
            f"multiplying {_where(t)} by {c!r} does not commute with block quantization (the "
            "codes would need rounding); allowed: +-2**k, which moves the scales only. "
            "Dequantize first to multiply by anything else"
        )
    out = ldexp(t, k)
    return negative(out) if v < 0 else out


# --------------------------------------------------------------------------
# dtype.
# --------------------------------------------------------------------------


def astype(t: MXTensor, dtype) -> MXTensor:
    """The same codes and scales, dequantizing to ``dtype`` (``t.dtype``).

    ``t.dtype`` is the float dtype the tensor stands for: what
    :meth:`MXTensor.dequantize` returns and what jaxmx's matmuls take the
    operand as. Changing it touches no code; the rounding to bfloat16 or
    float16, if any, happens when the tensor is dequantized.

    Converting to another MX format is not an ``astype``: it chooses new
    scales and rounds, so it is refused here; write
    ``jaxmx.quantize(t.dequantize(jnp.float32), fmt, ...)`` to requantize,
    with the scale rule and rounding in view.

    Args:
      t: the tensor.
      dtype: float32, bfloat16 or float16.

    >>> import jax.numpy as jnp, jaxmx
    >>> t = jaxmx.quantize(jnp.array([1.0, 2.5]), "mxfp8").astype(jnp.bfloat16)
    >>> t.dtype, t.dequantize()
    (dtype(bfloat16), Array([1, 2.5], dtype=bfloat16))
    """
    t = _tensor(t, "astype")
    if (isinstance(dtype, str) and _is_format_name(dtype)) or not _is_dtype_like(dtype):
        raise TypeError(
            f"MXTensor.astype({dtype!r}): converting to another MX format chooses new scales "
            "and rounds, so astype does not do it; requantize explicitly with "
            "jaxmx.quantize(t.dequantize(jnp.float32), fmt, ...). astype allows float32, "
            "bfloat16 or float16 (the dtype dequantize returns)"
        )
    dt = np.dtype(dtype)
    if not any(dt == d for d in _OUT_DTYPES):
        raise TypeError(
            f"MXTensor.astype({dt}): an MXTensor dequantizes to float32, bfloat16 or "
            "float16 only; dequantize first for other dtypes"
        )
    return _replace(t, dtype=dt)


def _is_format_name(s: str) -> bool:
    from jaxmx.formats import list_formats

    return s.lower() in list_formats(aliases=True)


def _is_dtype_like(d) -> bool:
    from jaxmx.formats import MXFormat

    if isinstance(d, MXFormat) or d is None:
        return False
    try:
        np.dtype(d)
    except TypeError:
        return False
    return True
