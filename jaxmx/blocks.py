"""Blocks along one axis: the layout every MX kernel works in.

An axis of length ``n`` becomes two axes ``(num_blocks, block_size)``; a
partial last block is padded with zeros, which never changes a block's
maximum and packs as zero codes. Axes are given counted from the end
(negative), the convention of MXTensor.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["to_blocks", "from_blocks", "pack_group", "packed_length"]


def pack_group(bits: int) -> tuple[int, int]:
    """(codes per group, bytes per group) of ``bits``-wide codes packed into bytes.

    A group is the fewest codes that fill whole bytes: 2 four-bit codes in
    one byte, 4 six-bit codes in three, 8 five-bit codes in five.
    """
    codes = 8 // math.gcd(bits, 8)
    return codes, codes * bits // 8


def packed_length(length: int, bits: int) -> int:
    """Bytes that ``length`` packed ``bits``-wide codes take (whole groups)."""
    g, nbytes = pack_group(bits)
    return -(-length // g) * nbytes


def to_blocks(a: jax.Array, axis: int, block_size: int) -> jax.Array:
    """(..., n, ...) -> (..., nb, bs, ...), zero-padding a partial last block."""
    n = a.shape[axis]
    nb = -(-n // block_size)
    if nb * block_size != n:
        pad = [(0, 0)] * a.ndim
        pad[axis] = (0, nb * block_size - n)
        a = jnp.pad(a, pad)
    ax = a.ndim + axis
    return a.reshape(a.shape[:ax] + (nb, block_size) + a.shape[ax + 1 :])


def from_blocks(a: jax.Array, axis: int, n: int) -> jax.Array:
    """Inverse of :func:`to_blocks`; ``axis`` is relative to the unblocked rank."""
    ax = a.ndim - 1 + axis
    a = a.reshape(a.shape[:ax] + (a.shape[ax] * a.shape[ax + 1],) + a.shape[ax + 2 :])
    if a.shape[ax] != n:
        a = lax.slice_in_dim(a, 0, n, axis=ax)
    return a
