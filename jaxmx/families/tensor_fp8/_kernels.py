"""Per-tensor FP8: E4M3 or E5M2 elements under one float32 scale per tensor.

Current scaling, the baseline of the BDR paper's comparison and
TransformerEngine's ``Float8CurrentScaling``: the scale comes from the
tensor's own amax, so the amax lands on the element's largest normal::

    amax  = max |x|
    scale = amax / max_normal                               # one float32 division
    code  = fp8(clamp(x / scale, -max_normal, max_normal))  # nearest even, saturating
    value = float32(code) * scale

``max_normal`` is 448 (E4M3, ``0x1.Cp8``) or 57344 (E5M2, ``0x1.Cp15``).
Where the formula breaks down:

* ``amax == 0``: ``scale = 1`` (as TransformerEngine does); the codes are
  zeros that keep x's signs.
* ``0 < amax < max_normal * 2^-150`` (the division underflows to 0): the
  scale is the smallest positive float32, 2^-149, so ``x / scale`` stays
  finite. Other tiny amax give a subnormal scale, which is kept: every step
  is IEEE float32 with gradual underflow, computed on integers where XLA:CPU
  would flush (:mod:`jaxmx.families._f32`).
* NaN or Inf anywhere: the scale is NaN and every code is NaN (E4M3 0x7F,
  E5M2 0x7E), the convention jaxmx uses for a block holding a NaN or Inf, the
  tensor being the block here. One Inf would otherwise make ``scale = Inf``
  and turn every finite element into NaN or 0 anyway.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxmx import numerics
from jaxmx.families import _f32 as f32
from jaxmx.formats import FP8_E4M3, FP8_E5M2, ElementFormat
from jaxmx.numerics import u32

__all__ = [
    "TensorFP8Arrays",
    "tensor_fp8_dequantize",
    "tensor_fp8_fake_quantize",
    "tensor_fp8_quantize",
]

Element = Literal["e4m3", "e5m2"]

# name -> (element format, float32 pattern of its max normal, its NaN byte)
_ELEMENTS: dict[str, tuple[ElementFormat, int, int]] = {
    "e4m3": (FP8_E4M3, 0x43E00000, 0x7F),  # 448 = 0x1.Cp8
    "e5m2": (FP8_E5M2, 0x47600000, 0x7E),  # 57344 = 0x1.Cp15
}
_ONE = 0x3F800000
_SMALLEST = 0x00000001  # 2^-149, the smallest positive float32
# Below this scale (2^-100) a float division or multiply could meet a
# subnormal operand or result that matters; above it the fast path is exact.
_FAST_SCALE = 0x0D800000


class TensorFP8Arrays(NamedTuple):
    """The arrays of a per-tensor FP8 tensor: ``value = float32(codes) * scale``."""

    codes: jax.Array  # float8_e4m3fn or float8_e5m2, x's shape
    scale: jax.Array  # float32 scalar decode scale, amax / max_normal (NaN for nonfinite x)


def _element(element) -> tuple[ElementFormat, int, int]:
    if element not in _ELEMENTS:
        raise ValueError(f"unknown element {element!r}; allowed: {', '.join(_ELEMENTS)}")
    return _ELEMENTS[element]


def _check_x(x) -> jax.Array:
    x = jnp.asarray(x)
    if not any(x.dtype == d for d in numerics.FLOAT_DTYPES):
        raise TypeError(
            f"x has dtype {x.dtype}; per-tensor FP8 quantization takes float32, bfloat16 or float16"
        )
    if x.size == 0:
        raise ValueError(f"x is empty (shape {x.shape}): there is no amax to scale by")
    return x


def _amax(x: jax.Array) -> jax.Array:
    """float32 pattern of max |x| (NaN if x holds one), subnormals counted.

    A float max is one fast vector pass, and exact whenever its result is a
    normal number or Inf/NaN (XLA:CPU reads subnormals as 0, which cannot
    change the largest of a set that holds a normal number). Otherwise the
    integer max of the magnitude patterns decides, which orders subnormals
    too.
    """
    fmax = f32.bits(jnp.max(jnp.abs(x.astype(jnp.float32))))
    return lax.cond(
        fmax >= u32(0x00800000),
        lambda x: fmax,
        lambda x: jnp.max(f32.bits(x) & u32(f32.ABS)),
        x,
    )


def _scale(x: jax.Array, top: int) -> tuple[jax.Array, jax.Array]:
    """(scale pattern, nonfinite flag) of x."""
    amax = _amax(x)
    nonfinite = amax >= u32(f32.INF)
    s = jnp.maximum(f32.div(amax, u32(top)), u32(_SMALLEST))
    s = jnp.where(amax == 0, u32(_ONE), s)
    return jnp.where(nonfinite, u32(0x7FC00000), s), nonfinite


def _fast(scale: jax.Array) -> jax.Array:
    return (scale >= u32(_FAST_SCALE)) | (scale == u32(_ONE))


def _quotient(mag: jax.Array, scale: jax.Array, exact: bool) -> jax.Array:
    """float32 pattern of ``|x| / scale``."""
    if exact:
        return f32.div(mag, scale)
    # Subnormal |x| reads as 0 here, but its quotient is below 2^-26, which
    # rounds to the zero code anyway.
    return f32.hw_div(mag, scale)


def _product(v: jax.Array, scale: jax.Array, exact: bool) -> jax.Array:
    if exact:
        return f32.mul(v, scale)
    return f32.bits(f32.from_bits(v) * f32.from_bits(scale))


# The conditionals take x itself and return the final arrays: an operand or
# result that is a bit-cast view of x would be copied in full across the
# conditional's boundary.


@functools.partial(jax.jit, static_argnums=(1,))
def _quantize(x, element) -> TensorFP8Arrays:
    elem, top, nan_byte = _ELEMENTS[element]
    scale, nonfinite = _scale(x, top)

    def run(exact, x, scale):
        xb = f32.bits(x)
        q = _quotient(xb & u32(f32.ABS), scale, exact)
        code = numerics.encode_magnitude(jnp.where(nonfinite, u32(0), q), 0, elem)
        code = code | lax.shift_right_logical(xb & u32(f32.SIGN), u32(24))
        code = jnp.where(nonfinite, u32(nan_byte), code).astype(jnp.uint8)
        return lax.bitcast_convert_type(code, elem.storage_dtype)

    codes = lax.cond(
        _fast(scale), functools.partial(run, False), functools.partial(run, True), x, scale
    )
    return TensorFP8Arrays(codes, f32.from_bits(scale))


def _decode_codes(codes: jax.Array, elem: ElementFormat) -> jax.Array:
    """float32 patterns of FP8 codes, exactly (Inf and NaN codes included)."""
    b = lax.bitcast_convert_type(codes, jnp.uint8).astype(jnp.uint32)
    m = b & u32(0x7F)
    special = m > u32(elem.max_code)
    v = numerics.decode_magnitude(jnp.where(special, u32(0), m), 0, elem)
    inf = elem.has_inf & (m == u32(elem.max_code + 1))
    v = jnp.where(special, jnp.where(inf, u32(f32.INF), u32(0x7FC00000)), v)
    return v | lax.shift_left(b & u32(0x80), u32(24))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _dequantize(codes, scale, element, dtype) -> jax.Array:
    elem = _ELEMENTS[element][0]
    s = f32.bits(scale)
    m = s & u32(f32.ABS)
    fast = _fast(m) | (m == 0)

    def run(exact, codes, s):
        return numerics.bits_to_dtype(_product(_decode_codes(codes, elem), s, exact), dtype)

    return lax.cond(fast, functools.partial(run, False), functools.partial(run, True), codes, s)


@functools.partial(jax.jit, static_argnums=(1,))
def _fake_quantize(x, element) -> jax.Array:
    elem, top, _ = _ELEMENTS[element]
    scale, nonfinite = _scale(x, top)

    def run(exact, x, scale):
        xb = f32.bits(x)
        q = _quotient(xb & u32(f32.ABS), scale, exact)
        r = numerics.round_magnitude(q, 0, elem)  # saturates at max_normal
        out = _product(r, scale, exact) ^ (xb & u32(f32.SIGN))
        out = jnp.where(nonfinite, u32(0x7FC00000), out)
        return numerics.bits_to_dtype(out, x.dtype)

    return lax.cond(
        _fast(scale), functools.partial(run, False), functools.partial(run, True), x, scale
    )


def tensor_fp8_quantize(x, element: Element = "e4m3") -> TensorFP8Arrays:
    """Quantizes ``x`` to FP8 with one float32 scale for the whole tensor.

    Args:
      x: non-empty float32, bfloat16 or float16 array of any rank.
      element: ``"e4m3"`` (``float8_e4m3fn``, max 448) or ``"e5m2"``
        (``float8_e5m2``, max 57344).

    Returns:
      ``TensorFP8Arrays(codes, scale)``: float8 codes in x's shape and the
      float32 scalar decode scale ``amax / max_normal``. Zeros, tiny amax,
      NaN and Inf: see the module docstring.

    >>> import jax.numpy as jnp
    >>> codes, scale = tensor_fp8_quantize(jnp.array([1.0, -2.0, 3.1, 448.0]))
    >>> codes, scale
    (Array([1, -2, 3, 448], dtype=float8_e4m3fn), Array(1., dtype=float32))
    """
    x = _check_x(x)
    _element(element)
    return _quantize(x, element)


def tensor_fp8_dequantize(codes, scale, *, dtype=jnp.float32) -> jax.Array:
    """``float32(codes) * scale``, the IEEE float32 result (subnormals kept), in ``dtype``.

    The element is read from the codes' dtype (``float8_e4m3fn`` or
    ``float8_e5m2``); bfloat16 and float16 results are rounded from the
    float32 one to nearest even.

    >>> import jax.numpy as jnp
    >>> tensor_fp8_dequantize(*tensor_fp8_quantize(jnp.array([0.1, -7.0])))
    Array([ 0.1015625, -7.       ], dtype=float32)
    """
    codes = jnp.asarray(codes)
    names = {jnp.dtype(jnp.float8_e4m3fn): "e4m3", jnp.dtype(jnp.float8_e5m2): "e5m2"}
    if codes.dtype not in names:
        raise TypeError(f"codes must be float8_e4m3fn or float8_e5m2, got dtype {codes.dtype}")
    scale = jnp.asarray(scale, jnp.float32)
    if scale.shape != ():
        raise ValueError(f"scale must be a scalar, got shape {scale.shape}")
    dtype = numerics.check_out_dtype(dtype)
    return _dequantize(codes, scale, names[codes.dtype], dtype)


def tensor_fp8_fake_quantize(x, element: Element = "e4m3") -> jax.Array:
    """``tensor_fp8_dequantize(*tensor_fp8_quantize(x, element))`` fused, in x's dtype.

    >>> import jax.numpy as jnp
    >>> tensor_fp8_fake_quantize(jnp.array([0.1, -7.0, 448.0 * 3]))  # scale 3
    Array([ 1.0546875e-01, -6.7500000e+00,  1.3440000e+03], dtype=float32)
    """
    x = _check_x(x)
    _element(element)
    return _fake_quantize(x, element)
