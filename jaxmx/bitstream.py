"""Sub-byte element codes packed into bytes, along one axis.

XLA holds FP4 and FP6 codes (and MXINT4/MXINT2) one per byte. For real
low-precision storage the codes are packed along the quantized axis:

* 4-bit codes (FP4 E2M1, INT4): two per byte, element ``2i`` in the low
  nibble and ``2i + 1`` in the high nibble (PyTorch's ``float4_e2m1fn_x2``
  layout);
* 6-bit codes (FP6): four per three bytes, little-endian: code ``j`` of a
  group occupies bits ``6j .. 6j + 5`` of the 24-bit word formed by the bytes
  ``b0 | b1 << 8 | b2 << 16``;
* 2-bit codes (INT2): four per byte, element ``4i + j`` in bits ``2j, 2j + 1``;
* any other width (custom 3-, 5-, 7-, 9- to 15-bit formats): the same
  little-endian bit stream, 8 / gcd(bits, 8) codes per group.

An axis whose length is not a multiple of the group is padded with zero
codes; the original length is kept in the tensor's metadata. Packing and
unpacking are exact inverses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxmx.blocks import from_blocks, pack_group, to_blocks
from jaxmx.codes import raw_dtype

__all__ = ["pack_codes", "unpack_codes"]


def pack_codes(raw: jax.Array, bits: int, axis: int) -> jax.Array:
    """Packs unsigned arrays of ``bits``-wide codes along ``axis`` (negative)."""
    g, nbytes = pack_group(bits)
    if g * bits > 32:  # 5-, 7- and 9- to 16-bit codes: no 32-bit word holds a group
        return _pack_bitwise(raw, bits, axis)
    grouped = to_blocks(raw, axis, g).astype(jnp.uint32)  # (..., groups, g, ...)
    ax = grouped.ndim + axis  # the within-group axis
    word = jnp.zeros_like(jnp.take(grouped, 0, axis=ax))
    for j in range(g):
        word = word | lax.shift_left(jnp.take(grouped, j, axis=ax), jnp.uint32(bits * j))
    out = [
        lax.shift_right_logical(word, jnp.uint32(8 * b)).astype(jnp.uint8) for b in range(nbytes)
    ]
    return from_blocks(jnp.stack(out, axis=ax), axis, grouped.shape[ax - 1] * nbytes)


def unpack_codes(packed: jax.Array, bits: int, axis: int, length: int) -> jax.Array:
    """Inverse of :func:`pack_codes`: unsigned codes, ``length`` along ``axis``."""
    g, nbytes = pack_group(bits)
    if g * bits > 32:
        return _unpack_bitwise(packed, bits, axis, length)
    grouped = to_blocks(packed, axis, nbytes).astype(jnp.uint32)  # (..., groups, bytes, ...)
    ax = grouped.ndim + axis
    word = jnp.zeros_like(jnp.take(grouped, 0, axis=ax))
    for b in range(nbytes):
        word = word | lax.shift_left(jnp.take(grouped, b, axis=ax), jnp.uint32(8 * b))
    # Code j of a group is the word shifted right by bits * j: the word
    # broadcast along a new within-group axis and shifted by that axis's
    # index. Elementwise, so XLA fuses it into whatever decodes the codes
    # (a stack of g shifted words is a concatenate, which XLA:CPU emits as
    # a per-element choice of operand and fuses poorly, worst of all under
    # a dynamic slice).
    shape = word.shape[:ax] + (g,) + word.shape[ax:]
    word = jnp.broadcast_to(jnp.expand_dims(word, ax), shape)
    shift = lax.broadcasted_iota(jnp.uint32, shape, ax) * jnp.uint32(bits)
    codes = lax.shift_right_logical(word, shift) & jnp.uint32((1 << bits) - 1)
    return from_blocks(codes.astype(raw_dtype(bits)), axis, length)


# The same little-endian bit stream, built one bit at a time: code j of a
# group occupies stream bits bits*j .. bits*j + bits - 1, byte b holds stream
# bits 8b .. 8b + 7. Slower than the word path, so used only where a group
# does not fit in 32 bits.


def _pack_bitwise(raw: jax.Array, bits: int, axis: int) -> jax.Array:
    g, _ = pack_group(bits)
    r = jnp.moveaxis(to_blocks(raw, axis, g), (raw.ndim + axis, raw.ndim + axis + 1), (-2, -1))
    r = r.reshape(r.shape[:-2] + (-1,)).astype(jnp.uint32)  # whole groups, block axis last
    stream = jnp.right_shift(r[..., None], jnp.arange(bits, dtype=jnp.uint32)) & 1
    stream = stream.reshape(r.shape[:-1] + (-1, 8))
    out = jnp.sum(jnp.left_shift(stream, jnp.arange(8, dtype=jnp.uint32)), axis=-1)
    return jnp.moveaxis(out.astype(jnp.uint8), -1, axis)


def _unpack_bitwise(packed: jax.Array, bits: int, axis: int, length: int) -> jax.Array:
    p = jnp.moveaxis(packed, axis, -1).astype(jnp.uint32)
    stream = jnp.right_shift(p[..., None], jnp.arange(8, dtype=jnp.uint32)) & 1
    stream = stream.reshape(p.shape[:-1] + (-1, bits))
    codes = jnp.sum(jnp.left_shift(stream, jnp.arange(bits, dtype=jnp.uint32)), axis=-1)
    codes = lax.slice_in_dim(codes, 0, length, axis=-1).astype(raw_dtype(bits))
    return jnp.moveaxis(codes, -1, axis)
