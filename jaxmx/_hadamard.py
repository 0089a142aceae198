"""Block-diagonal Hadamard transforms, shared by the matmuls and the PTQ methods.

Private: :func:`jaxmx.ptq.rotate` and :func:`jaxmx.ptq.hadamard` are the
public faces; the training matmul uses :func:`rotate` on the operands of the
weight-gradient matmul (the NVFP4 recipe, arXiv 2509.25149).
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np

__all__ = ["check_size", "hadamard", "random_signs", "rotate"]


def check_size(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard order must be a power of two (1, 2, 4, ..., 32), got {n!r}")
    return int(n)


def hadamard(n: int) -> np.ndarray:
    """The orthonormal Sylvester Hadamard matrix of order ``n`` (a power of two), float32."""
    check_size(n)
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (h / math.sqrt(n)).astype(np.float32)


def random_signs(size: int, seed: int) -> np.ndarray:
    """``size`` fixed random signs (+-1, float32) from ``seed``: the diagonal of a
    randomized Hadamard transform ``H diag(s)``."""
    return np.where(np.random.default_rng(seed).random(size) < 0.5, -1.0, 1.0).astype(np.float32)


def rotate(x: Any, axis: int, size: int, signs: np.ndarray | None = None) -> Any:
    """``x`` along ``axis`` times ``diag(H diag(s), ..., H diag(s))`` (blocks of ``size``).

    A fast Walsh-Hadamard transform: ``log2(size)`` butterfly stages of sums
    and differences, then one scaling by ``size**-0.5``; no matmul. With the
    same ``signs`` on both operands of a product contracted along the
    rotated axis, the product is unchanged in exact arithmetic.
    """
    moved = jnp.moveaxis(x, axis, -1)
    lead = moved.shape[:-1]
    y = moved.reshape(*lead, -1, size)
    if signs is not None:
        y = y * jnp.asarray(signs, x.dtype)
    h = 1
    while h < size:
        # Sylvester order: entry i pairs with i ^ h; (a, b) -> (a + b, a - b).
        y = y.reshape(*lead, -1, size // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = jnp.stack([a + b, a - b], axis=-2)
        h *= 2
    y = y.reshape(moved.shape) * jnp.asarray(1 / math.sqrt(size), x.dtype)
    return jnp.moveaxis(y, -1, axis)
