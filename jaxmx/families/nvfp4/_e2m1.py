"""NVFP4's element step: scaled magnitudes rounded to E2M1, codes, and decoded values.

Everything here is elementwise on float32 bit patterns (uint32): a scaled
magnitude rounds to the nearest E2M1 value with ties to the even code (or
stochastically, given random bits), saturating at 6; the value pattern
becomes the 3-bit code magnitude and the sign goes into bit 3; a signed
E2M1 value times a block's decode factor is the dequantized element.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxmx import numerics
from jaxmx.families import _f32 as f32
from jaxmx.families.nvfp4 import _scales
from jaxmx.formats import FP4_E2M1
from jaxmx.numerics import u32


def round_e2m1(p: jax.Array) -> jax.Array:
    """float32 pattern of the E2M1 value nearest to magnitude ``p`` (ties to even), <= 6.

    Adding and subtracting ``1.5 * 2^(23 + s)`` rounds to a multiple of
    ``2^s`` in the hardware's round-to-nearest-even; ``2^s`` is E2M1's
    spacing in p's binade (0.5 below 2, 1 in [2, 4), 2 from 4 on), and an
    even multiple is the even code at every midpoint (0.25 -> 0, 0.75 -> 1,
    1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4). A subnormal ``p``
    (read as 0) and every ``p`` below 0.25 give 0.
    """
    field = jnp.minimum(lax.shift_right_logical(p, u32(23)), u32(130))  # p >= 8 saturates
    magic = f32.from_bits(
        lax.shift_left(jnp.maximum(field + u32(22), u32(149)), u32(23)) | u32(0x00400000)
    )
    r = (f32.from_bits(p) + magic) - magic
    return f32.bits(jnp.minimum(r, jnp.float32(6.0)))


def code_of(r: jax.Array) -> jax.Array:
    """E2M1 value pattern -> code magnitude: 0, 0.5 -> 0, 1; ``2^k (1 + m/2)`` -> ``2k + 2 + m``."""
    return jnp.where(
        r >= u32(_scales.ONE),
        lax.shift_right_logical(r, u32(22)) - u32(252),
        jnp.where(r == u32(0x3F000000), u32(1), u32(0)),
    )


def value_of(codes: jax.Array) -> jax.Array:
    """Signed float32 value patterns of uint32 E2M1 codes (sign in bit 3)."""
    c = codes & u32(7)
    v = jnp.where(c >= 2, lax.shift_left(c + u32(252), u32(22)), c * u32(0x3F000000))
    return v | lax.shift_left(codes & u32(8), u32(28))


def round_(p: jax.Array, rbits: jax.Array | None) -> jax.Array:
    """E2M1 value pattern of magnitude ``p``: nearest even, or stochastic given ``rbits``.

    Stochastic: up to the next E2M1 value with probability equal to the
    fraction of the step below it, saturating at 6 (p >= 6 gives 6).
    """
    if rbits is None:
        return round_e2m1(p)
    return numerics.round_magnitude(p, 0, FP4_E2M1, "stochastic", rbits)


def codes(xb: jax.Array, enc: jax.Array, nan_block: jax.Array, rbits=None) -> jax.Array:
    """uint8 E2M1 codes of the elements (blocked layout); NaN blocks get signed zero codes."""
    c = code_of(round_(_scales.scaled_magnitude(xb & u32(f32.ABS), enc), rbits))
    c = jnp.where(nan_block, u32(0), c)
    return (c | lax.shift_right_logical(xb & u32(f32.SIGN), u32(28))).astype(jnp.uint8)


def values(v: jax.Array, dec: jax.Array, exact: bool) -> jax.Array:
    """float32 patterns of ``v * dec`` (v: signed E2M1 value patterns)."""
    return f32.mul(v, dec) if exact else _scales.fmul(v, dec)
