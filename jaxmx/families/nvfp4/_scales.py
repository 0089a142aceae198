"""NVFP4's scales: the tensor scale and the E4M3 block scales, as float32 patterns.

A :class:`ScaleRule` turns the block maxima of ``|x|`` (and the tensor amax)
into a :class:`TensorScales` and then, per block, a :class:`BlockScales`:
the E4M3 scale byte and the float32 encode and decode factors the element
step uses. :data:`TE` is TransformerEngine's chain (the only rule the package
uses; :data:`TE_4OVER6` is the same chain under Four Over Six's tensor
range); a rule is hashable, part of a kernel's static spec, so another
rounding of the scales (the tests model torchao's this way) runs through the
same kernels. Also here: the E4M3 rounding of a float32 pattern, in an exact
integer form and a float form; TE's decode from the amax; and the helpers
that read the block maxima (:func:`prepare`) and pick the float or the exact
integer form of the chain per tensor (:func:`branches`).

Every step is an IEEE float32 operation. XLA:CPU flushes subnormal operands
and results, so each chain has two forms: a fast one in float arithmetic,
taken when the tensor scale keeps every per-block quantity and every decoded
value normal (which the bounds ``FAST_*`` guarantee), and an exact one on
integers (:mod:`jaxmx.families._f32`) for the rest: tensors whose amax is
below about 2^-100, and NaN amax. A ``lax.cond`` picks one per tensor.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
from jax import lax

from jaxmx import numerics
from jaxmx.families import _f32 as f32
from jaxmx.families.nvfp4 import _layout
from jaxmx.formats import FP8_E4M3
from jaxmx.numerics import u32

# float32 constants as bit patterns.
ONE = 0x3F800000  # 1.0
ONE_SIXTH = 0x3E2AAAAB  # f32(1) / f32(6) = 0.16666667163372040
RANGE = 0x45280000  # 2688.0 = 448 * 6
RANGE_4OVER6 = 0x44C00000  # 1536.0 = 256 * 6: Four Over Six's tensor scale
ONE_QUARTER = 0x3E800000  # 0.25 = f32(1) / f32(4), exact
INV_RANGE = 0x39C30C31  # f32(1) / f32(2688) = 3.7202381e-4
E4M3_MAX = 0x43E00000  # 448.0 = 0x1.Cp8, E4M3 code 0x7E
E4M3_MIN_NORMAL = 0x3C800000  # 2^-6
E4M3_NAN = 0x7F

# TE: with s_dec = 1 / S_enc >= 2^-115, every nonzero decode factor s8 * s_dec
# is >= 2^-124, so 0.5 * it is normal, and 1 / it is finite.
FAST_TE = 0x06000000  # 2^-115
# A decode factor (s8 * amax) * f32(1/2688) with amax >= 2^-100 stays normal
# with room to spare (TE's kernel formula, and rules that scale by amax).
FAST_AMAX = 0x0D800000  # 2^-100


class TensorScales(NamedTuple):
    """Per-tensor float32 patterns (uint32 scalars)."""

    tensor_scale: jax.Array  # the decode scale stored (TE: s_dec = 1 / S_enc)
    s_enc: jax.Array  # the encode scale (TE: S_enc)
    factor: jax.Array  # what a block amax is multiplied by (TE: S_enc * f32(1/6))
    amax: jax.Array  # the amax used
    fast: jax.Array  # bool: the float forms are exact for this tensor


class BlockScales(NamedTuple):
    """Per-block quantities, kept-dims block layout."""

    s8: jax.Array  # uint8 E4M3 scale bytes
    enc: jax.Array  # uint32 float32 encode factor (NaN in NaN blocks)
    dec: jax.Array  # uint32 float32 decode factor, s8 * tensor_scale


class ScaleRule(Protocol):
    """How block maxima become scales; hashable (a field of the kernels' static spec)."""

    def tensor(self, block_amax: jax.Array, tensor_amax: jax.Array | None) -> TensorScales:
        """The tensor's scales from the block maxima (patterns) or a given amax (float32)."""
        ...

    def blocks(self, block_amax: jax.Array, t: TensorScales, exact: bool) -> BlockScales:
        """Each block's scales: float forms, or with ``exact`` the integer ones."""
        ...


# --------------------------------------------------------------------------
# float32 pattern arithmetic and the E4M3 rounding.
# --------------------------------------------------------------------------


def min_bits(v: jax.Array, cap: int) -> jax.Array:
    """``min(v, cap)`` of a float32 pattern ``v``, ``cap > 0``, NaN propagating as np.minimum."""
    m = v & u32(f32.ABS)
    return jnp.where((v < u32(f32.SIGN)) & (m > u32(cap)) & (m <= u32(f32.INF)), u32(cap), v)


def e4m3(v: jax.Array) -> jax.Array:
    """Round-to-nearest-even E4M3 byte of float32 patterns with |v| <= 448; NaN -> 0x7F/0xFF."""
    m = v & u32(f32.ABS)
    nan = m > u32(f32.INF)
    code = numerics.encode_magnitude(jnp.where(nan, u32(0), m), 0, FP8_E4M3)
    code = jnp.where(nan, u32(E4M3_NAN), code)
    return (code | lax.shift_right_logical(v & u32(f32.SIGN), u32(24))).astype(jnp.uint8)


def e4m3_to_f32(s8: jax.Array) -> jax.Array:
    """float32 patterns of E4M3 bytes (NaN bytes give the quiet NaN)."""
    b = s8.astype(jnp.uint32)
    m = b & u32(0x7F)
    out = numerics.decode_magnitude(jnp.where(m == E4M3_NAN, u32(0), m), 0, FP8_E4M3)
    out = jnp.where(m == E4M3_NAN, u32(0x7FC00000), out)
    return out | lax.shift_left(b & u32(0x80), u32(24))


def e4m3_float(v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(byte, value pattern)`` of the E4M3 rounding of nonnegative patterns ``v <= 448``.

    The float form of :func:`e4m3` (same results): adding and subtracting
    ``1.5 * 2^(23 + s)`` rounds to a multiple of E4M3's spacing ``2^s`` in
    v's binade (``2^-9`` below 2^-6) with the hardware's ties-to-even. A
    subnormal pattern reads as 0 and rounds to 0, as it must (it is far
    below 2^-10). NaN gives 0x7F.
    """
    field = jnp.minimum(lax.shift_right_logical(v, u32(23)), u32(135))  # 448 < 2^9
    magic = f32.from_bits(
        lax.shift_left(jnp.maximum(field + u32(20), u32(141)), u32(23)) | u32(0x00400000)
    )
    r = f32.bits((f32.from_bits(v) + magic) - magic)
    sub = (f32.from_bits(r) * jnp.float32(512.0)).astype(jnp.int32).astype(jnp.uint32)
    byte = jnp.where(r >= u32(E4M3_MIN_NORMAL), lax.shift_right_logical(r, u32(20)) - u32(960), sub)
    nan = r > u32(f32.INF)
    return jnp.where(nan, u32(E4M3_NAN), byte).astype(jnp.uint8), r


def fmul(a, b) -> jax.Array:
    """``a * b`` of float32 patterns in float arithmetic (the fast forms)."""
    return f32.bits(f32.from_bits(a) * f32.from_bits(b))


def fdiv(a, b) -> jax.Array:
    """``a / b`` of float32 patterns, a true division (the fast forms)."""
    return f32.hw_div(a, b)


def scaled_magnitude(mag: jax.Array, enc: jax.Array) -> jax.Array:
    """float32 pattern of ``|x| * enc`` as IEEE computes it, subnormal ``|x|`` included.

    ``enc`` is a positive factor (or Inf/NaN). One float multiply; where
    ``|x|`` is a float32 subnormal (which XLA:CPU would read as 0) the
    product is formed as ``bits(|x|) * (enc * 2^-49)`` (the pattern is |x|
    in units of 2^-149, an exact integer), which rounds to the same
    significand, and moved down 100 binades on the pattern. A result that
    would be subnormal comes out as a pattern below 2^-126, below every
    rounding threshold that follows, so the code is exact.
    """
    p = fmul(mag, enc)
    enc_lo = jnp.where(
        enc >= u32(f32.INF),
        enc,
        jnp.where(enc > u32(50 << 23), enc - u32(49 << 23), u32(0)),
    )
    p_lo = f32.bits(
        lax.bitcast_convert_type(mag, jnp.int32).astype(jnp.float32) * f32.from_bits(enc_lo)
    )
    shifted = jnp.where(p_lo > u32(100 << 23), p_lo - u32(100 << 23), u32(0))
    p_lo = jnp.where(p_lo >= u32(f32.INF), p_lo, shifted)
    return jnp.where(mag < u32(0x00800000), p_lo, p)


# --------------------------------------------------------------------------
# TransformerEngine's chain.
# --------------------------------------------------------------------------


def amax_bits(block_amax: jax.Array, tensor_amax: jax.Array | None) -> jax.Array:
    """The tensor amax pattern: the given one, or the max of the block maxima."""
    if tensor_amax is None:
        # Integer max: NaN above Inf above every finite value. An empty tensor
        # has amax 0 (as TE's amax reduction starts from 0): its tensor scale
        # is then the degenerate 1, as for an all-zero tensor.
        return jnp.max(block_amax, initial=u32(0))
    return f32.bits(tensor_amax) & u32(f32.ABS)


@dataclasses.dataclass(frozen=True)
class TERule:
    """TransformerEngine's scales; ``range_bits``: the pattern of the largest scaled value.

    ``S_enc = min(range / amax, FLT_MAX)`` (1 if amax or S_enc is 0), the
    block scale ``e4m3(min(block_amax * (S_enc * f32(1/6)), 448))`` with one
    rounding for the product, ``dec = s8 * (1 / S_enc)`` and ``enc = min(1 /
    dec, FLT_MAX)``.
    """

    range_bits: int = RANGE

    def tensor(self, block_amax, tensor_amax) -> TensorScales:
        amax = amax_bits(block_amax, tensor_amax)
        s_enc = min_bits(f32.div(u32(self.range_bits), amax), f32.FLT_MAX)
        degenerate = ((amax & u32(f32.ABS)) == 0) | ((s_enc & u32(f32.ABS)) == 0)
        s_enc = jnp.where(degenerate, u32(ONE), s_enc)
        s_dec = f32.div(u32(ONE), s_enc)
        factor = f32.mul(s_enc, u32(ONE_SIXTH))
        fast = (s_dec >= u32(FAST_TE)) & (s_dec < u32(f32.INF))
        return TensorScales(s_dec, s_enc, factor, amax, fast)

    def blocks(self, block_amax, t: TensorScales, exact: bool) -> BlockScales:
        # One rounding for the product: block_amax * (S_enc * f32(1/6)), then min(., 448).
        if exact:
            s8 = e4m3(min_bits(f32.mul(block_amax, t.factor), E4M3_MAX))
            dec = f32.mul(e4m3_to_f32(s8), t.tensor_scale)
            enc = min_bits(f32.div(u32(ONE), dec), f32.FLT_MAX)
        else:
            s8, s8f = e4m3_float(min_bits(scaled_magnitude(block_amax, t.factor), E4M3_MAX))
            dec = fmul(s8f, t.tensor_scale)
            enc = min_bits(fdiv(u32(ONE), dec), f32.FLT_MAX)
        return BlockScales(s8, enc, dec)


TE = TERule()
# Four Over Six: 256 instead of 448 as the largest block scale, so that the
# scales of blocks aimed at 4 (up to 384) fit E4M3.
TE_4OVER6 = TERule(RANGE_4OVER6)


def amax_decode(s8: jax.Array, amax: jax.Array, exact: bool) -> jax.Array:
    """TE's dequantize kernel's decode factor: ``(s8 * amax) * f32(1/2688)``."""
    s8f = e4m3_to_f32(s8)
    if exact:
        return f32.mul(f32.mul(s8f, amax), u32(INV_RANGE))
    return fmul(fmul(s8f, amax), u32(INV_RANGE))


# --------------------------------------------------------------------------
# Block maxima, and the choice between the two forms.
# --------------------------------------------------------------------------


def prepare(x, tensor_amax, static: _layout.Static):
    """``(within-block axes, block maxima patterns, the rule's tensor scales)``."""
    xb, within = _layout.split(f32.bits(x), static.axes, static.sizes)
    # Materialized (a barrier): fused into its consumers, XLA:CPU recomputes
    # the block max per element or stores |x| in full.
    block_amax = lax.optimization_barrier(jnp.max(xb & u32(f32.ABS), axis=within, keepdims=True))
    return within, block_amax, static.rule.tensor(block_amax, tensor_amax)


def branches(fn):
    """``lax.cond(fast, fn(exact=False), fn(exact=True), *args)``."""
    return lambda fast, *args: lax.cond(
        fast, functools.partial(fn, False), functools.partial(fn, True), *args
    )
