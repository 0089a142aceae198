"""The OCP MX arithmetic: E8M0 power-of-two block scales, OCP MX v1.0 section 6.3.

1. ``amax = max |x_i|`` over the block;
2. a shared exponent ``e`` from ``amax`` by the chosen scale rule, clamped to
   the scale's range (E8M0: [-127, 127]; an all-zero block gets 2^-127);
3. each element ``x_i / 2^e`` rounded onto the element grid and saturated to
   the element's largest finite value;
4. a block holding NaN or Inf gets the NaN scale (0xFF): the whole block
   decodes to NaN, never to a silent number.

All of it runs on float32 bit patterns (see :mod:`jaxmx.numerics`), so the
results are bit-exact on every backend, float32 subnormals included. Every
jitted kernel takes the frozen :class:`~jaxmx.spec.QuantSpec` as its static
argument.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxmx import codes, numerics
from jaxmx.bitstream import pack_codes
from jaxmx.blocks import from_blocks, to_blocks
from jaxmx.families._common import make_tensor
from jaxmx.formats import ElementFormat
from jaxmx.numerics import u32
from jaxmx.spec import QuantSpec
from jaxmx.tensor import MXTensor


class Blocks(NamedTuple):
    """``x`` in blocks, with each block's shared exponent decided."""

    sign: jax.Array  # uint32 0/1, blocked layout
    mag: jax.Array  # uint32 magnitude patterns, blocked layout (Inf/NaN left in)
    rbits: jax.Array | None  # random bits for stochastic rounding, blocked layout
    exponent: jax.Array  # int32 shared exponent per block, kept-dims layout
    nonfinite: jax.Array  # bool per block, kept-dims layout


def blocks(x: jax.Array, spec: QuantSpec, rbits: jax.Array | None = None) -> Blocks:
    """``x`` cut into the blocks of ``spec`` (see :mod:`jaxmx.blocks` for the layout)."""
    fmt, axis, bs = spec.format, spec.axis, spec.block_size
    bits = to_blocks(numerics.f32_to_bits(x), axis, bs)
    sign = lax.shift_right_logical(bits, jnp.uint32(31))
    mag = bits & jnp.uint32(0x7FFFFFFF)
    block_axis = bits.ndim + axis  # the within-block axis in blocked layout
    # Integer max of magnitudes orders finite values, Inf and NaN correctly.
    amax = jnp.max(mag, axis=block_axis, keepdims=True)
    if spec.flush_subnormals:
        # The MX emulator's rule: a block whose shared exponent before
        # clamping, floor(log2(max |x|)), is at or below -127 (its max is a
        # float32 subnormal or zero) becomes zero; subnormal elements of any
        # other block are kept and quantized as usual.
        tiny = amax < jnp.uint32(0x00800000)
        mag = jnp.where(tiny, jnp.uint32(0), mag)
        amax = jnp.where(tiny, jnp.uint32(0), amax)
    e, nonfinite = numerics.shared_exponent(
        amax,
        fmt.element,
        spec.scale_mode,
        min_exponent=fmt.scale.min_exponent,
        max_exponent=fmt.scale.max_exponent,
    )
    if rbits is not None:
        rbits = to_blocks(rbits, axis, bs)
    return Blocks(sign, mag, rbits, e, nonfinite)


# The kernels that write codes take the forced platform as a second static
# argument: it decides the codes' storage dtype (jaxmx.codes.storage_dtype),
# so it must be part of the jit cache key.


@functools.partial(jax.jit, static_argnums=(2, 3))
def quantize(x, rbits, spec: QuantSpec, forced=None) -> MXTensor:
    return encode(blocks(x, spec, rbits), x, spec)


def encode(blk: Blocks, x, spec: QuantSpec) -> MXTensor:
    """Codes and scale bytes of blocks whose shared exponents are decided."""
    fmt, axis = spec.format, spec.axis
    elem = fmt.element
    # Blocks holding Inf/NaN get the NaN scale and all-zero codes.
    mag = jnp.where(blk.nonfinite, jnp.uint32(0), blk.mag)
    code = numerics.encode_magnitude(mag, blk.exponent, elem, spec.rounding, blk.rbits)
    sign = jnp.where(blk.nonfinite, jnp.uint32(0), blk.sign)
    if spec.packed:
        raw = from_blocks(codes.raw_codes(sign, code, elem), axis, x.shape[axis])
        # Kept out of the packing fusion: fused, its strided loop runs ~2x slower on CPU.
        raw = lax.optimization_barrier(raw)
        data = pack_codes(raw, elem.bits, axis)
    else:
        data = from_blocks(codes.signed_codes(sign, code, elem), axis, x.shape[axis])
    biased = (blk.exponent + fmt.scale.bias).astype(jnp.uint8)
    biased = jnp.where(blk.nonfinite, jnp.uint8(fmt.scale.nan_code), biased)
    scale = lax.bitcast_convert_type(jnp.squeeze(biased, axis), fmt.scale.storage_dtype)
    return make_tensor(spec, x, data, scale)


@functools.partial(jax.jit, static_argnums=(2, 3))
def quantize_with_exponent(x, exponent, spec: QuantSpec, forced=None) -> MXTensor:
    """Quantizes ``x`` with given shared exponents instead of ones from the block max.

    ``exponent``: int32 in the kept-dims blocked layout (``to_blocks`` of
    ``x`` with the within-block axis of size 1), within the scale format's
    range; elements round to nearest even and saturate. Blocks holding
    Inf/NaN still get the NaN scale.
    """
    bits = to_blocks(numerics.f32_to_bits(x), spec.axis, spec.block_size)
    mag = bits & jnp.uint32(0x7FFFFFFF)
    nonfinite = jnp.max(mag, axis=bits.ndim + spec.axis, keepdims=True) >= jnp.uint32(0x7F800000)
    sign = lax.shift_right_logical(bits, jnp.uint32(31))
    blk = Blocks(sign, mag, None, jnp.asarray(exponent, jnp.int32), nonfinite)
    return encode(blk, x, dataclasses.replace(spec, rounding="nearest_even"))


@functools.partial(jax.jit, static_argnums=(1,))
def dequantize(t: MXTensor, dtype) -> jax.Array:
    """``element * 2^e`` of every element, exactly.

    Where every block's scale keeps the tensor's nonzero values normal
    float32 numbers (or is the NaN scale), the product is one float
    multiply, exact on every backend (:func:`_decode_fast`); otherwise (a
    scale near float32's bottom, such as the 2^-127 of an all-zero block)
    the values are built on integers (:func:`_decode_exact`). A
    ``lax.cond`` on the whole tensor picks one.
    """
    biased = jnp.expand_dims(lax.bitcast_convert_type(t.scale, jnp.uint8), t.axis)
    exact = functools.partial(_decode_exact, t=t, dtype=dtype)
    span = _fast_exponents(t.format)
    if span is None:
        return exact(t.data, biased)
    e = biased.astype(jnp.int32) - t.format.scale.bias
    nan_block = biased == jnp.uint8(t.format.scale.nan_code)
    fast = jnp.all(nan_block | ((e >= span[0]) & (e <= span[1])))
    return lax.cond(fast, functools.partial(_decode_fast, t=t, dtype=dtype), exact, t.data, biased)


def _fast_exponents(fmt) -> tuple[int, int] | None:
    """Block exponents ``e`` for which :func:`_decode_fast` is exact (None: none).

    It multiplies each element's float32 value ``v`` (the integer code for
    INT elements) by ``2^(e + shift)``: exact when that factor is a normal
    float32 and so is ``v_min * 2^(e + shift)`` for the smallest nonzero
    ``v_min`` (larger products stay normal or overflow to Inf, as the exact
    result does).
    """
    elem = fmt.element
    if fmt.scale.bits != 8:
        return None
    shift, smallest = _shift(elem), 0
    if elem.kind == "float":
        smallest = 1 - elem.bias - elem.mantissa_bits  # log2 of the smallest subnormal
        if smallest < -126 or elem.bias > 127:
            return None
    return max(-126 - shift, -126 - smallest), 127 - shift


def _shift(elem: ElementFormat) -> int:
    return -elem.mantissa_bits if elem.kind == "int" else 0


def _decode_fast(data, biased, *, t: MXTensor, dtype) -> jax.Array:
    elem, fmt = t.format.element, t.format
    sign, mag, special = codes.split_codes(to_blocks(data, t.axis, t.block_size), elem)
    # 2^(e + shift) built in float32's exponent field (mod 2^32: the offset
    # may be negative); NaN blocks are set after the product.
    offset = ((127 - fmt.scale.bias + _shift(elem)) << 23) & 0xFFFFFFFF
    factor = lax.shift_left(biased.astype(jnp.uint32), u32(23)) + u32(offset)
    v = _element_values(mag, sign, elem)
    bits = numerics.f32_to_bits(v * numerics.bits_to_f32(factor))
    if elem.has_nan:  # the element's own NaN codes: the quiet NaN, unsigned
        nan = special if not elem.has_inf else special & (mag != u32(elem.max_code + 1))
        bits = jnp.where(nan, u32(0x7FC00000), bits)
    bits = jnp.where(biased == jnp.uint8(fmt.scale.nan_code), u32(0x7FC00000), bits)
    return from_blocks(numerics.bits_to_dtype(bits, dtype), t.axis, t.length)


def _element_values(mag, sign, elem: ElementFormat) -> jax.Array:
    """Signed float32 values of the element codes (INT elements: the integer code)."""
    if elem.kind == "int":
        v = mag.astype(jnp.int32).astype(jnp.float32)  # exact: |code| <= 2^(bits - 1)
        return jnp.where(sign != 0, -v, v)
    m = elem.mantissa_bits
    # Normal codes: the element's exponent and mantissa fields moved into
    # float32's and rebiased; codes above the largest finite one land at or
    # above float32's Inf and NaN patterns, and Inf is fixed below. Field-0
    # codes are mag * 2^(1 - bias - m): a small integer times a normal power
    # of two, exact in float32.
    normal = lax.shift_left(mag, u32(23 - m)) + u32((127 - elem.bias) << 23)
    step = numerics.bits_to_f32(u32((128 - elem.bias - m) << 23))
    sub = numerics.f32_to_bits(mag.astype(jnp.int32).astype(jnp.float32) * step)
    bits = jnp.where(mag >= u32(1 << m), normal, sub)
    if elem.has_inf:
        bits = jnp.where(mag == u32(elem.max_code + 1), u32(0x7F800000), bits)
    return numerics.bits_to_f32(bits | lax.shift_left(sign, u32(31)))


def _decode_exact(data, biased, t: MXTensor, dtype) -> jax.Array:
    """The integer construction: exact for every scale, float32 subnormals included."""
    elem, fmt = t.format.element, t.format
    sign, mag, special = codes.split_codes(to_blocks(data, t.axis, t.block_size), elem)
    e = biased.astype(jnp.int32) - fmt.scale.bias
    nan_block = biased == jnp.uint8(fmt.scale.nan_code)
    bits = numerics.decode_magnitude(mag, e, elem) | lax.shift_left(sign, jnp.uint32(31))
    if elem.has_nan:
        # Codes above the largest finite one are the element's own Inf/NaN.
        bits = jnp.where(special, _special_bits(mag, sign, elem), bits)
    bits = jnp.where(nan_block, jnp.uint32(0x7FC00000), bits)
    return from_blocks(numerics.bits_to_dtype(bits, dtype), t.axis, t.length)


def exponents(t: MXTensor) -> jax.Array:
    """The unbiased int32 exponent of each block of ``t``, kept-dims blocked layout."""
    biased = jnp.expand_dims(lax.bitcast_convert_type(t.scale, jnp.uint8), t.axis)
    return biased.astype(jnp.int32) - t.format.scale.bias


def _special_bits(mag, sign, elem: ElementFormat) -> jax.Array:
    nan = jnp.uint32(0x7FC00000)
    if not elem.has_inf:
        return jnp.broadcast_to(nan, mag.shape)
    inf_code = elem.max_code + 1
    inf = jnp.uint32(0x7F800000) | lax.shift_left(sign, jnp.uint32(31))
    return jnp.where(mag == inf_code, inf, nan)


@functools.partial(jax.jit, static_argnums=(2,))
def fake_quantize(x, rbits, spec: QuantSpec):
    elem, axis = spec.format.element, spec.axis
    blk = blocks(x, spec, rbits)
    # Rounded values straight from the significands, no codes in between;
    # Inf/NaN lanes compute garbage that the NaN of their block replaces.
    bits = numerics.round_magnitude(blk.mag, blk.exponent, elem, spec.rounding, blk.rbits)
    sign = blk.sign
    if elem.kind == "int":  # two's complement has no -0: zero results are +0, as stored
        sign = jnp.where(bits == 0, jnp.uint32(0), sign)
    bits = bits | lax.shift_left(sign, jnp.uint32(31))
    bits = jnp.where(blk.nonfinite, jnp.uint32(0x7FC00000), bits)
    return from_blocks(numerics.bits_to_dtype(bits, x.dtype), axis, x.shape[axis])
