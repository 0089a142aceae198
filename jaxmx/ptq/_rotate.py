"""Block-diagonal Hadamard rotations of activations and weights."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmx import _hadamard
from jaxmx._paths import contraction_axis, path_string
from jaxmx.spec import check_axis

# --------------------------------------------------------------------------
# Block-diagonal Hadamard rotation.
# --------------------------------------------------------------------------


def hadamard(n: int) -> np.ndarray:
    """The orthonormal Sylvester Hadamard matrix of order ``n`` (a power of two), float32.

    ``H = H_n / sqrt(n)`` with ``H_1 = [1]``, ``H_2k = [[H_k, H_k], [H_k, -H_k]]``:
    symmetric and orthonormal, so ``H @ H = I`` and rotating twice undoes it.

    >>> import jaxmx
    >>> jaxmx.ptq.hadamard(4) * 2
    array([[ 1.,  1.,  1.,  1.],
           [ 1., -1.,  1., -1.],
           [ 1.,  1., -1., -1.],
           [ 1., -1., -1.,  1.]], dtype=float32)
    """
    return _hadamard.hadamard(n)


def rotate(x: jax.typing.ArrayLike, *, axis: int = -1, size: int = 32) -> jax.Array:
    """Multiplies ``x`` along ``axis`` by the block-diagonal Hadamard ``diag(H, ..., H)``.

    Each run of ``size`` consecutive entries along ``axis`` (an MX block when
    ``size`` is the block size and the runs are aligned) is replaced by its
    product with :func:`hadamard` ``(size)``. For an activation ``x`` rotated
    along its features and a weight ``w`` rotated along its contraction axis,
    ``rotate(x) @ rotate(w, axis=0) == x @ w`` in exact arithmetic
    (``x H H^T w``; ``H`` is symmetric).

    Computed as a fast Walsh-Hadamard transform (``log2(size)`` butterfly
    stages of sums and differences, then one scaling by ``size**-0.5``), as
    hardware does it: no matmul, so :func:`jaxmx.intercept` sees none to put
    in MX, and each output is within ``log2(size) + 1`` roundings of exact.

    Args:
      x: float array.
      axis: the axis to rotate (an activation's features, a weight's
        contraction axis).
      size: the Hadamard order, a power of two dividing ``x.shape[axis]``.

    >>> import jax.numpy as jnp, jaxmx
    >>> x, w = jnp.arange(8.0)[None], jnp.ones((8, 2))
    >>> jaxmx.ptq.rotate(x, size=4) @ jaxmx.ptq.rotate(w, axis=0, size=4)
    Array([[28., 28.]], dtype=float32)
    """
    hadamard(size)  # validates size
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"rotate takes a float array, got dtype {x.dtype}")
    axis = check_axis(axis, x.ndim)
    n = x.shape[axis]
    if n % size:
        raise ValueError(
            f"axis {axis} has length {n}, not a multiple of the Hadamard size {size}; "
            "allowed: sizes (powers of two) that divide it"
        )
    return _rotate(x, axis, size)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _rotate(x, axis, size):
    return _hadamard.rotate(x, axis, size)


def rotate_weights(
    params: Any,
    *,
    size: int = 32,
    include: str = r"kernel$",
    axes: Mapping[str, int] | Callable[[str, jax.Array], int | None] | None = None,
) -> Any:
    """Rotates every matmul weight of ``params`` along its contraction axis.

    Pair it with a model that rotates each of those matmuls' activations by
    :func:`rotate` (the same ``size``), so that every product is unchanged.

    Args:
      params: a pytree of arrays (linen variables, a dict).
      size: the Hadamard order (16 or 32: the MX block size).
      include: regular expression searched in each leaf's path (``"/"``
        joined); matching leaves whose contraction axis is known
        (:func:`jaxmx.params.contraction_axis`, or ``axes``) are rotated.
        The default, ``kernel$``, leaves embedding tables alone (a lookup's
        output is not a matmul's).
      axes: ``(path, array) -> axis or None``, consulted before the naming
        convention.

    Returns:
      The same tree with matching weights rotated.

    >>> import jax.numpy as jnp, jaxmx
    >>> p = {"d": {"kernel": jnp.eye(4), "bias": jnp.zeros(4)}}
    >>> r = jaxmx.ptq.rotate_weights(p, size=4)
    >>> r["d"]["kernel"][0]
    Array([0.5, 0.5, 0.5, 0.5], dtype=float32)
    """
    pattern = re.compile(include)

    def one(path, x):
        p = path_string(path)
        if not pattern.search(p) or not hasattr(x, "dtype"):
            return x
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        axis = axes(p, x) if axes is not None else None
        axis = contraction_axis(p, x) if axis is None else axis
        return x if axis is None else rotate(x, axis=axis, size=size)

    return jax.tree_util.tree_map_with_path(one, params)
