"""Bit-exact numerics on float32 bit patterns.

Every conversion in jaxmx runs on the integer bit patterns of float32 values,
never on float arithmetic. Two reasons:

* XLA on CPU (and TPU) flushes float32 subnormals to zero in arithmetic
  (``x * 2.0`` of a subnormal gives 0). MX scales reach 2^-127, so scaled
  values and dequantized results are often subnormal; float arithmetic would
  silently lose them.
* Rounding modes other than round-to-nearest-even (ties away, toward zero,
  stochastic) have no float instruction; on integers they are one add and a
  shift.

The central routine, :func:`encode_magnitude`, rounds ``|x| * 2**-e`` onto
an element grid and returns the element's code magnitude, where ``e`` is an
integer shift (the block's shared exponent, or 0 for elementwise rounding).
Because the shift is applied to the exponent in integers, ``x * 2**-e`` is
never formed in floating point, so no precision is lost at either end of the
float32 range. :func:`decode_magnitude` is the exact inverse direction.

These functions are the bottom layer of jaxmx and work elementwise on
uint32 arrays of any shape; :mod:`jaxmx.quantize` adds blocks and scales.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxmx.formats import ElementFormat

__all__ = [
    "RoundingMode",
    "ROUNDING_MODES",
    "rounding_mode",
    "ROUNDINGS",
    "SCALE_MODES",
    "FLOAT_DTYPES",
    "f32_to_bits",
    "bits_to_f32",
    "u32",
    "bits_to_dtype",
    "check_out_dtype",
    "encode_magnitude",
    "decode_magnitude",
    "round_magnitude",
    "shared_exponent",
]

Rounding = Literal["nearest_even", "nearest_away", "toward_zero", "stochastic"]
ScaleMode = Literal["floor", "rceil", "ceil", "even"]


class RoundingMode(NamedTuple):
    """A rounding as data: what the quantizers read instead of comparing names."""

    name: str
    # Whether it consumes one uniform uint32 per element (a key or a hash).
    random_bits: bool
    # Whether its result depends on the sign (it rounds magnitudes, so a
    # directed mode toward -inf would; every mode here is symmetric).
    sign_dependent: bool
    doc: str


ROUNDING_MODES: dict[str, RoundingMode] = {
    r.name: r
    for r in (
        RoundingMode("nearest_even", False, False, "to nearest, ties to the even code (IEEE)"),
        RoundingMode("nearest_away", False, False, "to nearest, ties away from zero"),
        RoundingMode("toward_zero", False, False, "truncate the magnitude"),
        RoundingMode(
            "stochastic", True, False, "up with probability equal to the dropped fraction"
        ),
    )
}
ROUNDINGS: tuple[str, ...] = tuple(ROUNDING_MODES)


def rounding_mode(name, what: str = "rounding") -> RoundingMode:
    """The record of a rounding name; an unknown name is an error listing the known ones."""
    if not isinstance(name, str) or name not in ROUNDING_MODES:
        raise ValueError(f"unknown {what} {name!r}; allowed: {', '.join(ROUNDINGS)}")
    return ROUNDING_MODES[name]


SCALE_MODES: tuple[str, ...] = ("floor", "rceil", "ceil", "even")

# float32 layout.
_MANT_BITS = 23
_EXP_BIAS = 127
_SIGN_MASK = 0x80000000
_ABS_MASK = 0x7FFFFFFF
_MANT_MASK = 0x007FFFFF
_IMPLICIT = 0x00800000
_INF_BITS = 0x7F800000  # magnitudes at or above this are Inf or NaN
_QNAN_BITS = 0x7FC00000


def u32(v) -> jax.Array:
    """``v`` as a uint32 array: the one spelling of a bit pattern constant."""
    return jnp.asarray(v, jnp.uint32)


def f32_to_bits(x: jax.Array) -> jax.Array:
    """Bit pattern (uint32) of a float32, bfloat16 or float16 array.

    bfloat16 widens by a shift, which keeps its subnormals (an XLA convert on
    a backend that flushes subnormals could lose them); float16 subnormals
    are normal float32 numbers, so its convert is exact everywhere.
    """
    if x.dtype == jnp.bfloat16:
        return lax.shift_left(lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32), u32(16))
    return lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)


def bits_to_f32(bits: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(jnp.asarray(bits).astype(jnp.uint32), jnp.float32)


# The float dtypes jaxmx quantizes from and decodes to.
FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def check_out_dtype(dtype) -> jnp.dtype:
    """``dtype`` as a float dtype jaxmx decodes to, or a TypeError naming it."""
    if dtype is None:
        raise TypeError("dtype must be float32, bfloat16 or float16, got None")
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}") from None
    if not any(dtype == d for d in FLOAT_DTYPES):
        raise TypeError(f"cannot dequantize to {dtype}; allowed: float32, bfloat16, float16")
    return dtype


def bits_to_dtype(bits: jax.Array, dtype) -> jax.Array:
    """float32 bit patterns -> ``dtype``, rounding to nearest even exactly.

    bfloat16 rounds on the integer pattern, so subnormals survive backends
    whose converts flush them; a NaN stays NaN with its sign and top payload
    bits, quieted (what a convert does). float16: a float32 value below
    float16's range is far below 2^-126 only if it rounds to 0 anyway, so the
    plain convert is exact where it matters.
    """
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return bits_to_f32(bits)
    if dtype == jnp.bfloat16:
        lsb = lax.shift_right_logical(bits, jnp.uint32(16)) & jnp.uint32(1)
        nan = (bits & jnp.uint32(0x7FFFFFFF)) > jnp.uint32(0x7F800000)
        rounded = lax.shift_right_logical(bits + jnp.uint32(0x7FFF) + lsb, jnp.uint32(16))
        quiet = lax.shift_right_logical(bits, jnp.uint32(16)) | jnp.uint32(0x40)
        rounded = jnp.where(nan, quiet, rounded).astype(jnp.uint16)
        return lax.bitcast_convert_type(rounded, jnp.bfloat16)
    return bits_to_f32(bits).astype(dtype)


def _normalize(mag: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Splits magnitudes into (floor(log2), 23-bit fraction), subnormals too.

    A subnormal's pattern is its value in units of 2^-149 and is below 2^23,
    so converting the pattern to float is exact and yields its normalized
    exponent and fraction (no per-element count-leading-zeros needed). Zero
    comes out with log2 = -276, far below every grid, so it rounds to 0.
    """
    # Converted as int32 (mag < 2^31): a signed convert is one vector
    # instruction everywhere, an unsigned one is emulated on some CPUs.
    sub = lax.bitcast_convert_type(
        lax.bitcast_convert_type(mag, jnp.int32).astype(jnp.float32), jnp.uint32
    )
    sub = sub - u32(149 << _MANT_BITS)  # wraps: a "biased exponent" <= 0
    norm = lax.bitcast_convert_type(jnp.where(mag < u32(_IMPLICIT), sub, mag), jnp.int32)
    log2 = lax.shift_right_arithmetic(norm, jnp.int32(_MANT_BITS)) - _EXP_BIAS
    frac = lax.bitcast_convert_type(norm, jnp.uint32) & u32(_MANT_MASK)
    return log2, frac


def shared_exponent(
    amax_bits: jax.Array,
    elem: ElementFormat,
    mode: ScaleMode = "floor",
    *,
    min_exponent: int = -127,
    max_exponent: int = 127,
) -> tuple[jax.Array, jax.Array]:
    """Shared exponent of blocks from the bit pattern of their max magnitude.

    Args:
      amax_bits: uint32 bit patterns of the block maxima (sign bit clear).
      elem: the element format (its ``emax`` and mantissa width matter).
      mode: ``"floor"``: floor(log2 amax) - emax (OCP MX v1.0, section 6.3);
        ``"rceil"``: ceil(log2(amax / max_normal)), the smallest scale that
        does not clip (NVIDIA's rule); ``"ceil"``: ceil(log2 amax) - emax;
        ``"even"``: round amax to the element's mantissa width, then floor.
        RCEIL is computed exactly here; implementations that divide in
        float32 agree with it except where amax / max_normal is a float32
        subnormal, a range that is clamped to 2^-127 anyway except within a
        hair of it.
      min_exponent, max_exponent: the range of the scale format.

    Returns:
      ``(e, nonfinite)``: int32 exponents clamped to the scale range (an
      all-zero block gets ``min_exponent``), and a mask of blocks whose max is
      Inf or NaN.
    """
    nonfinite = amax_bits >= u32(_INF_BITS)
    zero = amax_bits == 0
    safe = jnp.where(nonfinite | zero, u32(0x3F800000), amax_bits)  # 1.0 placeholder
    log2, frac = _normalize(safe)
    emax = elem.emax
    if mode == "floor":
        e = log2 - emax
    elif mode == "ceil":
        e = log2 + (frac != 0).astype(jnp.int32) - emax
    elif mode == "rceil":
        # amax / M = 2^(log2 - emax) * (1.frac / 1.frac_M): one more binade
        # exactly when amax's significand exceeds max_normal's.
        m_frac = round((elem.max_normal / 2.0**emax - 1.0) * 2**_MANT_BITS)
        e = log2 + (frac > m_frac).astype(jnp.int32) - emax
    elif mode == "even":
        m = elem.mantissa_bits
        drop = _MANT_BITS - m
        # The kept bit may be the implicit one (mantissa_bits = 0, e.g. INT2).
        lsb = lax.shift_right_logical(frac | u32(_IMPLICIT), u32(drop)) & u32(1)
        rounded = frac + u32((1 << (drop - 1)) - 1) + lsb
        e = log2 + (rounded > u32(_MANT_MASK)).astype(jnp.int32) - emax
    else:
        raise ValueError(f"unknown scale_mode {mode!r}; allowed: {', '.join(SCALE_MODES)}")
    e = jnp.clip(e, min_exponent, max_exponent)
    e = jnp.where(zero, min_exponent, e)
    return e, nonfinite


def _round_shift(
    sig: jax.Array, drop: jax.Array, rounding: Rounding, rbits: jax.Array | None
) -> jax.Array:
    """``sig >> drop`` (uint32) rounded by ``rounding``; ``1 <= drop <= 31``.

    ``sig`` is below 2^24, so every intermediate fits in 32 bits.
    """
    drop = drop.astype(jnp.uint32)
    if rounding == "toward_zero":
        return lax.shift_right_logical(sig, drop)
    half = lax.shift_left(u32(1), drop - 1)
    if rounding == "nearest_away":
        return lax.shift_right_logical(sig + half, drop)
    if rounding == "nearest_even":
        lsb = lax.shift_right_logical(sig, drop) & u32(1)
        return lax.shift_right_logical(sig + half - u32(1) + lsb, drop)
    if rounding == "stochastic":
        if rbits is None:
            raise ValueError("stochastic rounding needs random bits (pass key=...)")
        # Adding a uniform integer in [0, 2^drop) and truncating rounds up with
        # probability (sig mod 2^drop) / 2^drop: unbiased.
        noise = lax.shift_right_logical(rbits.astype(jnp.uint32), u32(32) - drop)
        return lax.shift_right_logical(sig + noise, drop)
    raise ValueError(f"unknown rounding {rounding!r}; allowed: {', '.join(ROUNDINGS)}")


def encode_magnitude(
    mag: jax.Array,
    e: jax.Array | int,
    elem: ElementFormat,
    rounding: Rounding = "nearest_even",
    rbits: jax.Array | None = None,
    *,
    saturate: bool = True,
) -> jax.Array:
    """Rounds ``mag * 2**-e`` to the grid of ``elem``; returns the code magnitude.

    Args:
      mag: uint32 bit patterns of finite magnitudes (sign bit clear).
      e: int32 shift, broadcastable to ``mag`` (a block's shared exponent).
      elem: element format; only ``mantissa_bits``, ``emin``, ``emax`` and
        ``max_code`` are read, so any float-like grid works (bfloat16 too).
      rounding: rounding mode; ``"stochastic"`` needs ``rbits``.
      rbits: uniform uint32 random bits shaped like ``mag``.
      saturate: clamp to ``elem.max_code`` (the MX rule). Without it the
        code may exceed the largest finite code, which callers map to Inf.

    Returns:
      uint32 code magnitudes: ``(biased exponent << mantissa_bits) | mantissa``
      for floats, ``|code|`` for integer formats (the same number, since an
      integer format is a float grid with minimum exponent 0).
    """
    k, uy = _round_significand(mag, e, elem, rounding, rbits)
    # Exponent field of the scaled value; k may carry into the next binade,
    # which the addition performs. Capped so the shift cannot overflow.
    emin = elem.emin
    expo = jnp.clip(uy, emin, elem.emax + 1) - emin
    code = lax.shift_left(expo.astype(jnp.uint32), u32(elem.mantissa_bits)) + k
    if saturate:
        code = jnp.minimum(code, u32(elem.max_code))
    return code


def _round_significand(mag, e, elem: ElementFormat, rounding, rbits):
    """The rounding step shared by :func:`encode_magnitude` and :func:`round_magnitude`.

    Returns ``(k, uy)``: the rounded value is ``k * 2**(max(uy, emin) - m)`` in
    units of the block scale, with ``k <= 2**(m + 1)`` (a carry included), and
    ``uy`` the unbiased exponent of ``mag * 2**-e``.
    """
    m = elem.mantissa_bits
    log2, frac = _normalize(mag)
    # value = sig * 2^(log2 - 23) with the leading bit of sig at bit 23.
    sig = frac | u32(_IMPLICIT)
    uy = log2 - e
    # Bits to drop: 23 - m within a binade, more below the element's min normal.
    drop = (_MANT_BITS - m) + jnp.maximum(elem.emin - uy, 0)
    if rounding == "stochastic":
        # Beyond 31 dropped bits, pre-shift so the noise still fits in 32 bits
        # (a bias of at most 2^-31 of a grid step).
        excess = jnp.maximum(drop - 31, 0)
        sig = lax.shift_right_logical(sig, excess.astype(jnp.uint32))
        drop = drop - excess
    else:
        # sig < 2^24, so dropping 31 bits already rounds to 0 in every mode.
        drop = jnp.minimum(drop, 31)
    return _round_shift(sig, drop, rounding, rbits), uy


def round_magnitude(
    mag: jax.Array,
    e: jax.Array | int,
    elem: ElementFormat,
    rounding: Rounding = "nearest_even",
    rbits: jax.Array | None = None,
) -> jax.Array:
    """float32 pattern of ``mag`` rounded onto the grid ``2**e * elem``, saturated.

    The fused form of ``decode_magnitude(encode_magnitude(mag, e, ...), e)``
    (same bits), which skips the element code: the value ``k * 2**t`` is
    assembled from the rounded significand directly, and saturation is one
    integer ``min`` against the pattern of the largest grid value, which is
    computed per distinct ``e`` (per block) rather than per element.
    """
    k, uy = _round_significand(mag, e, elem, rounding, rbits)
    t = jnp.maximum(uy, elem.emin) - elem.mantissa_bits + e
    bits = _assemble(k, t)
    # Largest grid value; above float32 it is Inf (MX values reach 448 * 2^127).
    top = _assemble(u32(_max_significand(elem)), _max_exponent(elem) + e)
    return jnp.minimum(bits, top)


def _max_significand(elem: ElementFormat) -> int:
    return round(elem.max_normal / 2.0 ** (elem.emax - elem.mantissa_bits))


def _max_exponent(elem: ElementFormat) -> int:
    return elem.emax - elem.mantissa_bits


def _assemble(k: jax.Array, t: jax.Array) -> jax.Array:
    """float32 pattern of ``k * 2**t`` for integers ``0 <= k < 2**24``, exactly.

    Subnormal results are built as subnormal patterns (no float arithmetic
    that could flush them); results above float32 become patterns at or
    above Inf's, which callers clamp.
    """
    t = jnp.asarray(t, jnp.int32)
    # Exact (k < 2^24); through int32 for the signed vector convert.
    fb = lax.bitcast_convert_type(k.astype(jnp.int32).astype(jnp.float32), jnp.uint32)
    lead = lax.shift_right_logical(fb, u32(_MANT_BITS)).astype(jnp.int32)  # 127 + log2(k)
    normal = (lead + t >= 1) & (lead > 0)
    as_normal = fb + lax.shift_left(t.astype(jnp.uint32), u32(_MANT_BITS))
    as_normal = jnp.where(lead + t >= 255, u32(_INF_BITS), as_normal)
    as_sub = lax.shift_left(k, jnp.clip(t + 149, 0, 31).astype(jnp.uint32))
    return jnp.where(normal, as_normal, as_sub)


def decode_magnitude(code: jax.Array, e: jax.Array | int, elem: ElementFormat) -> jax.Array:
    """float32 bit pattern (uint32) of ``value(code) * 2**e``, exactly.

    Args:
      code: uint32 code magnitudes as returned by :func:`encode_magnitude`.
      e: int32 shift broadcastable to ``code``. Every MX value down to the
        smallest (2^-9 * 2^-127) is a float32 number, subnormals included,
        so the result is exact; values above the float32 range (up to
        448 * 2^127) become Inf, the IEEE result of the conversion.
      elem: the element format.
    """
    m = elem.mantissa_bits
    field = lax.shift_right_logical(code, u32(m)).astype(jnp.int32)
    eff = jnp.maximum(field, 1)
    # value = sig * 2^t with sig < 2^(m + 1).
    sig = code - lax.shift_left((eff - 1).astype(jnp.uint32), u32(m))
    return _assemble(sig, eff - elem.bias - m + e)
