"""Float bit patterns in and out of a kernel, by integer arithmetic only.

Kernels take their input as bit patterns (float32 as uint32, bfloat16 and
float16 as uint16: the bitcasts outside are free) and write fake-quantized
values the same way, so no float conversion runs inside a kernel: Mosaic and
Triton lower integer operations alike on every generation, and none of them
can flush a subnormal. Each function gives the same bits as the conversion
XLA performs in :mod:`jaxmx.numerics` (``f32_to_bits``, ``bits_to_dtype``);
``tests/test_pallas.py`` compares them on every 16-bit pattern.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import DTypeLike

from jaxmx.numerics import u32

# The dtype a kernel receives for each input dtype (its bits).
CARRIER: dict[np.dtype, np.dtype] = {
    np.dtype(jnp.float32): np.dtype(np.uint32),
    np.dtype(jnp.bfloat16): np.dtype(np.uint16),
    np.dtype(jnp.float16): np.dtype(np.uint16),
}


def to_carrier(x: jax.Array) -> jax.Array:
    """``x`` as the unsigned integers of its bits (a free bitcast)."""
    return lax.bitcast_convert_type(x, CARRIER[np.dtype(x.dtype)])


def from_carrier(a: jax.Array, dtype: DTypeLike) -> jax.Array:
    """The values of ``dtype`` whose bits are ``a`` (a free bitcast)."""
    return lax.bitcast_convert_type(a, dtype)


def f32_bits(v: jax.Array, dtype: DTypeLike) -> jax.Array:
    """float32 pattern (uint32) of the value whose ``dtype`` bits are ``v``."""
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return v
    h = v.astype(jnp.uint32)
    if dtype == jnp.bfloat16:
        return lax.shift_left(h, u32(16))
    # float16: 5 exponent bits (bias 15), 10 fraction bits.
    sign = lax.shift_left(lax.shift_right_logical(h, u32(15)), u32(31))
    e = lax.shift_right_logical(h, u32(10)) & u32(0x1F)
    m = h & u32(0x3FF)
    normal = lax.shift_left(e + u32(112), u32(23)) | lax.shift_left(m, u32(13))
    special = u32(0x7F800000) | lax.shift_left(m, u32(13))
    # A subnormal is m * 2^-24, a normal float32: convert m exactly, then
    # lower the exponent by 24.
    as_float = lax.bitcast_convert_type(m.astype(jnp.int32).astype(jnp.float32), jnp.uint32)
    sub = jnp.where(m == 0, u32(0), as_float - u32(24 << 23))
    mag = jnp.where(e == 0, sub, jnp.where(e == 0x1F, special, normal))
    return sign | mag


def narrow(bits: jax.Array, dtype: DTypeLike) -> jax.Array:
    """float32 patterns -> the carrier of ``dtype``, rounded to nearest even.

    NaN stays NaN, quieted, with its sign and top payload bits (what a
    float convert does); values beyond the range become Inf.
    """
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return bits
    mag = bits & u32(0x7FFFFFFF)
    nan = mag > u32(0x7F800000)
    if dtype == jnp.bfloat16:
        lsb = lax.shift_right_logical(bits, u32(16)) & u32(1)
        rounded = lax.shift_right_logical(bits + u32(0x7FFF) + lsb, u32(16))
        quiet = lax.shift_right_logical(bits, u32(16)) | u32(0x40)
        return jnp.where(nan, quiet, rounded).astype(jnp.uint16)
    sign = lax.shift_right_logical(bits, u32(16)) & u32(0x8000)
    e32 = lax.shift_right_logical(mag, u32(23)).astype(jnp.int32) - 127
    # Normal float16 (e32 >= -14): drop 13 fraction bits, nearest even; a
    # carry moves to the next binade, and past 65504 the pattern is Inf's.
    lsb = lax.shift_right_logical(mag, u32(13)) & u32(1)
    rounded = lax.shift_right_logical(mag + u32(0xFFF) + lsb, u32(13)) - u32(112 << 10)
    normal = jnp.minimum(rounded, u32(0x7C00))
    # Subnormal float16: the value in units of 2^-24 is sig * 2^(e32 + 1).
    sig = (mag & u32(0x7FFFFF)) | u32(0x800000)
    shift = jnp.clip(-e32 - 1, 1, 31).astype(jnp.uint32)
    half = lax.shift_left(u32(1), shift - u32(1))
    odd = lax.shift_right_logical(sig, shift) & u32(1)
    sub = lax.shift_right_logical(sig + half - u32(1) + odd, shift)
    sub = jnp.where(e32 < -25, u32(0), sub)  # below half the smallest subnormal
    out = jnp.where(e32 >= -14, normal, sub)
    out = jnp.where(mag >= u32(0x7F800000), u32(0x7C00), out)
    quiet = u32(0x7E00) | (lax.shift_right_logical(mag, u32(13)) & u32(0x3FF))
    out = jnp.where(nan, quiet, out)
    return (sign | out).astype(jnp.uint16)
