"""What the NVFP4 kernels are given: argument checks, the blocking, the static spec.

The public functions validate ``x``, ``axis``/``block_size``, ``tensor_amax``
and ``rbits`` here, turn the blocking into axes counted from the end with
their block sizes, and hand each jitted kernel one hashable :class:`Static`.
:func:`split` reshapes an array into its blocks (or 2-D tiles) for the
kernels, :func:`scale_shape` gives the shape of the block scales.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmx import numerics


class NVFP4Arrays(NamedTuple):
    """The arrays of an NVFP4 tensor."""

    codes: jax.Array  # uint8 E2M1 codes (sign in bit 3), x's shape
    block_scales: jax.Array  # float8_e4m3fn, x's shape with each blocked axis // its block
    tensor_scale: jax.Array  # float32 scalar decode scale (TE: 1 / S_enc)


@dataclasses.dataclass(frozen=True)
class Static:
    """Everything static about one kernel call: jit's one (hashable) static argument.

    ``axes`` (counted from the end, increasing) and ``sizes`` are the
    blocking; ``rule`` is the scale rule (a hashable
    :class:`jaxmx.families.nvfp4._scales.ScaleRule`; ``None`` for kernels
    that are given their scales); ``decode`` is ``"scale"`` or ``"amax"``
    (TE's dequantize kernel formula); ``dtype`` is the dequantized dtype.
    """

    axes: tuple[int, ...]
    sizes: tuple[int, ...]
    rule: Any = None
    decode: str = "scale"
    dtype: Any = None


def check_x(x) -> jax.Array:
    x = jnp.asarray(x)
    if not any(x.dtype == d for d in numerics.FLOAT_DTYPES):
        raise TypeError(
            f"x has dtype {x.dtype}; NVFP4 quantization takes float32, bfloat16 or float16"
        )
    return x


def layout(shape, axis, block_size) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validated (axes counted from the end, block sizes), axes in increasing order."""
    ndim = len(shape)
    if isinstance(block_size, (int, np.integer)) and not isinstance(block_size, bool):
        sizes = (int(block_size),)
    elif isinstance(block_size, tuple) and len(block_size) == 2:
        sizes = tuple(block_size)
    else:
        raise TypeError(f"block_size must be an int or a pair of ints, got {block_size!r}")
    if any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1 for b in sizes):
        raise ValueError(f"block sizes must be positive ints, got {block_size!r}")
    sizes = tuple(int(b) for b in sizes)
    if len(sizes) == 2 and axis == -1:
        axis = (-2, -1)  # tiles over the last two axes by default
    axes = (axis,) if len(sizes) == 1 else axis
    if not isinstance(axes, tuple) or len(axes) != len(sizes):
        raise ValueError(
            f"axis {axis!r} does not match block_size {block_size!r}: give one axis for "
            "one block size, a pair of axes for a pair (2-D tiles)"
        )
    out = []
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
            raise TypeError(f"axis must be an int (or a pair of ints for tiles), got {axis!r}")
        if not -ndim <= a < ndim:
            raise ValueError(
                f"axis {a} is out of range for an array of rank {ndim}; "
                f"allowed: {-ndim}..{ndim - 1}"
            )
        out.append(int(a) % ndim - ndim)
    if len(out) == 2 and out[0] == out[1]:
        raise ValueError(f"the two tile axes must differ, got {axis!r}")
    order = sorted(range(len(out)), key=lambda i: out[i])
    axes_t = tuple(out[i] for i in order)
    sizes = tuple(sizes[i] for i in order)
    for a, b in zip(axes_t, sizes, strict=True):
        if shape[a] % b:
            raise ValueError(
                f"axis {a} has length {shape[a]}, not a multiple of the block size {b}: "
                "NVFP4 has no partial blocks (TransformerEngine and torchao reject them)"
            )
    return axes_t, sizes


def check_rbits(rbits, shape):
    if rbits is None:
        return None
    rbits = jnp.asarray(rbits)
    if rbits.dtype != jnp.uint32 or rbits.shape != tuple(shape):
        raise ValueError(
            f"rbits must be uint32 random bits of x's shape {tuple(shape)}, got "
            f"{rbits.dtype}{tuple(rbits.shape)}"
        )
    return rbits


def check_amax(tensor_amax):
    if tensor_amax is None:
        return None
    a = jnp.asarray(tensor_amax)
    if a.shape != () or a.dtype.kind not in "fiu":
        raise TypeError(f"tensor_amax must be a real scalar, got {tensor_amax!r}")
    if not isinstance(a, jax.core.Tracer) and np.asarray(a) < 0:
        raise ValueError(f"tensor_amax must be >= 0 (an amax), got {float(a)}")
    return a.astype(jnp.float32)


def split(a: jax.Array, axes, sizes) -> tuple[jax.Array, tuple[int, ...]]:
    """Each blocked axis n -> (n // b, b); returns the array and the within-block axes."""
    pos = [a.ndim + ax for ax in axes]  # increasing
    shape = list(a.shape)
    for p, b in zip(reversed(pos), reversed(sizes), strict=True):
        shape[p : p + 1] = [shape[p] // b, b]
    within = tuple(p + 1 + i for i, p in enumerate(pos))
    return a.reshape(shape), within


def scale_shape(shape, axes, sizes) -> tuple[int, ...]:
    s = list(shape)
    for a, b in zip(axes, sizes, strict=True):
        s[a] //= b
    return tuple(s)
