"""Permutations and reshapes of MXTensors: the block axis moves along, blocks stay whole."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from jaxmx._bitmove import move as _move
from jaxmx.array_ops._layout import (
    _axis,
    _group,
    _replace,
    _stored,
    _tensor,
    _via_unpacked,
    _where,
)
from jaxmx.tensor import MXTensor

# --------------------------------------------------------------------------
# Axis permutations: the block axis moves with the metadata.
# --------------------------------------------------------------------------


def transpose(t: MXTensor, axes: Sequence[int] | None = None) -> MXTensor:
    """Permutes the axes of an MXTensor, as :func:`jax.numpy.transpose`.

    Codes and scales are permuted alike; the block axis moves with them and
    ``axis`` follows it. Packed bytes move as they are.

    Args:
      t: the tensor.
      axes: a permutation of ``range(t.ndim)`` (negative entries allowed);
        ``None`` reverses the axes.

    >>> import jax.numpy as jnp, jaxmx
    >>> t = jaxmx.quantize(jnp.ones((3, 64)), "mxfp8", axis=1)
    >>> u = jaxmx.transpose(t)
    >>> u.shape, u.axis, u.scale.shape
    ((64, 3), -2, (2, 3))
    """
    t = _tensor(t, "transpose")
    n = t.ndim
    if axes is None:
        perm = tuple(range(n - 1, -1, -1))
    else:
        if isinstance(axes, (int, np.integer)):
            axes = (axes,)
        perm = tuple(_axis(a, n, "transpose axis") for a in axes)
        if sorted(perm) != list(range(n)):
            raise ValueError(
                f"transpose axes {tuple(axes)} are not a permutation of the {n} axes of {_where(t)}"
            )
    block = perm.index(n + t.axis)
    return _replace(
        t,
        data=_move(t.data, lambda a: jnp.transpose(a, perm)),
        scale=_move(t.scale, lambda a: jnp.transpose(a, perm)),
        axis=block - n,
    )


def swapaxes(t: MXTensor, axis1: int, axis2: int) -> MXTensor:
    """Swaps two axes of an MXTensor, as :func:`jax.numpy.swapaxes`.

    >>> import jax.numpy as jnp, jaxmx
    >>> t = jaxmx.quantize(jnp.ones((2, 3, 64)), "mxfp4")
    >>> jaxmx.swapaxes(t, 0, 2).shape
    (64, 3, 2)
    """
    t = _tensor(t, "swapaxes")
    perm = list(range(t.ndim))
    a, b = _axis(axis1, t.ndim, "axis1"), _axis(axis2, t.ndim, "axis2")
    perm[a], perm[b] = perm[b], perm[a]
    return transpose(t, perm)


def moveaxis(
    t: MXTensor, source: int | Sequence[int], destination: int | Sequence[int]
) -> MXTensor:
    """Moves axes of an MXTensor to new positions, as :func:`jax.numpy.moveaxis`.

    >>> import jax.numpy as jnp, jaxmx
    >>> t = jaxmx.quantize(jnp.ones((2, 3, 64)), "mxfp4")
    >>> u = jaxmx.moveaxis(t, -1, 0)
    >>> u.shape, u.axis
    ((64, 2, 3), -3)
    """
    t = _tensor(t, "moveaxis")
    n = t.ndim
    src = [source] if isinstance(source, (int, np.integer)) else list(source)
    dst = [destination] if isinstance(destination, (int, np.integer)) else list(destination)
    if len(src) != len(dst):
        raise ValueError(
            f"moveaxis needs as many sources as destinations, got {source!r} and {destination!r}"
        )
    src = [_axis(a, n, "source") for a in src]
    dst = [_axis(a, n, "destination") for a in dst]
    if len(set(src)) != len(src) or len(set(dst)) != len(dst):
        raise ValueError(f"moveaxis got repeated axes: {source!r} -> {destination!r}")
    rest = [a for a in range(n) if a not in src]
    perm = [None] * n
    for s, d in zip(src, dst, strict=True):
        perm[d] = s
    it = iter(rest)
    perm = [p if p is not None else next(it) for p in perm]
    return transpose(t, perm)


# --------------------------------------------------------------------------
# Reshape: blocks stay whole.
# --------------------------------------------------------------------------


def _new_shape(shape, size: int, t: MXTensor) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    try:
        shape = tuple(operator.index(s) for s in shape)
    except TypeError:
        raise TypeError(f"reshape needs a shape of ints, got {shape!r}") from None
    if shape.count(-1) > 1 or any(s < -1 for s in shape):
        raise ValueError(f"invalid shape {shape} for reshape: sizes >= 0 and at most one -1")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if known == 0 or size % known:
            raise ValueError(f"cannot reshape {_where(t)} ({size} elements) to {shape}")
        shape = tuple(size // known if s == -1 else s for s in shape)
    if math.prod(shape) != size:
        raise ValueError(f"cannot reshape {_where(t)} ({size} elements) to {shape}")
    return shape


def reshape(t: MXTensor, shape: int | Sequence[int]) -> MXTensor:
    """Reshapes an MXTensor without touching a value, as :func:`jax.numpy.reshape`.

    Axes before and after the block axis may be merged and split freely, as
    long as the block axis stays one axis with everything after it kept
    after it. The block axis itself may also be split into (outer axes,
    inner axis), or merged with the axes before it, when both the old and
    new block-axis lengths are multiples of ``block_size``: blocks then stay
    whole and in order. Anything else (merging the block axis with a later
    axis, cutting a block in two) would need new scales and raises.

    Args:
      t: the tensor.
      shape: the new shape; one entry may be -1.

    Raises:
      ValueError: the new shape does not keep the blocks whole.

    >>> import jax.numpy as jnp, jaxmx
    >>> t = jaxmx.quantize(jnp.ones((4, 6, 64)), "mxfp4", packed=True)
    >>> u = jaxmx.reshape(t, (24, 2, 32))  # 64 = 2 x 32: blocks stay whole
    >>> u.shape, u.axis, u.scale.shape
    ((24, 2, 32), -1, (24, 2, 1))
    """
    t = _tensor(t, "reshape")
    old = t.shape
    shape = _new_shape(shape, math.prod(old), t)
    b, n, L, bs = t.ndim + t.axis, len(shape), t.length, t.block_size
    inner = math.prod(old[b + 1 :])
    whole = L % bs == 0
    fits = [
        j
        for j in range(n)
        if math.prod(shape[j + 1 :]) == inner
        and (shape[j] == L or (whole and shape[j] > 0 and shape[j] % bs == 0))
    ]
    if not fits:
        raise ValueError(
            f"cannot reshape {_where(t)} to {shape}: the block axis must stay one axis, with the "
            f"axes after it ({old[b + 1 :]}, {inner} elements) kept after it; it may be split or "
            f"merged with the axes before it only at block boundaries (old and new length "
            f"multiples of {bs}). Dequantize first to reshape freely"
        )
    j = next((j for j in fits if shape[j] == L), fits[0])
    new_len = shape[j]
    nb = -(-new_len // bs)

    def move(u: MXTensor) -> MXTensor:
        return _replace(
            u,
            data=u.data.reshape(shape[:j] + (_stored(u, new_len),) + shape[j + 1 :]),
            scale=u.scale.reshape(shape[:j] + (nb,) + shape[j + 1 :]),
            axis=j - n,
            length=new_len,
        )

    g = _group(t)[0]
    if new_len == L or (L % g == 0 and new_len % g == 0):
        return move(t)  # packed bytes split or join on whole groups
    return _via_unpacked(t, move)
