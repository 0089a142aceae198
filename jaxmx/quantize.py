"""quantize, dequantize and fake_quantize: float arrays <-> MX blocks.

The conversion of one block follows OCP MX v1.0, section 6.3:

1. ``amax = max |x_i|`` over the block;
2. a shared exponent ``e`` from ``amax`` by the chosen scale rule, clamped to
   the scale's range (E8M0: [-127, 127]; an all-zero block gets 2^-127);
3. each element ``x_i / 2^e`` rounded onto the element grid and saturated to
   the element's largest finite value;
4. a block holding NaN or Inf gets the NaN scale (0xFF): the whole block
   decodes to NaN, never to a silent number.

All of it runs on float32 bit patterns (see :mod:`jaxmx.numerics`), so the
results are bit-exact on every backend, float32 subnormals included.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmx import codes, numerics
from jaxmx._codecs import CODECS, Codec
from jaxmx.bitstream import pack_codes
from jaxmx.blocks import from_blocks, to_blocks
from jaxmx.formats import ElementFormat, MXFormat
from jaxmx.packing import unpack
from jaxmx.spec import QuantSpec
from jaxmx.tensor import MXTensor, register_ops

__all__ = ["quantize", "dequantize", "fake_quantize"]


# --------------------------------------------------------------------------
# Argument checks: every message names what was given and what is allowed.
# --------------------------------------------------------------------------


def check_array(x, what: str = "x") -> jax.Array:
    if isinstance(x, MXTensor):
        raise TypeError(f"{what} is already an MXTensor; dequantize it first")
    x = jnp.asarray(x)
    if not any(x.dtype == d for d in numerics.FLOAT_DTYPES):
        kind = (
            "complex"
            if jnp.issubdtype(x.dtype, jnp.complexfloating)
            else "integer"
            if jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_
            else "unsupported"
        )
        extra = (
            " (convert float64 to float32 yourself: jaxmx does not round twice silently)"
            if x.dtype == jnp.float64
            else ""
        )
        raise TypeError(
            f"{what} has {kind} dtype {x.dtype}; MX quantization takes float32, "
            f"bfloat16 or float16 input{extra}"
        )
    return x


def check_rounding(rounding, key, what: str = "rounding") -> None:
    """Validates a rounding name and its key: one that draws random bits needs
    a key, the others take none."""
    if numerics.rounding_mode(rounding, what).random_bits:
        if key is None:
            raise ValueError(f"{what}={rounding!r} needs a PRNG key: pass key=jax.random.key(...)")
    elif key is not None:
        raise ValueError(
            f"a key was given but {what} is {rounding!r}, which uses no random bits; "
            "pass rounding='stochastic' or drop the key"
        )


def _check_tensor_amax(tensor_amax, spec: QuantSpec):
    if tensor_amax is None:
        return None
    if not spec.rules.tensor_amax:
        raise ValueError(
            f"tensor_amax= sets the per-tensor scale of NVFP4-like formats; {spec.format.name} "
            "has none to set"
        )
    a = jnp.asarray(tensor_amax)
    if a.shape != () or not (
        jnp.issubdtype(a.dtype, jnp.floating) or jnp.issubdtype(a.dtype, jnp.integer)
    ):
        raise TypeError(f"tensor_amax must be a real scalar, got {tensor_amax!r}")
    return a.astype(jnp.float32)


def random_bits(key, shape) -> jax.Array:
    # Accepts new-style keys (jax.random.key) and raw uint32[2] ones (PRNGKey).
    return jax.random.bits(key, shape, jnp.uint32)


# --------------------------------------------------------------------------
# Quantizing in blocks (see jaxmx.blocks for the layout).
# --------------------------------------------------------------------------


class _Blocks(NamedTuple):
    sign: jax.Array  # uint32 0/1, blocked layout
    mag: jax.Array  # uint32 magnitude patterns, blocked layout (Inf/NaN left in)
    rbits: jax.Array | None  # random bits for stochastic rounding, blocked layout
    exponent: jax.Array  # int32 shared exponent per block, kept-dims layout
    nonfinite: jax.Array  # bool per block, kept-dims layout


def quantize_blocks(
    x: jax.Array,
    fmt: MXFormat,
    axis: int,
    block_size: int,
    scale_mode: str,
    flush_subnormals: bool,
    rbits: jax.Array | None,
) -> _Blocks:
    bits = to_blocks(numerics.f32_to_bits(x), axis, block_size)
    sign = lax.shift_right_logical(bits, jnp.uint32(31))
    mag = bits & jnp.uint32(0x7FFFFFFF)
    block_axis = bits.ndim + axis  # the within-block axis in blocked layout
    # Integer max of magnitudes orders finite values, Inf and NaN correctly.
    amax = jnp.max(mag, axis=block_axis, keepdims=True)
    if flush_subnormals:
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
        scale_mode,
        min_exponent=fmt.scale.min_exponent,
        max_exponent=fmt.scale.max_exponent,
    )
    if rbits is not None:
        rbits = to_blocks(rbits, axis, block_size)
    return _Blocks(sign, mag, rbits, e, nonfinite)


# --------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------


def quantize(
    x,
    format: str | MXFormat,
    *,
    axis: int = -1,
    block_size: int | None = None,
    scale_mode: str = "floor",
    rounding: str = "nearest_even",
    flush_subnormals: bool = False,
    key: jax.Array | None = None,
    packed: bool = False,
    tensor_amax=None,
) -> MXTensor:
    """Quantizes ``x`` to an MX format along one axis.

    Blocks of ``block_size`` consecutive elements along ``axis`` share one
    scale. A last partial block is handled as if padded with zeros (the
    padding never changes a value). Bit-exact with OCP MX v1.0 section 6.3
    and the MX paper's reference emulator (microxcaling) in its exact mode.

    Args:
      x: float32, bfloat16 or float16 array of any rank. (NumPy float64
        input becomes float32 as in every JAX function unless x64 is on; a
        float64 JAX array is refused rather than rounded twice.)
      format: a format name (``jaxmx.list_formats()``, aliases ``"mxfp8"``,
        ``"mxfp6"``, ``"mxfp4"``) or an :class:`~jaxmx.MXFormat`.
      axis: the axis along which blocks run (for a matmul operand: its
        contraction axis).
      block_size: elements per block; ``None`` means the format's default (32).
      scale_mode: rule for the shared exponent: ``"floor"`` (OCP, default),
        ``"rceil"`` (NVIDIA/TransformerEngine/JAX: never clips the block
        max), ``"ceil"``, ``"even"``. See :func:`jaxmx.numerics.shared_exponent`.
      rounding: ``"nearest_even"`` (default), ``"nearest_away"`` (ties away
        from zero, microxcaling's "nearest"), ``"toward_zero"``, or
        ``"stochastic"`` (unbiased within the element's range; needs ``key``).
      flush_subnormals: zero every block whose largest magnitude is a
        float32 subnormal (or zero), as the MX paper's emulator does; other
        blocks keep their subnormal elements. By default nothing is flushed.
      key: PRNG key for stochastic rounding.
      packed: return sub-byte codes (FP4, FP6, INT4, INT2, MX6/MX4 codes and
        microexponents) packed into bytes (see :func:`jaxmx.pack`), written
        directly without the one-code-per-byte intermediate. No effect on
        8-bit formats.
      tensor_amax: NVFP4 only: the amax that sets the per-tensor scale
        (calibrated, or the same for every shard); default ``max |x|``.

    The relatives of the OCP formats follow their own reference arithmetic
    (``format.codec``; see docs/semantics.md): ``"nvfp4"`` (blocks of 16 or
    ``block_size=(16, 16)`` tiles over the last two axes, E4M3 block scales
    in ``t.scale``, ``t.tensor_scale``; rounding nearest_even or
    stochastic), ``"mx9"``/``"mx6"``/``"mx4"``/``"msfp16"``/``"msfp12"``
    (blocks of 16, microexponents in ``t.micro``), and
    ``"tensor_fp8_e4m3"``/``"tensor_fp8_e5m2"`` (one float32 scale,
    ``t.tensor_scale``). Options their references do not define
    (``scale_mode``, ``flush_subnormals``, other roundings) are refused.

    Returns:
      An :class:`~jaxmx.MXTensor`. Elements saturate to the format's largest
      finite value; a block holding NaN or Inf gets the NaN scale.

    Raises:
      ValueError: unknown format, axis out of range, bad block size, rounding
        or scale mode, or stochastic rounding without a key.
      TypeError: integer, complex or float64 input.

    >>> import jax.numpy as jnp, jaxmx
    >>> x = jnp.array([[0.3, -1.7, 5.0, 100.0]])
    >>> t = jaxmx.quantize(x, "mxfp4", block_size=4)
    >>> t.scale  # 2^(floor(log2 100) - 2): the block max sets the scale
    Array([[16]], dtype=float8_e8m0fnu)
    >>> jaxmx.dequantize(t)  # small values drown next to the block max
    Array([[ 0., -0.,  8., 96.]], dtype=float32)
    """
    x, rbits, amax, spec = _arguments(
        x, format, key, tensor_amax, axis=axis, block_size=block_size, scale_mode=scale_mode,
        rounding=rounding, flush_subnormals=flush_subnormals, packed=packed,
    )  # fmt: skip
    return _quantize_nodiff(x, rbits, amax, spec)


def _arguments(x, format, key, tensor_amax, **options):
    """Checked ``(x, random bits, tensor amax, QuantSpec)`` of a quantize call."""
    x = check_array(x)
    spec = QuantSpec.make(format, x.ndim, **options)
    check_rounding(spec.rounding, key)
    amax = _check_tensor_amax(tensor_amax, spec)
    rbits = random_bits(key, x.shape) if spec.random_bits else None
    return x, rbits, amax, spec


def quantize_spec(x, rbits, tensor_amax, spec: QuantSpec) -> MXTensor:
    """:func:`quantize` with validated arguments (for jaxmx's ops)."""
    return _codec(spec.format).quantize(x, rbits, tensor_amax, spec)


def fake_quantize_spec(x, rbits, tensor_amax, spec: QuantSpec) -> jax.Array:
    """:func:`fake_quantize` with validated arguments, no custom gradient."""
    return _codec(spec.format).fake_quantize(x, rbits, tensor_amax, spec)


def _codec(fmt: MXFormat) -> Codec:
    return _ALL_CODECS[fmt.codec]


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _quantize_nodiff(x, rbits, tensor_amax, spec):
    return quantize_spec(x, rbits, tensor_amax, spec)


@_quantize_nodiff.defjvp
def _quantize_jvp(spec, primals, tangents):
    # Rounding to codes has a zero derivative almost everywhere; a silent zero
    # gradient through dequantize(quantize(x)) is never what a user wants.
    raise TypeError(
        "jaxmx.quantize is not differentiable (its codes are integers); use "
        "jaxmx.fake_quantize for a straight-through gradient, or wrap the input in "
        "jax.lax.stop_gradient if no gradient should flow"
    )


@functools.partial(jax.jit, static_argnums=(2,))
def _ocp_quantize_jit(x, rbits, spec: QuantSpec) -> MXTensor:
    fmt, axis, bs = spec.format, spec.axis, spec.block_size
    blk = quantize_blocks(x, fmt, axis, bs, spec.scale_mode, spec.flush_subnormals, rbits)
    return _encode_blocks(blk, x, fmt, axis, bs, spec.rounding, spec.packed)


def _encode_blocks(blk: _Blocks, x, fmt, axis, bs, rounding, packed) -> MXTensor:
    """Codes and scale bytes of blocks whose shared exponents are decided."""
    elem = fmt.element
    # Blocks holding Inf/NaN get the NaN scale and all-zero codes.
    mag = jnp.where(blk.nonfinite, jnp.uint32(0), blk.mag)
    code = numerics.encode_magnitude(mag, blk.exponent, elem, rounding, blk.rbits)
    sign = jnp.where(blk.nonfinite, jnp.uint32(0), blk.sign)
    if packed:
        raw = from_blocks(codes.raw_codes(sign, code, elem), axis, x.shape[axis])
        # Kept out of the packing fusion: fused, its strided loop runs ~2x slower on CPU.
        raw = lax.optimization_barrier(raw)
        data = pack_codes(raw, elem.bits, axis)
    else:
        data = from_blocks(codes.signed_codes(sign, code, elem), axis, x.shape[axis])
    biased = (blk.exponent + fmt.scale.bias).astype(jnp.uint8)
    biased = jnp.where(blk.nonfinite, jnp.uint8(fmt.scale.nan_code), biased)
    scale = lax.bitcast_convert_type(jnp.squeeze(biased, axis), fmt.scale.storage_dtype)
    return MXTensor(
        data=data,
        scale=scale,
        format=fmt,
        axis=axis,
        block_size=bs,
        length=x.shape[axis],
        dtype=np.dtype(x.dtype),
        packed=packed,
        made_ndim=x.ndim,
    )


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def quantize_with_exponent(x, exponent, fmt: MXFormat, axis: int, bs: int, packed: bool):
    """Quantizes ``x`` with given shared exponents instead of ones from the block max.

    For post-training methods that choose each block's scale themselves
    (:mod:`jaxmx.ptq`). ``exponent``: int32 in the kept-dims blocked layout
    (``to_blocks`` of ``x`` with the within-block axis of size 1), within the
    scale format's range; elements round to nearest even and saturate, as in
    :func:`quantize`. Blocks holding Inf/NaN still get the NaN scale.
    """
    bits = to_blocks(numerics.f32_to_bits(x), axis, bs)
    mag = bits & jnp.uint32(0x7FFFFFFF)
    nonfinite = jnp.max(mag, axis=bits.ndim + axis, keepdims=True) >= jnp.uint32(0x7F800000)
    sign = lax.shift_right_logical(bits, jnp.uint32(31))
    exponent = jnp.asarray(exponent, jnp.int32)
    blk = _Blocks(sign, mag, None, exponent, nonfinite)
    return _encode_blocks(blk, x, fmt, axis, bs, "nearest_even", packed)


def dequantize(t: MXTensor, dtype=jnp.float32) -> jax.Array:
    """Decodes an :class:`~jaxmx.MXTensor` to a float array, exactly.

    Every MX value (element times scale) is a float32 number, subnormals
    included, so the float32 result is exact; bfloat16 and float16 results
    are rounded to nearest even. Blocks with a NaN scale decode to NaN.

    Args:
      t: the tensor; packed or not.
      dtype: float32 (default), bfloat16 or float16.

    >>> import jax.numpy as jnp, jaxmx
    >>> t = jaxmx.quantize(jnp.array([1.0, 2.5, -3.0, 0.1]), "mxfp8", block_size=4)
    >>> jaxmx.dequantize(t)
    Array([ 1.   ,  2.5  , -3.   ,  0.1015625], dtype=float32)
    """
    if not isinstance(t, MXTensor):
        raise TypeError(f"dequantize expects an MXTensor, got {type(t).__name__}")
    dtype = numerics.check_out_dtype(dtype)
    return _decode(unpack(t).canonical(), dtype)


def _decode(t: MXTensor, dtype) -> jax.Array:
    if t.tensor_scale is not None and t.tensor_scale.ndim:
        # Made under vmap or stacked by scan: one tensor scale per mapped
        # item, on the leading axes of every leaf.
        return jax.vmap(lambda u: _decode(u, dtype))(t)
    return _codec(t.format).dequantize(t, dtype)


@functools.partial(jax.jit, static_argnums=(1,))
def _ocp_dequantize(t: MXTensor, dtype) -> jax.Array:
    elem, fmt = t.format.element, t.format
    sign, mag, special = codes.split_codes(to_blocks(t.data, t.axis, t.block_size), elem)
    biased = jnp.expand_dims(lax.bitcast_convert_type(t.scale, jnp.uint8), t.axis)
    e = biased.astype(jnp.int32) - fmt.scale.bias
    nan_block = biased == jnp.uint8(fmt.scale.nan_code)
    bits = numerics.decode_magnitude(mag, e, elem) | lax.shift_left(sign, jnp.uint32(31))
    if elem.has_nan:
        # Codes above the largest finite one are the element's own Inf/NaN.
        bits = jnp.where(special, _special_bits(mag, sign, elem), bits)
    bits = jnp.where(nan_block, jnp.uint32(0x7FC00000), bits)
    return from_blocks(numerics.bits_to_dtype(bits, dtype), t.axis, t.length)


def _special_bits(mag, sign, elem: ElementFormat) -> jax.Array:
    nan = jnp.uint32(0x7FC00000)
    if not elem.has_inf:
        return jnp.broadcast_to(nan, mag.shape)
    inf_code = elem.max_code + 1
    inf = jnp.uint32(0x7F800000) | lax.shift_left(sign, jnp.uint32(31))
    return jnp.where(mag == inf_code, inf, nan)


def fake_quantize(
    x,
    format: str | MXFormat,
    *,
    axis: int = -1,
    block_size: int | None = None,
    scale_mode: str = "floor",
    rounding: str = "nearest_even",
    flush_subnormals: bool = False,
    key: jax.Array | None = None,
    tensor_amax=None,
) -> jax.Array:
    """``dequantize(quantize(x, ...))`` in one fused pass, in ``x``'s dtype.

    Takes the same arguments as :func:`quantize`. The codes are never
    materialized: the rounded value of each element is rebuilt directly from
    its code magnitude and the block's exponent.

    Differentiable with the straight-through estimator: the gradient with
    respect to ``x`` is passed through unchanged (the usual choice for
    quantization-aware training).

    >>> import jax.numpy as jnp, jaxmx
    >>> # Scale 2^0; 5.0 is a tie between 4 and 6 (goes to even), 6.5 saturates.
    >>> jaxmx.fake_quantize(jnp.array([0.3, -1.7, 5.0, 6.5]), "mxfp4", block_size=4)
    Array([ 0.5, -1.5,  4. ,  6. ], dtype=float32)
    """
    x, rbits, amax, spec = _arguments(
        x, format, key, tensor_amax, axis=axis, block_size=block_size, scale_mode=scale_mode,
        rounding=rounding, flush_subnormals=flush_subnormals,
    )  # fmt: skip
    return _fake_quantize(x, rbits, amax, spec)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _fake_quantize(x, rbits, tensor_amax, spec):
    return fake_quantize_spec(x, rbits, tensor_amax, spec)


@_fake_quantize.defjvp
def _fake_quantize_jvp(spec, primals, tangents):
    x, rbits, tensor_amax = primals
    return _fake_quantize(x, rbits, tensor_amax, spec), tangents[0]


@functools.partial(jax.jit, static_argnums=(2,))
def _ocp_fake_quantize_jit(x, rbits, spec: QuantSpec):
    fmt, axis, bs = spec.format, spec.axis, spec.block_size
    elem, rounding = fmt.element, spec.rounding
    blk = quantize_blocks(x, fmt, axis, bs, spec.scale_mode, spec.flush_subnormals, rbits)
    # Rounded values straight from the significands, no codes in between;
    # Inf/NaN lanes compute garbage that the NaN of their block replaces.
    bits = numerics.round_magnitude(blk.mag, blk.exponent, elem, rounding, blk.rbits)
    sign = blk.sign
    if elem.kind == "int":  # two's complement has no -0: zero results are +0, as stored
        sign = jnp.where(bits == 0, jnp.uint32(0), sign)
    bits = bits | lax.shift_left(sign, jnp.uint32(31))
    bits = jnp.where(blk.nonfinite, jnp.uint32(0x7FC00000), bits)
    return from_blocks(numerics.bits_to_dtype(bits, x.dtype), axis, x.shape[axis])


_OCP = Codec(
    quantize=lambda x, rbits, tensor_amax, spec: _ocp_quantize_jit(x, rbits, spec),
    fake_quantize=lambda x, rbits, tensor_amax, spec: _ocp_fake_quantize_jit(x, rbits, spec),
    dequantize=_ocp_dequantize,
)
_ALL_CODECS: dict[str, Codec] = {"ocp": _OCP, **CODECS}

register_ops(dequantize=dequantize)
