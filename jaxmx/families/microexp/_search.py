"""Microexponent quantization for post-training methods: searched and fixed exponents.

:func:`quantize_search` tries each block's shared exponent plus a few
offsets and, under each, the micro bit of every sub-block, keeping the
choice with the least squared error; :func:`quantize_fixed` rounds ``x``
onto shared exponents and micro bits chosen beforehand (GPTQ's fixed grids).
Both end in the same encode step as :func:`._kernels.quantize`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxmx import numerics
from jaxmx.blocks import to_blocks
from jaxmx.families.microexp import _rounding, _spec
from jaxmx.families.microexp._spec import MicroexpCodes, MicroexpSpec, Static

__all__ = ["quantize_fixed", "quantize_search"]


def _fixed_of(shared_exponent, micro, spec: MicroexpSpec, axis: int, ndim: int):
    """``(block_e, keep)`` in the kept-dims blocked layout from stored exponents and micro bits."""
    j = ndim + 1 + axis
    block_e = jnp.expand_dims(jnp.asarray(shared_exponent).astype(jnp.int32), j)
    if spec.sub_block_size is None:
        return block_e, None
    m = to_blocks(jnp.asarray(micro).astype(jnp.uint32), axis, spec.subs_per_block)
    s = lax.broadcasted_iota(jnp.uint32, m.shape, j)
    keep = jnp.sum(lax.shift_left(jnp.uint32(1) - (m & 1), s), axis=j, keepdims=True)
    return block_e, keep.astype(jnp.uint32)


@functools.partial(jax.jit, static_argnums=(3,))
def _quantize_fixed(x, shared_exponent, micro, static: Static) -> MicroexpCodes:
    fixed = _fixed_of(shared_exponent, micro, static.spec, static.axis, x.ndim)
    return _rounding.encode(x, static, fixed)


def _signed_values(r: _rounding.Rounded, spec: MicroexpSpec) -> jax.Array:
    # code * 2^step in float32 (a selection criterion: flushes do not matter).
    step = r.block_e - 127 - r.micro - spec.element_bits + 2
    v = jnp.ldexp(r.k.astype(jnp.float32), step)
    return jnp.where(lax.shift_right_logical(r.bits, jnp.uint32(31)) == 1, -v, v)


def _sub_sums(a: jax.Array, spec: MicroexpSpec, j: int) -> jax.Array:
    """Sums over each sub-block: the within-block axis ``j`` becomes sub-blocks."""
    shape = a.shape[:j] + (spec.subs_per_block, _rounding.sub_size(spec)) + a.shape[j + 1 :]
    return jnp.sum(a.reshape(shape), axis=j + 1)


def _keep_mask(shifted: jax.Array, j: int) -> jax.Array:
    """uint32 mask (kept dims) of the sub-blocks not shifted, from a bool per sub-block."""
    s = lax.broadcasted_iota(jnp.uint32, shifted.shape, j)
    bits = jnp.where(shifted, jnp.uint32(0), lax.shift_left(jnp.uint32(1), s))
    return jnp.sum(bits, axis=j, keepdims=True).astype(jnp.uint32)


@functools.partial(jax.jit, static_argnums=(1,))
def _search(x, static: Static, importance=None) -> MicroexpCodes:
    spec, axis = static.spec, static.axis
    r0, j = _rounding.round_codes(x, spec, axis)
    ref = numerics.bits_to_f32(r0.bits)
    finite = r0.field != 255
    imp = None if importance is None else to_blocks(importance, axis, spec.block_size)

    def sq_err(fixed):
        r, _ = _rounding.round_codes(x, spec, axis, fixed)
        sq = jnp.where(finite, jnp.square(_signed_values(r, spec) - ref), 0.0)
        return sq if imp is None else sq * imp

    best = None
    for d in static.offsets:  # 0 first: ties keep Quark's exponent
        block_e = jnp.clip(r0.block_e + d, 0, 254)
        if spec.sub_block_size is None:
            keep = None
            err = jnp.sum(sq_err((block_e, None)), axis=j, keepdims=True)
        else:
            # Each pair takes the micro bit with the smaller error, so
            # candidates are (exponent, best bits); at offset 0, ties keep
            # Quark's bit (shifted iff neither element reaches the exponent).
            e0 = _sub_sums(sq_err((block_e, jnp.uint32(0xFFFFFFFF))), spec, j)
            e1 = _sub_sums(sq_err((block_e, jnp.uint32(0))), spec, j)
            s = lax.broadcasted_iota(jnp.uint32, e0.shape, j)
            quark = (lax.shift_right_logical(r0.keep, s) & 1) == 0
            shifted = (e1 < e0) | ((e1 == e0) & quark) if d == 0 else e1 < e0
            keep = _keep_mask(shifted, j)
            err = jnp.sum(jnp.minimum(e0, e1), axis=j, keepdims=True)
        if best is None:
            best = (block_e, keep, err)
        else:
            better = err < best[2]
            best = (
                jnp.where(better, block_e, best[0]),
                None if keep is None else jnp.where(better, keep, best[1]),
                jnp.where(better, err, best[2]),
            )
    return _rounding.encode(x, Static(spec, axis), best[:2])


def quantize_fixed(
    x, shared_exponent, micro, spec: str | MicroexpSpec, *, axis: int = -1
) -> MicroexpCodes:
    """:func:`quantize` with the shared exponents and micro bits given instead of derived.

    Each element rounds half to even onto its pair's grid
    ``2^(block_exp - micro - quant_bit + 2)`` and saturates at the top code;
    the exponents and micro bits come back as given (blocks holding NaN or
    Inf still get the NaN byte). For post-training methods that fix the
    scales first: ``quantize_fixed(x, q.shared_exponent, q.micro, spec)``
    with ``q = quantize(x, spec)`` is ``q``.

    >>> import jax.numpy as jnp
    >>> from jaxmx.families.microexp._kernels import quantize
    >>> q = quantize(jnp.array([3.0, 0.2, 0.9, 0.1] + [0.0] * 12), "mx4")
    >>> y = jnp.array([2.2, -0.4, 0.3, 0.7] + [0.0] * 12)
    >>> quantize_fixed(y, q.shared_exponent, q.micro, "mx4").mantissas[:4].tolist()
    [2, 4, 1, 1]
    """
    spec = _spec.get_spec(spec)
    x = _spec.check_input(x)
    axis = _spec.check_axis(axis, x.ndim)
    n = x.shape[axis]
    nb = -(-n // spec.block_size)
    want = _spec.replace_axis(x.shape, axis, nb)
    se = jnp.asarray(shared_exponent)
    if se.dtype != jnp.uint8 or se.shape != want:
        raise ValueError(
            f"shared_exponent must be uint8 of shape {want} for x of shape {x.shape}, "
            f"got {se.dtype}{tuple(se.shape)}"
        )
    if spec.sub_block_size is not None:
        want_m = _spec.replace_axis(x.shape, axis, nb * spec.subs_per_block)
        if micro is None or jnp.shape(micro) != want_m:
            raise ValueError(
                f"{spec.name} needs micro bits of shape {want_m}, got "
                f"{None if micro is None else jnp.shape(micro)}"
            )
    elif micro is not None:
        raise ValueError(f"{spec.name} has no microexponents: micro must be None")
    return _quantize_fixed(x, se, micro, Static(spec, axis))


def quantize_search(
    x, spec: str | MicroexpSpec, *, axis: int = -1, offsets=(0, 1, -1, -2), importance=None
) -> MicroexpCodes:
    """:func:`quantize` with each block's shared exponent chosen by squared error.

    Each block tries Quark's exponent (the largest element exponent) plus
    each offset; under each, every pair takes the micro bit (its grid one
    binade finer, or not) whose rounded values have the smaller squared
    error, instead of Quark's rule (finer iff neither element reaches the
    exponent). The block keeps the exponent whose values have the smallest
    float32 sum of squared errors (``importance``-weighted if given; ties
    keep Quark's exponent and bits). A lower exponent or a finer pair
    saturates large elements but halves the step of the rest; a higher
    exponent stops a maximum that rounds past the top code from saturating.
    No block's error exceeds Quark's. ``offsets`` must start with 0.

    >>> import jax.numpy as jnp
    >>> from jaxmx.families.microexp._kernels import dequantize, quantize
    >>> x = jnp.array([1.95, 1.0, 0.25, -0.25] + [0.0] * 12)
    >>> dequantize(*quantize(x, "mx4"), "mx4")[:4]  # 1.95 saturates at 1.5
    Array([ 1.5 ,  1.  ,  0.25, -0.25], dtype=float32)
    >>> dequantize(*quantize_search(x, "mx4"), "mx4")[:4]  # exponent + 1: 1.95 -> 2
    Array([ 2.,  1.,  0., -0.], dtype=float32)
    """
    spec = _spec.get_spec(spec)
    x = _spec.check_input(x)
    axis = _spec.check_axis(axis, x.ndim)
    offsets = tuple(int(d) for d in offsets)
    if not offsets or offsets[0] != 0 or len(set(offsets)) != len(offsets):
        raise ValueError(f"offsets must be distinct ints starting with 0, got {offsets!r}")
    if importance is not None:
        importance = jnp.broadcast_to(jnp.asarray(importance, jnp.float32), x.shape)
    return _search(x, Static(spec, axis, offsets), importance)
