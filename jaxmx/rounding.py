"""Elementwise rounding to a narrower float: emulating low-precision vector units.

``round_to(x, fmt)`` rounds every element of ``x`` to the grid of a narrower
floating-point format and returns it in ``x``'s dtype, with the rounding
modes of :func:`jaxmx.quantize`. With it one can emulate bfloat16 vector
units (softmax, norms, GELU run in bf16), bf16 master weights updated with
stochastic rounding, or any narrower float (a 12-bit bfloat, FP8, FP6, FP4)
without a block scale.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxmx import formats, numerics
from jaxmx.formats import BF16, FP16, ElementFormat, get_format
from jaxmx.quantize import check_array, check_rounding, random_bits
from jaxmx.spec import check_flag

__all__ = ["round_to"]

_NAMED = {"bfloat16": BF16, "bf16": BF16, "float16": FP16, "fp16": FP16, "half": FP16}
# Element formats by card name ("fp8_e4m3", "int8", ...).
_ELEMENTS = {f.name: f for f in vars(formats).values() if isinstance(f, ElementFormat)}


def _element_format(fmt) -> ElementFormat:
    if isinstance(fmt, ElementFormat):
        return fmt
    if isinstance(fmt, str):
        key = fmt.lower()
        if key in _NAMED:
            return _NAMED[key]
        if key in _ELEMENTS:
            return _ELEMENTS[key]
        try:  # an MX format name: round to its element grid
            return get_format(key).element
        except ValueError:
            pass
        known = sorted(set(_NAMED) | set(_ELEMENTS))
        raise ValueError(
            f"unknown float format {fmt!r}; known: {', '.join(known)}, an MX format name, "
            "or jaxmx.formats.float_format(exponent_bits, mantissa_bits)"
        )
    try:
        dtype = jnp.dtype(fmt)
    except TypeError:
        raise TypeError(
            f"fmt must be a format name, an ElementFormat or a dtype, got {fmt!r}"
        ) from None
    if dtype == jnp.bfloat16:
        return BF16
    if dtype == jnp.float16:
        return FP16
    raise ValueError(f"round_to supports bfloat16 and float16 dtypes, got {dtype}")


def round_to(
    x: jax.typing.ArrayLike,
    fmt: ElementFormat | jax.typing.DTypeLike,
    *,
    rounding: str = "nearest_even",
    key: jax.Array | None = None,
    subnormals: bool = True,
    saturate: bool = False,
) -> jax.Array:
    """Rounds each element of ``x`` to a narrower float; returns ``x``'s dtype.

    Args:
      x: float32, bfloat16 or float16 array.
      fmt: ``"bfloat16"``, ``"float16"``, ``jnp.bfloat16``, an element format
        name (``"fp8_e4m3"``, ``"fp6_e3m2"``, ``"fp4_e2m1"``, ...), an MX format
        name (its element grid, no block scale), or an
        :class:`~jaxmx.ElementFormat` such as
        ``jaxmx.formats.float_format(8, 3)`` (a 12-bit bfloat).
      rounding: ``"nearest_even"``, ``"nearest_away"``, ``"toward_zero"`` or
        ``"stochastic"`` (needs ``key``; unbiased within the format's range).
      key: PRNG key for stochastic rounding.
      subnormals: keep the format's subnormals; ``False`` flushes results
        below its smallest normal to (signed) zero, as FTZ hardware does.
      saturate: clamp overflow to the largest finite value. By default
        overflow follows the format: Inf where it has Inf (bfloat16, float16,
        E5M2; round-toward-zero stops at the largest finite value, as IEEE
        says), NaN where it has only NaN (E4M3), and the largest finite value
        where it has neither (FP6, FP4).

    NaN stays NaN and Inf stays Inf (or becomes NaN / the largest value by
    the same overflow rule). The result is exact in ``x``'s dtype whenever
    ``fmt`` is narrower than it.

    >>> import jax.numpy as jnp, jaxmx
    >>> x = jnp.array([1.0 + 2**-9, 3.14159, 70000.0, 1e-6])
    >>> jaxmx.round_to(x, "bfloat16")
    Array([1.000000e+00, 3.140625e+00, 7.014400e+04, 9.983778e-07], dtype=float32)
    >>> jaxmx.round_to(x, "float16")
    Array([1.0019531e+00, 3.1406250e+00,           inf, 1.0132790e-06], dtype=float32)
    """
    elem = _element_format(fmt)
    x = check_array(x)
    check_rounding(rounding, key)
    subnormals = check_flag(subnormals, "subnormals")
    saturate = check_flag(saturate, "saturate")
    rbits = random_bits(key, x.shape) if numerics.rounding_mode(rounding).random_bits else None
    return _round_to(x, rbits, _RoundSpec(elem, rounding, bool(subnormals), bool(saturate)))


class _RoundSpec(NamedTuple):
    """The static part of one round_to call (the jit's one static argument)."""

    elem: ElementFormat
    rounding: str
    subnormals: bool
    saturate: bool


@functools.partial(jax.jit, static_argnums=(2,))
def _round_to(x, rbits, spec: _RoundSpec):
    fast = _fast_path(spec, x.dtype)
    if fast is not None:
        return fast(x)
    return _round_general(x, rbits, spec)


def _fast_path(spec: _RoundSpec, dtype):
    """The integer-op rounding for ``spec`` and ``dtype``, or None.

    bfloat16 and float16, nearest-even, subnormals kept, overflow to Inf,
    of float32: a few integer ops that XLA fuses into the producer (the
    path vector-op emulation takes for every rounded op), bit for bit
    :func:`_round_general`.
    """
    if dtype != jnp.float32 or spec.rounding != "nearest_even":
        return None
    if not spec.subnormals or spec.saturate:
        return None
    return _FAST.get(spec.elem)


def _round_general(x, rbits, spec: _RoundSpec):
    """Any format, rounding mode and flags: encode the magnitude's code, decode it."""
    elem, rounding, subnormals, saturate = spec
    bits = numerics.f32_to_bits(x)
    sign = bits & jnp.uint32(0x80000000)
    mag = bits & jnp.uint32(0x7FFFFFFF)
    is_nan = mag > jnp.uint32(0x7F800000)
    is_inf = mag == jnp.uint32(0x7F800000)
    finite = jnp.where(is_nan | is_inf, jnp.uint32(0), mag)
    code = numerics.encode_magnitude(finite, 0, elem, rounding, rbits, saturate=False)
    if not subnormals:
        code = jnp.where(code < jnp.uint32(1 << elem.mantissa_bits), jnp.uint32(0), code)
    overflow = code > jnp.uint32(elem.max_code)
    out = numerics.decode_magnitude(jnp.minimum(code, jnp.uint32(elem.max_code)), 0, elem)
    inf, nan = jnp.uint32(0x7F800000), jnp.uint32(0x7FC00000)
    if saturate or not (elem.has_inf or elem.has_nan):
        largest = numerics.decode_magnitude(jnp.uint32(elem.max_code), 0, elem)
        over_value, inf_value = largest, largest
    elif elem.has_inf:
        # IEEE: round-toward-zero never overflows to Inf.
        over_value = out if rounding == "toward_zero" else inf
        inf_value = inf
    else:
        over_value, inf_value = nan, nan
    out = jnp.where(overflow, over_value, out)
    out = jnp.where(is_inf, inf_value, out)
    out = jnp.where(is_nan, nan, out | sign)
    return numerics.bits_to_dtype(out, x.dtype)


def _bf16_nearest_even(x):
    """:func:`_round_general` to bfloat16, nearest-even, for float32 ``x``,
    bit for bit (on all 2**32 patterns: tests/test_rounding.py, marked
    slow), in a few integer ops: add half an ulp less one plus the kept
    lowest bit (ties to even), clear the low 16 bits. Subnormals round the
    same way, overflow carries into Inf, and NaN becomes the quiet NaN
    0x7FC00000 as in the general path."""
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    lsb = (bits >> 16) & jnp.uint32(1)
    out = (bits + jnp.uint32(0x7FFF) + lsb) & jnp.uint32(0xFFFF0000)
    nan = (bits & jnp.uint32(0x7FFFFFFF)) > jnp.uint32(0x7F800000)
    out = jnp.where(nan, jnp.uint32(0x7FC00000), out)
    return lax.bitcast_convert_type(out, jnp.float32)


def _f16_nearest_even(x):
    """:func:`_round_general` to float16, nearest-even, for float32 ``x``,
    bit for bit (on all 2**32 patterns: tests/test_rounding.py, marked
    slow). Normal results: as for bfloat16, 13 bits dropped, and anything
    past 65504 is Inf. Below 2**-14 (float16's subnormals, a fixed step of
    2**-24): ``round(|x| * 2**24) * 2**-24``, each step exact."""
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    mag = bits & jnp.uint32(0x7FFFFFFF)
    lsb = (mag >> 13) & jnp.uint32(1)
    normal = (mag + jnp.uint32(0xFFF) + lsb) & jnp.uint32(0xFFFFE000)
    normal = jnp.where(normal > jnp.uint32(0x477FE000), jnp.uint32(0x7F800000), normal)
    tiny = lax.bitcast_convert_type(mag, jnp.float32) * jnp.float32(2.0**24)
    tiny = lax.round(tiny, lax.RoundingMethod.TO_NEAREST_EVEN) * jnp.float32(2.0**-24)
    tiny = lax.bitcast_convert_type(tiny, jnp.uint32)
    out = jnp.where(mag < jnp.uint32(0x38800000), tiny, normal) | (bits & jnp.uint32(0x80000000))
    out = jnp.where(mag > jnp.uint32(0x7F800000), jnp.uint32(0x7FC00000), out)
    return lax.bitcast_convert_type(out, jnp.float32)


# Nearest-even rounding of float32 to these formats in integer ops (_fast_path).
_FAST = {BF16: _bf16_nearest_even, FP16: _f16_nearest_even}
