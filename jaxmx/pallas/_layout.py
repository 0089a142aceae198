"""Rows of blocks: the layout every jaxmx Pallas kernel reads and writes.

The quantization axis is moved last and cut into blocks; each block becomes
one row of a 2-D array ``(num_blocks, block_size)``, zero-padded where the
axis ends in a partial block (zeros never change a block's maximum, and
their codes are sliced off again). Rows are independent, so a grid over
row tiles needs no communication, and a row tile that runs past the last
row (the last grid step) only computes rows that are never stored.

Moving the axis and padding are XLA copies outside the kernel; for the
common case (blocks along the last axis of a length divisible by the block
size) both are free reshapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def to_rows(a: jax.Array, axis: int, block_size: int) -> jax.Array:
    """(..., n, ...) blocked along ``axis`` -> ``(num_blocks, block_size)``."""
    a = jnp.moveaxis(a, axis, -1)
    n = a.shape[-1]
    nb = -(-n // block_size)
    if nb * block_size != n:
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, nb * block_size - n)])
    return a.reshape(-1, block_size)


def from_rows(rows: jax.Array, shape: tuple[int, ...], axis: int) -> jax.Array:
    """Inverse of :func:`to_rows` for an array of ``shape`` (per element)."""
    moved = _moved(shape, axis)
    n = moved[-1]
    a = rows.reshape(moved[:-1] + (-1,))
    if a.shape[-1] != n:
        a = lax.slice_in_dim(a, 0, n, axis=-1)
    return jnp.moveaxis(a, -1, axis)


def scales_from_rows(rows: jax.Array, shape: tuple[int, ...], axis: int) -> jax.Array:
    """One value per row -> the per-block layout of MXTensor.scale (``axis`` holds blocks)."""
    moved = _moved(shape, axis)
    return jnp.moveaxis(rows.reshape(moved[:-1] + (-1,)), -1, axis)


def _moved(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    ax = len(shape) + axis
    return tuple(shape[:ax]) + tuple(shape[ax + 1 :]) + (shape[ax],)
