"""NVFP4 (TransformerEngine's chain) as Pallas kernel bodies: one row is one block of 16.

The chain of :mod:`jaxmx.families.nvfp4`, every step one IEEE float32
operation rounded to nearest even::

    S_enc = min(2688 / amax, FLT_MAX)  (1 if amax or S_enc is 0)   -- per tensor, in XLA
    s8    = e4m3(min(block_amax * (S_enc * f32(1/6)), 448))        -- per row, in the kernel
    dec   = s8 * (1 / S_enc);  enc = min(1 / dec, FLT_MAX)
    code  = e2m1(|x| * enc), the sign in bit 3; a NaN block's codes are signed zeros

The tensor scale needs the amax of the whole tensor, so it is computed
before the kernel (from ``tensor_amax`` when given, else from one reduction
over ``x``) and passed in as two float32 patterns. Inside the kernel every
float32 operation is the exact integer form of :mod:`jaxmx.families._f32`,
so no backend's flushing of subnormals (TPUs flush, XLA:CPU flushes) can
change a bit; the family takes a float fast path where it is provably the
same, which the tests check.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import DTypeLike

from jaxmx import numerics
from jaxmx.families import _f32 as f32
from jaxmx.formats import FP4_E2M1, FP8_E4M3
from jaxmx.numerics import u32
from jaxmx.pallas import _bits
from jaxmx.spec import QuantSpec

ONE = 0x3F800000  # 1.0
ONE_SIXTH = 0x3E2AAAAB  # f32(1) / f32(6)
RANGE = 0x45280000  # 2688.0 = 448 * 6
E4M3_MAX = 0x43E00000  # 448.0
E4M3_NAN = 0x7F


def _min_bits(v: jax.Array, cap: int) -> jax.Array:
    """``min(v, cap)`` of float32 patterns, ``cap > 0``; NaN and negatives pass."""
    m = v & u32(f32.ABS)
    return jnp.where((v < u32(f32.SIGN)) & (m > u32(cap)) & (m <= u32(f32.INF)), u32(cap), v)


def tensor_scales(x: jax.Array, tensor_amax: jax.Array | None) -> list[jax.Array]:
    """Two ``(1, 1)`` uint32 arrays: the patterns of ``S_enc * f32(1/6)`` and ``1 / S_enc``."""
    if tensor_amax is None:
        amax = jnp.max(f32.bits(x) & u32(f32.ABS), initial=u32(0))
    else:
        amax = f32.bits(tensor_amax) & u32(f32.ABS)
    s_enc = _min_bits(f32.div(u32(RANGE), amax), f32.FLT_MAX)
    degenerate = ((amax & u32(f32.ABS)) == 0) | ((s_enc & u32(f32.ABS)) == 0)
    s_enc = jnp.where(degenerate, u32(ONE), s_enc)
    factor = f32.mul(s_enc, u32(ONE_SIXTH))
    s_dec = f32.div(u32(ONE), s_enc)
    return [factor.reshape(1, 1), s_dec.reshape(1, 1)]


def _e4m3(v: jax.Array) -> jax.Array:
    """Round-to-nearest-even E4M3 bytes of float32 patterns ``|v| <= 448``; NaN -> 0x7F."""
    m = v & u32(f32.ABS)
    nan = m > u32(f32.INF)
    code = numerics.encode_magnitude(jnp.where(nan, u32(0), m), 0, FP8_E4M3)
    code = jnp.where(nan, u32(E4M3_NAN), code)
    return code | lax.shift_right_logical(v & u32(f32.SIGN), u32(24))


def _e4m3_value(s8: jax.Array) -> jax.Array:
    """float32 patterns of E4M3 bytes ``s8`` (0x7F/0xFF: the quiet NaN, signed)."""
    m = s8 & u32(0x7F)
    out = numerics.decode_magnitude(jnp.where(m == E4M3_NAN, u32(0), m), 0, FP8_E4M3)
    out = jnp.where(m == E4M3_NAN, u32(0x7FC00000), out)
    return out | lax.shift_left(s8 & u32(0x80), u32(24))


def _elements(
    spec: QuantSpec,
    bits: jax.Array,
    tensor: Sequence[jax.Array],
    rbits: jax.Array | None,
    axis: int,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(sign, code magnitude, s8, dec)`` of float32 patterns blocked along ``axis``;
    s8 and dec per block (``axis`` of length 1)."""
    sign = lax.shift_right_logical(bits, u32(31))
    mag = bits & u32(f32.ABS)
    factor, s_dec = tensor  # tensor_scales' two patterns, each of one element
    amax = jnp.max(mag.astype(jnp.int32), axis=axis, keepdims=True).astype(jnp.uint32)
    s8 = _e4m3(_min_bits(f32.mul(amax, factor), E4M3_MAX))
    dec = f32.mul(_e4m3_value(s8), s_dec)
    enc = _min_bits(f32.div(u32(ONE), dec), f32.FLT_MAX)
    p = f32.mul(mag, jnp.broadcast_to(enc, mag.shape))
    # Saturates at 6 (an Inf element too); ties go to the even code.
    # QuantSpec.make checked the rounding against numerics.ROUNDINGS.
    rounding = cast(numerics.Rounding, spec.rounding)
    code = numerics.encode_magnitude(p, 0, FP4_E2M1, rounding, rbits)
    return sign, code, s8, dec


def quantize_tile(
    spec: QuantSpec,
    bits: jax.Array,
    tensor: Sequence[jax.Array],
    rbits: jax.Array | None,
    axis: int,
) -> tuple[jax.Array, jax.Array]:
    """E2M1 codes (uint8, sign in bit 3) and E4M3 scale bytes (``axis`` of length 1) of
    float32 patterns ``bits`` blocked along ``axis``; ``tensor``: :func:`tensor_scales`."""
    sign, code, s8, _ = _elements(spec, bits, tensor, rbits, axis)
    nan_block = (s8 & u32(0x7F)) == u32(E4M3_NAN)
    code = jnp.where(nan_block, u32(0), code)
    return (code | lax.shift_left(sign, u32(3))).astype(jnp.uint8), s8.astype(jnp.uint8)


def quantize_body(
    spec: QuantSpec,
    dtype: DTypeLike,
    x_ref: jax.Ref,
    f_ref: jax.Ref,
    d_ref: jax.Ref,
    *refs: jax.Ref,
) -> None:
    """Writes a tile's E2M1 codes (uint8, sign in bit 3) and E4M3 scale bytes."""
    # The random bits' rows come before the outputs when the rounding draws them.
    rbits = refs[0][...] if len(refs) == 3 else None
    c_ref, s_ref = refs[-2:]
    bits = _bits.f32_bits(x_ref[...], dtype)
    c_ref[...], s_ref[...] = quantize_tile(spec, bits, (f_ref[...], d_ref[...]), rbits, -1)


def fake_quantize_body(
    spec: QuantSpec,
    dtype: DTypeLike,
    x_ref: jax.Ref,
    f_ref: jax.Ref,
    d_ref: jax.Ref,
    *refs: jax.Ref,
) -> None:
    """Writes ``E2M1(code) * dec`` as the bits of ``dtype`` (NaN blocks: NaN)."""
    rbits = refs[0][...] if len(refs) == 2 else None
    o_ref = refs[-1]
    bits = _bits.f32_bits(x_ref[...], dtype)
    sign, code, _, dec = _elements(spec, bits, (f_ref[...], d_ref[...]), rbits, -1)
    value = numerics.decode_magnitude(code, 0, FP4_E2M1) | lax.shift_left(sign, u32(31))
    out = f32.mul(value, jnp.broadcast_to(dec, value.shape))
    # Every NaN is the one quiet NaN: the family's float and integer forms
    # give NaNs of different signs here (the sign of whichever operand the
    # multiply returns), so no bit pattern of theirs is worth copying.
    nan = (out & u32(f32.ABS)) > u32(f32.INF)
    out = jnp.where(nan, u32(0x7FC00000), out)
    o_ref[...] = _bits.narrow(out, dtype)


def supported(spec: QuantSpec) -> str | None:
    """Why the kernel cannot take ``spec``, or None."""
    if spec.tiles:
        return (
            f"NVFP4's Pallas kernel takes blocks along one axis (block_size=16), not 2-D "
            f"tiles; got block_size={spec.block_size!r}"
        )
    return None
