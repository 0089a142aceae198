"""The shared core of the microexponent kernels: exponents, micro bits, rounded codes.

:func:`round_codes` reads each block's shared exponent (the largest element
exponent) and each sub-block's microexponent off the float32 bit patterns
(or takes them as given) and rounds every element half to even onto its
grid, all on integers; :func:`encode` turns that into stored codes, exponent
bytes and micro bits. :func:`encode` is also the last step of the searches
in :mod:`._search`, which choose the exponents and bits themselves.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxmx.blocks import from_blocks, to_blocks
from jaxmx.families.microexp._spec import MicroexpCodes, MicroexpSpec, Static
from jaxmx.numerics import f32_to_bits

MANT_MASK = 0x007FFFFF
IMPLICIT = 0x00800000
SIGN = 0x80000000
EXP_BIAS = 127
NAN_EXPONENT = 0xFF  # the E8M0 NaN byte: a block holding NaN or Inf


def sub_size(spec: MicroexpSpec) -> int:
    return spec.block_size if spec.sub_block_size is None else spec.sub_block_size


def _sub_index(shape: tuple[int, ...], j: int, spec: MicroexpSpec) -> jax.Array:
    """Index of each element's sub-block within its block (blocked layout, axis ``j``)."""
    i = lax.broadcasted_iota(jnp.int32, shape, j)
    sub = sub_size(spec)
    return (
        lax.shift_right_logical(i, jnp.int32(sub.bit_length() - 1))
        if sub & (sub - 1) == 0
        else i // sub
    )


def _max_and_mask(e: jax.Array, sub_index: jax.Array, j: int) -> tuple[jax.Array, jax.Array]:
    """Per block: the max of ``e`` and a mask of the sub-blocks that reach it.

    One variadic reduction: (e, 1 << sub-block) pairs combine to the larger
    e, OR-ing the masks of equal ones. So the microexponents need no
    per-pair pass: a sub-block is shifted iff its bit is clear. (A pair's
    max taken elementwise, by reversing each pair, stops XLA:CPU from
    vectorizing the encode loop: 3x slower.)
    """

    def combine(a, b):
        (ea, ma), (eb, mb) = a, b
        return (
            jnp.maximum(ea, eb),
            jnp.where(ea > eb, ma, jnp.where(eb > ea, mb, ma | mb)),
        )

    bit = lax.shift_left(jnp.uint32(1), sub_index.astype(jnp.uint32))
    return lax.reduce((e, bit), (jnp.int32(0), jnp.uint32(0)), combine, (j,))


class Rounded(NamedTuple):
    """What :func:`round_codes` reads off the blocks of ``x``."""

    bits: jax.Array  # uint32 input bit patterns, blocked layout
    field: jax.Array  # int32 biased exponent field (0: zero/subnormal, 255: NaN/Inf)
    block_e: jax.Array  # int32 biased block exponent, kept dims (..., nb, 1, ...)
    keep: jax.Array | None  # uint32 mask of unshifted sub-blocks, kept dims; None: no micro
    micro: jax.Array | int  # int32 0/1 per element (its sub-block's bit); 0 without micro
    k: jax.Array  # uint32 code magnitude (garbage where field is 255)


def round_codes(x: jax.Array, spec: MicroexpSpec, axis: int, fixed=None) -> tuple[Rounded, int]:
    """Exponents, micro bits and code magnitudes; ``fixed``: given ``(block_e, keep)``.

    With ``fixed`` the block exponents (int32, kept dims) and the masks of
    unshifted sub-blocks (uint32, kept dims; None without microexponents)
    are taken as given instead of read off ``x``: elements above a block's
    grid saturate at its top code.
    """
    bits = to_blocks(f32_to_bits(x), axis, spec.block_size)
    j = bits.ndim + axis  # the within-block axis
    field = (lax.shift_right_logical(bits, jnp.uint32(23)) & jnp.uint32(0xFF)).astype(jnp.int32)
    # NaN and Inf do not take part in choosing exponents (Quark zeroes them
    # first); zero and subnormals have field 0, the flush of x'.
    e = jnp.where(field == 255, 0, field)
    if fixed is not None:
        block_e, keep = fixed
        micro = 0
        if keep is not None:
            sub_index = _sub_index(e.shape, j, spec)
            micro = (lax.shift_right_logical(keep, sub_index.astype(jnp.uint32)) & 1) ^ 1
            micro = micro.astype(jnp.int32)
    elif spec.sub_block_size is None:
        block_e = jnp.max(e, axis=j, keepdims=True)
        keep, micro = None, 0
    else:
        # micro = 1 iff every element of the sub-block is below the block
        # exponent, i.e. none of them reaches it.
        sub_index = _sub_index(e.shape, j, spec)
        block_e, keep = _max_and_mask(e, sub_index, j)
        block_e, keep = jnp.expand_dims(block_e, j), jnp.expand_dims(keep, j)
        micro = (lax.shift_right_logical(keep, sub_index.astype(jnp.uint32)) & 1) ^ 1
        micro = micro.astype(jnp.int32)
    # x' / 2^step = sig * 2^(field - 150 - step): drop = step + 150 - field bits,
    # with step = block_e - 127 - micro - quant_bit + 2. For a nonzero finite
    # element drop >= 25 - quant_bit >= 17; at 24 and above the code is 0 or 1.
    drop = (block_e - micro - spec.element_bits + 25) - field
    drop = jnp.clip(drop, 1, 31).astype(jnp.uint32)
    sig = jnp.where(field == 0, jnp.uint32(0), (bits & jnp.uint32(MANT_MASK)) | IMPLICIT)
    # Round half to even: sig < 2^24 and half <= 2^30, so nothing overflows.
    half_m1 = lax.shift_left(jnp.uint32(1), drop - jnp.uint32(1)) - jnp.uint32(1)
    lsb = lax.shift_right_logical(sig, drop) & jnp.uint32(1)
    k = lax.shift_right_logical(sig + half_m1 + lsb, drop)
    k = jnp.minimum(k, jnp.uint32(spec.max_code))
    return Rounded(bits, field, block_e, keep, micro, k), j


@functools.partial(jax.jit, static_argnums=(1,))
def encode(x, static: Static, fixed=None) -> MicroexpCodes:
    """Codes, exponent bytes and micro bits of ``x``; ``fixed``: as :func:`round_codes`."""
    spec, axis = static.spec, static.axis
    r, j = round_codes(x, spec, axis, fixed)
    top = jnp.uint32(spec.max_code)
    inf = r.field == 255
    nan = inf & ((r.bits & jnp.uint32(MANT_MASK)) != 0)
    # Quark clips x / 2^step: Inf saturates with its sign; NaN gets +0 here
    # (its block decodes to NaN through the exponent byte anyway).
    k = jnp.where(inf, top, r.k)
    sign = lax.shift_right_logical(r.bits, jnp.uint32(31))
    sign = jnp.where((r.field == 0) | nan, jnp.uint32(0), sign)
    k = jnp.where(nan, jnp.uint32(0), k)
    codes = (lax.shift_left(sign, jnp.uint32(spec.mantissa_bits)) | k).astype(jnp.uint8)
    nonfinite = jnp.max(r.field, axis=j, keepdims=True) == 255
    se = jnp.where(nonfinite, NAN_EXPONENT, r.block_e).astype(jnp.uint8)
    micro = None
    if r.keep is not None:
        shape = list(r.keep.shape)
        shape[j] = spec.subs_per_block
        s = lax.broadcasted_iota(jnp.uint32, tuple(shape), j)
        m = (lax.shift_right_logical(r.keep, s) & 1) ^ 1
        micro = from_blocks(m.astype(jnp.uint8), axis, shape[j - 1] * shape[j])
    return MicroexpCodes(
        mantissas=from_blocks(codes, axis, x.shape[axis]),
        shared_exponent=jnp.squeeze(se, j),
        micro=micro,
    )
