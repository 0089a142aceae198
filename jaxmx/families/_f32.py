"""Exact IEEE float32 multiply and divide on bit patterns, subnormals included.

XLA on CPU runs float32 arithmetic with flush-to-zero and
denormals-are-zero: a subnormal operand counts as 0 (even in ``max``) and a
subnormal result becomes 0. The scale chains of NVFP4 and per-tensor FP8
are defined as float32 operations that do reach subnormals at the extremes
(``1 / S_enc`` of a tiny tensor, a block of subnormal inputs under a huge
encode scale), so where a result can depend on them jaxmx computes the
IEEE result with integer operations:

* :func:`mul` and :func:`div` return the correctly rounded (nearest even)
  float32 result of ``a * b`` and ``a / b``, as IEEE 754 defines it with
  gradual underflow: the significands are multiplied (or divided) exactly in
  32-bit integers and :func:`round_pack` rounds once. Specials follow IEEE
  (``0 * Inf`` and ``0 / 0`` are NaN, ``x / 0`` is Inf); a NaN operand is
  returned quieted (the first one), an invalid operation gives x86's default
  NaN ``0xFFC00000``, which is what the NumPy reference models compute.

Everything is elementwise on uint32 arrays and costs a few dozen integer
operations per element, so the callers use it for per-block and per-tensor
quantities and for rare per-element fallbacks, never on the fast path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxmx import numerics
from jaxmx.numerics import u32

__all__ = ["bits", "div", "from_bits", "mul", "round_pack"]

SIGN = 0x80000000
ABS = 0x7FFFFFFF
INF = 0x7F800000
QUIET = 0x00400000
DEFAULT_NAN = 0xFFC00000  # x86's result of an invalid operation (0 * Inf, 0 / 0)
FLT_MAX = 0x7F7FFFFF  # 0x1.fffffep127
_IMPLICIT = 0x00800000


def bits(x) -> jax.Array:
    """uint32 bit pattern of a float32 array (float16/bfloat16 widen exactly)."""
    return numerics.f32_to_bits(jnp.asarray(x))


from_bits = numerics.bits_to_f32  # float32 array of uint32 patterns


def _unpack(mag: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Finite nonzero magnitude -> ``(sig, t)`` with value ``sig * 2**t``, ``2**23 <= sig < 2**24``.

    Subnormals are normalized with a count of leading zeros. Zero gives
    garbage that callers replace.
    """
    normal = mag >= u32(_IMPLICIT)
    shift = lax.clz(mag).astype(jnp.int32) - 8  # subnormals: moves the leading bit to bit 23
    shift = jnp.clip(shift, 0, 31)
    sig_sub = lax.shift_left(mag, shift.astype(jnp.uint32))
    sig = jnp.where(normal, (mag & u32(0x007FFFFF)) | u32(_IMPLICIT), sig_sub)
    t = jnp.where(
        normal, lax.shift_right_logical(mag, u32(23)).astype(jnp.int32) - 150, -149 - shift
    )
    return sig, t


def round_pack(q: jax.Array, sticky: jax.Array, t: jax.Array) -> jax.Array:
    """float32 magnitude pattern of ``(q + f) * 2**t`` rounded to nearest even.

    Args:
      q: uint32 integer part, ``0 <= q < 2**31``.
      sticky: bool, whether the dropped fraction ``f`` (``0 <= f < 1``) is
        nonzero. Where it may be, ``q`` must carry at least two bits below
        float32's precision (``q >= 2**25``), so ``f`` only breaks ties.
      t: int32 exponent.

    Returns:
      uint32 patterns; results below the smallest subnormal round to 0 (ties
      to even), results beyond FLT_MAX become Inf.
    """
    t = jnp.asarray(t, jnp.int32)
    lead = 31 - lax.clz(q).astype(jnp.int32)  # floor(log2 q)
    u = jnp.maximum(lead + t - 23, -149)  # exponent of the result's ulp
    s = u - t  # bits to drop (negative: the value is exact, shift up)
    sr = jnp.clip(s, 1, 31).astype(jnp.uint32)
    kept = lax.shift_right_logical(q, sr)
    rem = q & (lax.shift_left(u32(1), sr) - u32(1))
    half = lax.shift_left(u32(1), sr - u32(1))
    up = (rem > half) | ((rem == half) & (sticky | ((kept & u32(1)) == 1)))
    rounded = kept + up.astype(jnp.uint32)
    exact = lax.shift_left(q, jnp.clip(-s, 0, 31).astype(jnp.uint32))
    r = jnp.where(s <= 0, exact, jnp.where(s >= 32, u32(0), rounded))
    # Biased exponent minus one, shifted, plus a significand in [2^23, 2^24]
    # gives the pattern (a carry to 2^24 moves to the next binade); the same
    # sum with exponent 0 is the subnormal pattern.
    field = jnp.minimum(u + 149, 255).astype(jnp.uint32)
    out = lax.shift_left(field, u32(23)) + r
    out = jnp.minimum(out, u32(INF))
    return jnp.where(q == 0, u32(0), out)


def _nan_of(a: jax.Array, b: jax.Array, ma: jax.Array, mb: jax.Array) -> jax.Array:
    # The first NaN operand, quieted; otherwise (an invalid operation) the default NaN.
    return jnp.where(
        ma > u32(INF),
        a | u32(QUIET),
        jnp.where(mb > u32(INF), b | u32(QUIET), u32(DEFAULT_NAN)),
    )


def mul(a: jax.Array, b: jax.Array) -> jax.Array:
    """float32 pattern of ``a * b`` (uint32 patterns in), IEEE round to nearest even."""
    a, b = u32(a), u32(b)
    ma, mb = a & u32(ABS), b & u32(ABS)
    sign = (a ^ b) & u32(SIGN)
    sa, ta = _unpack(ma)
    sb, tb = _unpack(mb)
    # 24 x 24 -> 48-bit product from 12-bit halves: N = H * 2^24 + x1.
    ah, al = lax.shift_right_logical(sa, u32(12)), sa & u32(0xFFF)
    bh, bl = lax.shift_right_logical(sb, u32(12)), sb & u32(0xFFF)
    mid = ah * bl + al * bh  # < 2^25
    x1 = al * bl + lax.shift_left(mid & u32(0xFFF), u32(12))  # < 2^25
    h = ah * bh + lax.shift_right_logical(mid, u32(12))
    q = lax.shift_left(h, u32(7)) + lax.shift_right_logical(x1, u32(17))  # N >> 17
    sticky = (x1 & u32((1 << 17) - 1)) != 0
    out = round_pack(q, sticky, ta + tb + 17)
    a_inf, b_inf = ma == u32(INF), mb == u32(INF)
    a_zero, b_zero = ma == 0, mb == 0
    out = jnp.where(a_inf | b_inf, u32(INF), jnp.where(a_zero | b_zero, u32(0), out))
    out = out | sign
    nan = (ma > u32(INF)) | (mb > u32(INF)) | (a_inf & b_zero) | (b_inf & a_zero)
    return jnp.where(nan, _nan_of(a, b, ma, mb), out)


def div(a: jax.Array, b: jax.Array) -> jax.Array:
    """float32 pattern of ``a / b`` (uint32 patterns in), IEEE round to nearest even."""
    a, b = u32(a), u32(b)
    ma, mb = a & u32(ABS), b & u32(ABS)
    sign = (a ^ b) & u32(SIGN)
    sa, ta = _unpack(ma)
    sb, tb = _unpack(mb)
    # Q = floor(sa * 2^29 / sb) in (2^28, 2^30): a float estimate, then the
    # remainder computed modulo 2^32 (it is small, so the wrap is exact)
    # corrects it.
    fa = sa.astype(jnp.int32).astype(jnp.float32)
    fb = sb.astype(jnp.int32).astype(jnp.float32)
    q0 = (fa / fb * jnp.float32(2.0**29)).astype(jnp.int32)
    r0 = lax.bitcast_convert_type(
        lax.shift_left(sa, u32(29)) - q0.astype(jnp.uint32) * sb, jnp.int32
    )
    dq = jnp.floor(r0.astype(jnp.float32) / fb).astype(jnp.int32)
    sbi = sb.astype(jnp.int32)
    q1, r1 = q0 + dq, r0 - dq * sbi
    low = r1 < 0
    q1, r1 = jnp.where(low, q1 - 1, q1), jnp.where(low, r1 + sbi, r1)
    high = r1 >= sbi
    q1, r1 = jnp.where(high, q1 + 1, q1), jnp.where(high, r1 - sbi, r1)
    out = round_pack(q1.astype(jnp.uint32), r1 != 0, ta - tb - 29)
    a_inf, b_inf = ma == u32(INF), mb == u32(INF)
    a_zero, b_zero = ma == 0, mb == 0
    out = jnp.where(a_inf | b_zero, u32(INF), jnp.where(a_zero | b_inf, u32(0), out))
    out = out | sign
    nan = (ma > u32(INF)) | (mb > u32(INF)) | (a_zero & b_zero) | (a_inf & b_inf)
    return jnp.where(nan, _nan_of(a, b, ma, mb), out)


def hw_div(a: jax.Array, b: jax.Array) -> jax.Array:
    """float32 pattern of ``a / b`` by the hardware division, correctly rounded.

    For normal operands and results (subnormals read as 0 on XLA:CPU; use
    :func:`div` for those). XLA's algebraic simplifier rewrites a division
    by a broadcast divisor (a scalar, or one value per block) into a
    multiplication by its reciprocal, which rounds twice and is off by one
    ulp for about a third of the quotients; the divisor is materialized
    behind an optimization barrier so that the division stays a division.
    """
    shape = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b))
    if jnp.shape(b) != shape:
        b = lax.optimization_barrier(jnp.broadcast_to(b, shape))
    return bits(from_bits(a) / from_bits(b))
