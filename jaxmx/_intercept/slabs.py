"""A matmul of an MXTensor weight and an array, its weight decoded a slab at a time.

A weight-only matmul decodes its MXTensor operand to the dtype the traced
program gave it and runs the program's own ``dot_general``. Decoded whole,
a (2048, 8192) weight is a 64 MiB float32 temporary: XLA:CPU allocates a
buffer that large afresh on every call, and its page faults cost more than
the decode and the matmul together (an 8 MiB packed MXFP4 weight then runs
about 20x slower than the float32 weight it replaces). On the platforms
whose record says so (:attr:`jaxmx.platforms.Platform.sliced_decode`: the
CPU), the weight is cut along one of its free axes (neither contracted,
batched nor blocked, so every slab holds whole blocks) into slabs of about
:data:`SLAB_ELEMENTS` elements, a multiple of :data:`SLAB_COLUMNS` wide; a
loop decodes each slab and multiplies it into its slice of the output.
Each slab decodes to the bits of its slice of the whole decode, and each
output element is a float32-accumulated dot product of the same decoded
values as the whole matmul's, summed in the order XLA's kernels choose for
the slab's shape: it can differ from the whole matmul's in the last bits
(within float32 accumulation error; ``tests/test_decode.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxmx.platforms import Platform, per_platform
from jaxmx.quantize import dequantize
from jaxmx.tensor import MXTensor

__all__ = ["SLAB_ELEMENTS", "sliced_dot"]

# Elements of one decoded slab: 2 MiB of float32, a few slabs to a core's
# cache, and few enough loop iterations that their overhead stays small.
SLAB_ELEMENTS = 1 << 19
# Slab widths are multiples of this many columns, and the sliced axis must
# be one (other weights decode whole): every slab then runs XLA:CPU's matmul
# kernels on whole vector-width column blocks, never a narrow remainder.
SLAB_COLUMNS = 128


def sliced_dot(eqn: Any, invals: Sequence[Any]) -> jax.Array | None:
    """``eqn`` (a ``dot_general``) with its one MXTensor operand decoded (to
    its traced dtype) slab by slab where the platform asks for it, or ``None`` when
    the matmul does not take slabs (no MXTensor or two, no free axis, a
    weight small enough to decode whole, a layout slabs cannot cut)."""
    side = _mx_side(invals)
    if side is None:
        return None
    t, dtype = invals[side], eqn.invars[side].aval.dtype
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    axis = _slab_axis(t, (lc, rc)[side], (lb, rb)[side])
    if axis is None:
        return None
    slab = _slab_width(t.shape[axis], t.size // t.shape[axis])
    if slab is None:
        return None
    # Where the slab axis lands in the output: batch, lhs free, rhs free.
    frees = [
        [a for a in range(len(v.aval.shape)) if a not in c and a not in b]
        for v, c, b in zip(eqn.invars[:2], (lc, rc), (lb, rb), strict=True)
    ]
    out_axis = len(lb) + (len(frees[0]) if side else 0) + frees[side].index(axis)
    params = eqn.primitive.get_bind_params(eqn.params)

    def run(platform: Platform, lhs: Any, rhs: Any) -> jax.Array:
        if not platform.sliced_decode:
            args = [lhs, rhs]
            args[side] = dequantize(args[side], dtype)
            return eqn.primitive.bind(*args, **params)
        return _by_slabs(eqn.primitive, params, lhs, rhs, side, axis, out_axis, slab, dtype)

    return per_platform(run, *invals)


def _slab_width(size: int, per_column: int) -> int | None:
    """Slab width along an axis of ``size``: a multiple of :data:`SLAB_COLUMNS`
    dividing ``size``, the largest whose slab holds at most
    :data:`SLAB_ELEMENTS` (at least one column block); None if fewer than two
    slabs."""
    if size % SLAB_COLUMNS:
        return None
    blocks = size // SLAB_COLUMNS
    fit = max(1, SLAB_ELEMENTS // (per_column * SLAB_COLUMNS))
    width = max(d for d in range(1, min(fit, blocks) + 1) if blocks % d == 0)
    return None if width == blocks else width * SLAB_COLUMNS


def _mx_side(invals: Sequence[Any]) -> int | None:
    mx = [isinstance(x, MXTensor) for x in invals[:2]]
    return mx.index(True) if mx.count(True) == 1 else None


def _slab_axis(t: MXTensor, contracting: Sequence[int], batch: Sequence[int]) -> int | None:
    """The largest free axis of ``t`` along which its leaves can be sliced."""
    if not isinstance(t.block_size, int) or t.scale.ndim != t.ndim:
        return None
    if t.tensor_scale is not None and t.tensor_scale.ndim:
        return None
    if t.micro is not None and t.micro.ndim != t.ndim:
        return None
    block = t.block_axis() + t.ndim
    free = [a for a in range(t.ndim) if a not in contracting and a not in batch and a != block]
    if not free:
        return None
    return max(free, key=lambda a: (t.shape[a], a))


def _cut(t: MXTensor, axis: int, start: Any, size: int) -> MXTensor:
    """The slab ``start : start + size`` of ``t`` along free ``axis``."""

    def cut(leaf):
        if leaf is None:
            return None
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            return lax.dynamic_slice_in_dim(leaf, start, size, axis)
        # Float8 leaves are sliced as their bytes: XLA:CPU widens float8
        # arrays to float16 for any op but a bit-cast, and would hoist the
        # widening of the whole leaf out of the loop.
        raw = lax.bitcast_convert_type(leaf, jnp.uint8)
        raw = lax.dynamic_slice_in_dim(raw, start, size, axis)
        return lax.bitcast_convert_type(raw, leaf.dtype)

    return dataclasses.replace(t, data=cut(t.data), scale=cut(t.scale), micro=cut(t.micro))


def _by_slabs(prim, params, lhs, rhs, side, axis, out_axis, slab, dtype):
    args = [lhs, rhs]
    t = args[side].canonical()
    size = t.shape[axis]

    def product(start, width):
        a = list(args)
        a[side] = dequantize(_cut(t, axis, start, width), dtype)
        return prim.bind(*a, **params)

    first = product(0, slab)
    shape = list(first.shape)
    shape[out_axis] = size
    out = lax.dynamic_update_slice_in_dim(jnp.zeros(shape, first.dtype), first, 0, out_axis)

    def body(i, out):
        start = i * slab
        return lax.dynamic_update_slice_in_dim(out, product(start, slab), start, out_axis)

    return lax.fori_loop(1, size // slab, body, out)
