"""NVFP4: FP4 E2M1 elements, an E4M3 scale per 16 elements, a float32 scale per tensor.

NVIDIA's Blackwell format. Semantics are TransformerEngine's (``quantize_nvfp4``
and ``dequantize_nvfp4.cuh``), every step one float32 operation rounded to
nearest even, exactly as below (``e4m3`` rounds to nearest even to
``float8_e4m3fn``; ``fp4`` rounds to nearest E2M1 value, ties to the even
code, saturating at 6 and keeping the sign, so -0.0 gives code 8)::

    amax    = max |x|  (or tensor_amax)
    S_enc   = min(2688 / amax, FLT_MAX); S_enc = 1 if amax == 0 or S_enc == 0
    s8      = e4m3(min(block_amax * (S_enc * f32(1/6)), 448))   # one rounding, no lower clamp
    s_dec   = 1 / S_enc                                         # the tensor scale jaxmx stores
    encode  = min(1 / (s8 * s_dec), FLT_MAX)                    # a zero scale gives FLT_MAX
    code    = fp4(x * encode)
    value   = E2M1(code) * (s8 * s_dec)                         # dequantize
    value'  = E2M1(code) * ((s8 * amax) * f32(1/2688))          # TE's kernel (decode="amax")

2688 = 448 * 6, the largest E4M3 scale times the largest E2M1 value. The two
decodes differ by up to 2 ulp; jaxmx stores ``1 / S_enc`` and decodes with it
unless asked for TE's kernel formula (which needs the amax).

What the formulas give at the edges, which jaxmx follows:

* Zeros: an all-zero block gets the scale byte 0x00, codes 0 (8 for -0.0)
  and decodes to signed zeros; an all-zero tensor gets ``S_enc = 1``, the
  tensor scale 1, and the same.
* Tiny inputs: nothing is flushed. A block of float32 subnormals gets a
  nonzero scale when the tensor amax is small enough, and under a zero
  scale (encode factor FLT_MAX) its elements still get nonzero codes that
  decode to 0. ``S_enc`` is clamped at FLT_MAX, so a tensor whose amax is
  below ``2688 / FLT_MAX`` (about 2^-116.6) decodes to a fixed fraction of
  its values. XLA:CPU flushes float32 subnormals, so every step that can
  reach one is computed on integers (:mod:`jaxmx.families._f32`).
* Huge inputs: the block scale saturates at 448 and elements at 6.
* NaN: a NaN in x makes the tensor amax NaN, so every block scale is NaN
  (byte 0x7F) and everything decodes to NaN. With a finite ``tensor_amax``
  given, only the blocks holding a NaN get the NaN scale. Elements of a
  NaN-scale block get code 0 with x's sign (the reference implementations
  compute a code from NaN payload bits there, which nothing reads).
* Inf: an Inf makes the amax Inf, ``S_enc = 2688 / Inf = 0`` falls back to
  1, the Inf's block gets scale 448 and the Inf saturates to code +-6. The
  stored decode stays finite; TE's kernel formula multiplies by amax = Inf,
  so with ``decode="amax"`` every element decodes to +-Inf (NaN for zero
  codes).

torchao's ``NVFP4Tensor`` (``semantics="torchao"``) rounds the scale
differently: ``pts = amax / 2688``, ``s8 = e4m3(clamp((block_amax / 6) /
pts, 2^-6, 448))``, ``code = fp4(x * ((1 / pts) / s8))``, ``value =
E2M1(code) * (pts * s8)``; it floors block scales at 2^-6 (an all-zero block
gets byte 0x08) and an all-zero tensor gives ``pts = 0`` and NaN scales
(byte 0xFF). ``semantics="torchao_1level"`` is its single-level mode
(``pts = 1``). The two agree with TE on ordinary data and differ where
block scales fall below 2^-6, at some E4M3 midpoints (TE rounds once, torchao
twice) and for degenerate amax. jaxmx matches torchao bit for bit while
``1 / pts`` and the encode factor stay finite (tensor amax above about
2^-110); below that torchao's own arithmetic turns zeros into NaN products,
whose codes jaxmx does not reproduce.

Blocks run along one axis (``block_size=16``), or are 2-D tiles over two
axes (``block_size=(16, 16)``, TE's weight scaling, so a weight and its
transpose share codes). Lengths that are not a multiple of the block are
refused: TransformerEngine and torchao reject partial blocks, so there is no
reference to follow.

References: NVIDIA TransformerEngine (``transformer_engine/common/cast/nvfp4``);
torchao ``prototype/mx_formats/nvfp4_tensor.py``; "Pretraining Large Language
Models with NVFP4" (NVIDIA, arXiv 2509.25149).
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmx import numerics
from jaxmx.families import _f32 as f32
from jaxmx.formats import FP4_E2M1, FP8_E4M3
from jaxmx.numerics import u32

__all__ = [
    "NVFP4Arrays",
    "nvfp4_dequantize",
    "nvfp4_encode",
    "nvfp4_fake_quantize",
    "nvfp4_quantize",
    "nvfp4_quantize_4over6",
]

Semantics = Literal["te", "torchao", "torchao_1level"]
SEMANTICS = ("te", "torchao", "torchao_1level")
DECODES = ("scale", "amax")

# float32 constants as bit patterns.
_ONE = 0x3F800000  # 1.0
_ONE_SIXTH = 0x3E2AAAAB  # f32(1) / f32(6) = 0.16666667163372040
_RANGE = 0x45280000  # 2688.0 = 448 * 6
_RANGE_4OVER6 = 0x44C00000  # 1536.0 = 256 * 6: Four Over Six's tensor scale
_ONE_QUARTER = 0x3E800000  # 0.25 = f32(1) / f32(4), exact
_INV_RANGE = 0x39C30C31  # f32(1) / f32(2688) = 3.7202381e-4
_SIX = 0x40C00000  # 6.0
_E4M3_MAX = 0x43E00000  # 448.0 = 0x1.Cp8, E4M3 code 0x7E
_TORCHAO_FLOOR = 0x3C800000  # 2^-6, torchao's smallest block scale (E4M3 min normal)
_E4M3_NAN = 0x7F
_NORMAL_DECODE = 0x01000000  # 2^-125: value * d stays normal for every nonzero E2M1 value
# E2M1 rounding thresholds, as float32 patterns: a magnitude steps up one
# code when it exceeds a midpoint whose lower neighbour has an odd code
# (0.25 ties to 0, 1.25 to 1, 2.5 to 2, 5 to 4) and when it reaches one
# whose upper neighbour has an even code (0.75, 1.75, 3.5).
_ABOVE = (0x3E800000, 0x3FA00000, 0x40200000, 0x40A00000)  # 0.25, 1.25, 2.5, 5.0
_AT_OR_ABOVE = (0x3F400000, 0x3FE00000, 0x40600000)  # 0.75, 1.75, 3.5


class NVFP4Arrays(NamedTuple):
    """The arrays of an NVFP4 tensor."""

    codes: jax.Array  # uint8 E2M1 codes (sign in bit 3), x's shape
    block_scales: jax.Array  # float8_e4m3fn, x's shape with each blocked axis // its block
    tensor_scale: jax.Array  # float32 scalar decode scale (TE: 1 / S_enc; torchao: amax / 2688)


# --------------------------------------------------------------------------
# Arguments.
# --------------------------------------------------------------------------


def _check_x(x) -> jax.Array:
    x = jnp.asarray(x)
    if not any(x.dtype == d for d in numerics.FLOAT_DTYPES):
        raise TypeError(
            f"x has dtype {x.dtype}; NVFP4 quantization takes float32, bfloat16 or float16"
        )
    return x


def _layout(shape, axis, block_size) -> tuple[tuple[int, ...], tuple[int, ...]]:
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


def _check_semantics(semantics, tiles: bool, tensor_amax) -> str:
    if semantics not in SEMANTICS:
        raise ValueError(f"unknown semantics {semantics!r}; allowed: {', '.join(SEMANTICS)}")
    if tiles and semantics != "te":
        raise ValueError("2-D tiles are TransformerEngine's; torchao scales 1x16 blocks only")
    if semantics == "torchao_1level" and tensor_amax is not None:
        raise ValueError("semantics='torchao_1level' has no tensor scale: drop tensor_amax")
    return semantics


def _check_rbits(rbits, shape):
    if rbits is None:
        return None
    rbits = jnp.asarray(rbits)
    if rbits.dtype != jnp.uint32 or rbits.shape != tuple(shape):
        raise ValueError(
            f"rbits must be uint32 random bits of x's shape {tuple(shape)}, got "
            f"{rbits.dtype}{tuple(rbits.shape)}"
        )
    return rbits


def _check_amax(tensor_amax):
    if tensor_amax is None:
        return None
    a = jnp.asarray(tensor_amax)
    if a.shape != () or a.dtype.kind not in "fiu":
        raise TypeError(f"tensor_amax must be a real scalar, got {tensor_amax!r}")
    if not isinstance(a, jax.core.Tracer) and np.asarray(a) < 0:
        raise ValueError(f"tensor_amax must be >= 0 (an amax), got {float(a)}")
    return a.astype(jnp.float32)


# --------------------------------------------------------------------------
# Blocks.
# --------------------------------------------------------------------------


def _split(a: jax.Array, axes, sizes) -> tuple[jax.Array, tuple[int, ...]]:
    """Each blocked axis n -> (n // b, b); returns the array and the within-block axes."""
    pos = [a.ndim + ax for ax in axes]  # increasing
    shape = list(a.shape)
    for p, b in zip(reversed(pos), reversed(sizes), strict=True):
        shape[p : p + 1] = [shape[p] // b, b]
    within = tuple(p + 1 + i for i, p in enumerate(pos))
    return a.reshape(shape), within


def _scale_shape(shape, axes, sizes) -> tuple[int, ...]:
    s = list(shape)
    for a, b in zip(axes, sizes, strict=True):
        s[a] //= b
    return tuple(s)


# --------------------------------------------------------------------------
# The scale chain: per tensor (scalars, always on integers) and per block.
# --------------------------------------------------------------------------
#
# Every step is an IEEE float32 operation. XLA:CPU flushes subnormal
# operands and results, so each chain has two forms: a fast one in float
# arithmetic, taken when the tensor scale keeps every per-block quantity and
# every decoded value normal (which the bounds in _FAST_* guarantee), and an
# exact one on integers (jaxmx.families._f32) for the rest: tensors whose amax
# is below about 2^-100, and NaN amax. A lax.cond picks one per tensor.

# TE: with s_dec = 1 / S_enc >= 2^-115, every nonzero decode factor s8 * s_dec
# is >= 2^-124, so 0.5 * it is normal, and 1 / it is finite.
_FAST_TE = 0x06000000  # 2^-115
# torchao: with pts >= 2^-100 and s8 >= 2^-6 the same holds with room to spare,
# and a block amax whose quotient could be subnormal clamps to 2^-6 anyway.
_FAST_TORCHAO = 0x0D800000  # 2^-100


class _Tensor(NamedTuple):
    """Per-tensor float32 patterns (uint32 scalars)."""

    tensor_scale: jax.Array  # TE: s_dec = 1 / S_enc; torchao: pts = amax / 2688
    s_enc: jax.Array  # TE: S_enc; torchao: 1 / pts
    factor: jax.Array  # TE: S_enc * f32(1/6); torchao: unused (zero)
    amax: jax.Array  # the amax used
    fast: jax.Array  # bool: the float forms are exact for this tensor


class _Blocks(NamedTuple):
    """Per-block quantities, kept-dims block layout."""

    s8: jax.Array  # uint8 E4M3 scale bytes
    enc: jax.Array  # uint32 float32 encode factor (NaN in NaN blocks)
    dec: jax.Array  # uint32 float32 decode factor, s8 * tensor_scale


def _min_bits(v: jax.Array, cap: int) -> jax.Array:
    # min(v, cap) of a float32 pattern v with cap > 0, NaN propagating as np.minimum.
    m = v & u32(f32.ABS)
    return jnp.where((v < u32(f32.SIGN)) & (m > u32(cap)) & (m <= u32(f32.INF)), u32(cap), v)


def _e4m3(v: jax.Array) -> jax.Array:
    """Round-to-nearest-even E4M3 byte of float32 patterns with |v| <= 448; NaN -> 0x7F/0xFF."""
    m = v & u32(f32.ABS)
    nan = m > u32(f32.INF)
    code = numerics.encode_magnitude(jnp.where(nan, u32(0), m), 0, FP8_E4M3)
    code = jnp.where(nan, u32(_E4M3_NAN), code)
    return (code | lax.shift_right_logical(v & u32(f32.SIGN), u32(24))).astype(jnp.uint8)


def _e4m3_to_f32(s8: jax.Array) -> jax.Array:
    b = s8.astype(jnp.uint32)
    m = b & u32(0x7F)
    out = numerics.decode_magnitude(jnp.where(m == _E4M3_NAN, u32(0), m), 0, FP8_E4M3)
    out = jnp.where(m == _E4M3_NAN, u32(0x7FC00000), out)
    return out | lax.shift_left(b & u32(0x80), u32(24))


def _e4m3_float(v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(byte, value pattern)`` of the E4M3 rounding of nonnegative patterns ``v <= 448``.

    The float form of :func:`_e4m3` (same results): adding and subtracting
    ``1.5 * 2^(23 + s)`` rounds to a multiple of E4M3's spacing ``2^s`` in
    v's binade (``2^-9`` below 2^-6) with the hardware's ties-to-even. A
    subnormal pattern reads as 0 and rounds to 0, as it must (it is far
    below 2^-10). NaN gives 0x7F.
    """
    field = jnp.minimum(lax.shift_right_logical(v, u32(23)), u32(135))  # 448 < 2^9
    magic = f32.from_bits(
        lax.shift_left(jnp.maximum(field + u32(20), u32(141)), u32(23)) | u32(0x00400000)
    )
    r = f32.bits((f32.from_bits(v) + magic) - magic)
    sub = (f32.from_bits(r) * jnp.float32(512.0)).astype(jnp.int32).astype(jnp.uint32)
    byte = jnp.where(r >= u32(_TORCHAO_FLOOR), lax.shift_right_logical(r, u32(20)) - u32(960), sub)
    nan = r > u32(f32.INF)
    return jnp.where(nan, u32(_E4M3_NAN), byte).astype(jnp.uint8), r


def _fmul(a, b) -> jax.Array:
    return f32.bits(f32.from_bits(a) * f32.from_bits(b))


def _fdiv(a, b) -> jax.Array:
    return f32.hw_div(a, b)


def _tensor(block_amax, tensor_amax, semantics: str, range_bits: int = _RANGE) -> _Tensor:
    if tensor_amax is None:
        # Integer max: NaN above Inf above every finite value. An empty tensor
        # has amax 0 (as TE's amax reduction starts from 0): its tensor scale
        # is then the degenerate 1, as for an all-zero tensor.
        amax = jnp.max(block_amax, initial=u32(0))
    else:
        amax = f32.bits(tensor_amax) & u32(f32.ABS)
    if semantics == "te":
        s_enc = _min_bits(f32.div(u32(range_bits), amax), f32.FLT_MAX)
        degenerate = ((amax & u32(f32.ABS)) == 0) | ((s_enc & u32(f32.ABS)) == 0)
        s_enc = jnp.where(degenerate, u32(_ONE), s_enc)
        s_dec = f32.div(u32(_ONE), s_enc)
        factor = f32.mul(s_enc, u32(_ONE_SIXTH))
        fast = (s_dec >= u32(_FAST_TE)) & (s_dec < u32(f32.INF))
        return _Tensor(s_dec, s_enc, factor, amax, fast)
    pts = f32.div(amax, u32(_RANGE)) if semantics == "torchao" else u32(_ONE)
    fast = (pts >= u32(_FAST_TORCHAO)) & (pts < u32(f32.INF))
    return _Tensor(pts, f32.div(u32(_ONE), pts), u32(0), amax, fast)


def _te_blocks(block_amax, t: _Tensor, exact: bool) -> _Blocks:
    # One rounding for the product: block_amax * (S_enc * f32(1/6)), then min(., 448).
    if exact:
        s8 = _e4m3(_min_bits(f32.mul(block_amax, t.factor), _E4M3_MAX))
        dec = f32.mul(_e4m3_to_f32(s8), t.tensor_scale)
        enc = _min_bits(f32.div(u32(_ONE), dec), f32.FLT_MAX)
    else:
        s8, s8f = _e4m3_float(_min_bits(_scaled_magnitude(block_amax, t.factor), _E4M3_MAX))
        dec = _fmul(s8f, t.tensor_scale)
        enc = _min_bits(_fdiv(u32(_ONE), dec), f32.FLT_MAX)
    return _Blocks(s8, enc, dec)


def _torchao_blocks(block_amax, t: _Tensor, exact: bool) -> _Blocks:
    pts = t.tensor_scale
    if exact:
        q = f32.div(f32.div(block_amax, u32(_SIX)), pts)
    else:
        # A subnormal block amax reads as 0 here; its quotient would be far
        # below 2^-6 and clamp to it all the same.
        q = _fdiv(_fdiv(block_amax, u32(_SIX)), pts)
    # clamp(q, 2^-6, 448), NaN passing through.
    m = q & u32(f32.ABS)
    low = ((q >= u32(f32.SIGN)) & (m <= u32(f32.INF))) | (q < u32(_TORCHAO_FLOOR))
    q = jnp.where(low, u32(_TORCHAO_FLOOR), _min_bits(q, _E4M3_MAX))
    if exact:
        s8 = _e4m3(q)
        s8f = _e4m3_to_f32(s8)
        return _Blocks(s8, f32.div(t.s_enc, s8f), f32.mul(pts, s8f))
    s8, s8f = _e4m3_float(q)
    return _Blocks(s8, _fdiv(t.s_enc, s8f), _fmul(pts, s8f))


def _blocks(block_amax, t: _Tensor, semantics: str, exact: bool) -> _Blocks:
    if semantics == "te":
        return _te_blocks(block_amax, t, exact)
    return _torchao_blocks(block_amax, t, exact)


def _amax_decode(s8: jax.Array, amax: jax.Array, exact: bool) -> jax.Array:
    # TE's dequantize kernel: (s8 * amax) * f32(1/2688).
    s8f = _e4m3_to_f32(s8)
    if exact:
        return f32.mul(f32.mul(s8f, amax), u32(_INV_RANGE))
    return _fmul(_fmul(s8f, amax), u32(_INV_RANGE))


# --------------------------------------------------------------------------
# Elements.
# --------------------------------------------------------------------------


def _scaled_magnitude(mag: jax.Array, enc: jax.Array) -> jax.Array:
    """float32 pattern of ``|x| * enc`` as IEEE computes it, subnormal ``|x|`` included.

    ``enc`` is a positive factor (or Inf/NaN). One float multiply; where
    ``|x|`` is a float32 subnormal (which XLA:CPU would read as 0) the
    product is formed as ``bits(|x|) * (enc * 2^-49)`` (the pattern is |x|
    in units of 2^-149, an exact integer), which rounds to the same
    significand, and moved down 100 binades on the pattern. A result that
    would be subnormal comes out as a pattern below 2^-126, below every
    rounding threshold that follows, so the code is exact.
    """
    p = _fmul(mag, enc)
    enc_lo = jnp.where(
        enc >= u32(f32.INF),
        enc,
        jnp.where(enc > u32(50 << 23), enc - u32(49 << 23), u32(0)),
    )
    p_lo = f32.bits(
        lax.bitcast_convert_type(mag, jnp.int32).astype(jnp.float32) * f32.from_bits(enc_lo)
    )
    shifted = jnp.where(p_lo > u32(100 << 23), p_lo - u32(100 << 23), u32(0))
    p_lo = jnp.where(p_lo >= u32(f32.INF), p_lo, shifted)
    return jnp.where(mag < u32(0x00800000), p_lo, p)


def _round_e2m1(p: jax.Array) -> jax.Array:
    """float32 pattern of the E2M1 value nearest to magnitude ``p`` (ties to even), <= 6.

    Adding and subtracting ``1.5 * 2^(23 + s)`` rounds to a multiple of
    ``2^s`` in the hardware's round-to-nearest-even; ``2^s`` is E2M1's
    spacing in p's binade (0.5 below 2, 1 in [2, 4), 2 from 4 on), and an
    even multiple is the even code at every midpoint (0.25 -> 0, 0.75 -> 1,
    1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4). A subnormal ``p``
    (read as 0) and every ``p`` below 0.25 give 0.
    """
    field = jnp.minimum(lax.shift_right_logical(p, u32(23)), u32(130))  # p >= 8 saturates
    magic = f32.from_bits(
        lax.shift_left(jnp.maximum(field + u32(22), u32(149)), u32(23)) | u32(0x00400000)
    )
    r = (f32.from_bits(p) + magic) - magic
    return f32.bits(jnp.minimum(r, jnp.float32(6.0)))


def _code_of(r: jax.Array) -> jax.Array:
    # E2M1 value pattern -> code magnitude: 0, 0.5 -> 0, 1; 2^k * (1 + m/2) -> 2k + 2 + m.
    return jnp.where(
        r >= u32(_ONE),
        lax.shift_right_logical(r, u32(22)) - u32(252),
        jnp.where(r == u32(0x3F000000), u32(1), u32(0)),
    )


def _round(p: jax.Array, rbits: jax.Array | None) -> jax.Array:
    """E2M1 value pattern of magnitude ``p``: nearest even, or stochastic given ``rbits``.

    Stochastic: up to the next E2M1 value with probability equal to the
    fraction of the step below it, saturating at 6 (p >= 6 gives 6).
    """
    if rbits is None:
        return _round_e2m1(p)
    return numerics.round_magnitude(p, 0, FP4_E2M1, "stochastic", rbits)


def _codes(xb: jax.Array, enc: jax.Array, nan_block: jax.Array, rbits=None) -> jax.Array:
    """uint8 E2M1 codes of the elements (blocked layout); NaN blocks get signed zero codes."""
    c = _code_of(_round(_scaled_magnitude(xb & u32(f32.ABS), enc), rbits))
    c = jnp.where(nan_block, u32(0), c)
    return (c | lax.shift_right_logical(xb & u32(f32.SIGN), u32(28))).astype(jnp.uint8)


def _values(v: jax.Array, dec: jax.Array, exact: bool) -> jax.Array:
    """float32 patterns of ``v * dec`` (v: signed E2M1 value patterns)."""
    return f32.mul(v, dec) if exact else _fmul(v, dec)


# --------------------------------------------------------------------------
# Jitted kernels.
# --------------------------------------------------------------------------


def _prepare(x, tensor_amax, axes, sizes, semantics, range_bits: int = _RANGE):
    xb, within = _split(f32.bits(x), axes, sizes)
    # Materialized (a barrier): fused into its consumers, XLA:CPU recomputes
    # the block max per element or stores |x| in full.
    block_amax = lax.optimization_barrier(jnp.max(xb & u32(f32.ABS), axis=within, keepdims=True))
    return within, block_amax, _tensor(block_amax, tensor_amax, semantics, range_bits)


def _branches(fn):
    """``lax.cond(fast, fn(exact=False), fn(exact=True), *args)``."""
    return lambda fast, *args: lax.cond(
        fast, functools.partial(fn, False), functools.partial(fn, True), *args
    )


# The conditionals take x itself and return the final dtype: an operand or
# result that is a bit-cast view of x would be copied in full across the
# conditional's boundary.


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _quantize(x, tensor_amax, axes, sizes, semantics, rbits=None) -> NVFP4Arrays:
    within, block_amax, t = _prepare(x, tensor_amax, axes, sizes, semantics)

    def run(exact, x, block_amax, t, rbits):
        b = lax.optimization_barrier(_blocks(block_amax, t, semantics, exact))
        nan_block = (b.s8 & jnp.uint8(0x7F)) == jnp.uint8(_E4M3_NAN)
        xb, _ = _split(f32.bits(x), axes, sizes)
        rb = None if rbits is None else _split(rbits, axes, sizes)[0]
        return _codes(xb, b.enc, nan_block, rb).reshape(x.shape), b.s8

    codes, s8 = _branches(run)(t.fast, x, block_amax, t, rbits)
    scales = lax.bitcast_convert_type(jnp.squeeze(s8, within), jnp.float8_e4m3fn)
    return NVFP4Arrays(codes, scales, f32.from_bits(t.tensor_scale))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _fake_quantize(x, tensor_amax, axes, sizes, semantics, decode, rbits=None) -> jax.Array:
    _, block_amax, t = _prepare(x, tensor_amax, axes, sizes, semantics)

    def run(exact, x, block_amax, t, rbits):
        b = _blocks(block_amax, t, semantics, exact)
        dec = b.dec if decode == "scale" else _amax_decode(b.s8, t.amax, exact)
        enc, dec = lax.optimization_barrier((b.enc, dec))
        xb, _ = _split(f32.bits(x), axes, sizes)
        rb = None if rbits is None else _split(rbits, axes, sizes)[0]
        r = _round(_scaled_magnitude(xb & u32(f32.ABS), enc), rb)
        # A NaN block's decode factor is NaN: no need to mask its codes.
        out = _values(r | (xb & u32(f32.SIGN)), dec, exact)
        return numerics.bits_to_dtype(out.reshape(x.shape), x.dtype)

    return _branches(run)(t.fast, x, block_amax, t, rbits)


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _dequantize(codes, block_scales, factor, axes, sizes, dtype, from_amax) -> jax.Array:
    """``factor`` is the tensor scale, or with ``from_amax`` the amax of TE's kernel formula."""
    s8 = jnp.expand_dims(
        lax.bitcast_convert_type(block_scales, jnp.uint8), _split(codes, axes, sizes)[1]
    )
    fb = f32.bits(factor)
    m = fb & u32(f32.ABS)
    # Fast (float) where every nonzero decode factor and value stays normal.
    fast = (m >= u32(_FAST_TORCHAO if from_amax else _FAST_TE)) | (m == 0)

    def run(exact, codes, s8, fb):
        if from_amax:
            dec = _amax_decode(s8, fb & u32(f32.ABS), exact)
        else:
            s8f = _e4m3_to_f32(s8)
            dec = f32.mul(s8f, fb) if exact else _fmul(s8f, fb)
        dec = lax.optimization_barrier(dec)
        cb, _ = _split(codes.astype(jnp.uint32), axes, sizes)
        c = cb & u32(7)
        v = jnp.where(c >= 2, lax.shift_left(c + u32(252), u32(22)), c * u32(0x3F000000))
        out = _values(v | lax.shift_left(cb & u32(8), u32(28)), dec, exact)
        return numerics.bits_to_dtype(out.reshape(codes.shape), dtype)

    return _branches(run)(fast, codes, s8, fb)


# --------------------------------------------------------------------------
# Post-training: Four Over Six, and encoding onto given scales.
# --------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(2, 3))
def _four_over_six(x, tensor_amax, axes, sizes, importance=None) -> NVFP4Arrays:
    within, block_amax, t = _prepare(x, tensor_amax, axes, sizes, "te", _RANGE_4OVER6)
    factor4 = f32.mul(t.s_enc, u32(_ONE_QUARTER))

    def run(exact, x, block_amax, t, factor4, importance):
        xb, _ = _split(f32.bits(x), axes, sizes)
        mag = xb & u32(f32.ABS)
        ref = f32.from_bits(mag)
        imp = None if importance is None else _split(importance, axes, sizes)[0]
        picks = []
        for factor in (t.factor, factor4):  # block amax -> 6, then -> 4
            b = _blocks(block_amax, t._replace(factor=factor), "te", exact)
            r = _round(_scaled_magnitude(mag, b.enc), None)
            sq = jnp.square(f32.from_bits(_values(r, b.dec, exact)) - ref)
            sq = sq if imp is None else sq * imp
            picks.append((b.s8, r, jnp.sum(sq, axis=within, keepdims=True)))
        (s8_6, r6, err6), (s8_4, r4, err4) = picks
        four = err4 < err6  # strict: ties (and NaN blocks) keep 6
        s8 = jnp.where(four, s8_4, s8_6)
        nan_block = (s8 & jnp.uint8(0x7F)) == jnp.uint8(_E4M3_NAN)
        c = jnp.where(nan_block, u32(0), _code_of(jnp.where(four, r4, r6)))
        c = c | lax.shift_right_logical(xb & u32(f32.SIGN), u32(28))
        return c.astype(jnp.uint8).reshape(x.shape), s8

    codes, s8 = _branches(run)(t.fast, x, block_amax, t, factor4, importance)
    scales = lax.bitcast_convert_type(jnp.squeeze(s8, within), jnp.float8_e4m3fn)
    return NVFP4Arrays(codes, scales, f32.from_bits(t.tensor_scale))


@functools.partial(jax.jit, static_argnums=(3, 4))
def _encode(x, block_scales, tensor_scale, axes, sizes) -> jax.Array:
    xb, within = _split(f32.bits(x), axes, sizes)
    s8 = jnp.expand_dims(lax.bitcast_convert_type(block_scales, jnp.uint8), within)
    # TE's chain from the scale on (exact integer forms: per block, cheap).
    dec = f32.mul(_e4m3_to_f32(s8), f32.bits(tensor_scale))
    enc = _min_bits(f32.div(u32(_ONE), dec), f32.FLT_MAX)
    nan_block = (s8 & jnp.uint8(0x7F)) == jnp.uint8(_E4M3_NAN)
    return _codes(xb, enc, nan_block).reshape(x.shape)


# --------------------------------------------------------------------------
# Public functions.
# --------------------------------------------------------------------------


def nvfp4_quantize(
    x,
    *,
    axis: int | tuple[int, int] = -1,
    block_size: int | tuple[int, int] = 16,
    tensor_amax=None,
    semantics: Semantics = "te",
    rbits=None,
) -> NVFP4Arrays:
    """Quantizes ``x`` to NVFP4: E2M1 codes, E4M3 block scales, a float32 tensor scale.

    Args:
      x: float32, bfloat16 or float16 array (bfloat16/float16 widen exactly).
      axis: the axis blocks run along; with a pair ``block_size``, a pair of
        axes (default: the last two).
      block_size: 16 (NVFP4's 1x16 blocks), or a pair such as ``(16, 16)``
        for 2-D tiles (TE's weight scaling). Every blocked length must be a
        multiple of its block.
      tensor_amax: the amax that sets the tensor scale (calibrated, or the
        same for every shard); default ``max |x|`` (NaN if x holds a NaN).
        Must be >= 0. A float32 scalar or array; may be traced.
      semantics: ``"te"`` (TransformerEngine, default), ``"torchao"``
        (torchao's two-level ``NVFP4Tensor``) or ``"torchao_1level"``.
      rbits: uniform uint32 random bits in x's shape: round each scaled
        element to E2M1 stochastically (up with probability equal to the
        fraction of its step) instead of to nearest even; the scales are
        unchanged. The gradients of NVFP4 training (arXiv 2509.25149).

    Returns:
      ``NVFP4Arrays(codes, block_scales, tensor_scale)``: uint8 E2M1 codes
      (sign in bit 3; code 8 is -0.0) in x's shape; ``float8_e4m3fn`` block
      scales in x's shape with each blocked axis divided by its block size;
      the float32 scalar decode scale (TE: ``1 / S_enc``; torchao:
      ``amax / 2688``; single level: 1). See the module docstring for every
      step and for zeros, NaN and Inf.

    Raises:
      ValueError: partial blocks, axis out of range, unknown semantics,
        negative ``tensor_amax``, tiles with torchao semantics.
      TypeError: non-float input, malformed ``axis``/``block_size``.

    >>> import jax.numpy as jnp
    >>> x = jnp.array([[0.0] * 14 + [-0.3, 6.0]])
    >>> codes, scales, ts = nvfp4_quantize(x)
    >>> codes[0, -2:], scales
    (Array([9, 7], dtype=uint8), Array([[448]], dtype=float8_e4m3fn))
    >>> ts  # 1 / S_enc = amax / 2688
    Array(0.00223214, dtype=float32)
    """
    x = _check_x(x)
    axes, sizes = _layout(x.shape, axis, block_size)
    amax = _check_amax(tensor_amax)
    semantics = _check_semantics(semantics, len(sizes) == 2, amax)
    return _quantize(x, amax, axes, sizes, semantics, _check_rbits(rbits, x.shape))


def nvfp4_dequantize(
    codes,
    block_scales,
    tensor_scale,
    *,
    axis: int | tuple[int, int] = -1,
    block_size: int | tuple[int, int] = 16,
    dtype=jnp.float32,
    tensor_amax=None,
) -> jax.Array:
    """Decodes NVFP4 arrays: ``E2M1(code) * (block_scale * tensor_scale)``, exactly.

    The float32 result is the IEEE float32 result of that formula (subnormal
    scale products and results included); bfloat16 and float16 results are
    rounded from it to nearest even. A NaN block scale decodes its block to
    NaN.

    Args:
      codes: uint8 E2M1 codes (sign in bit 3), as :func:`nvfp4_quantize` returns.
      block_scales: ``float8_e4m3fn`` scales, one per block or tile.
      tensor_scale: float32 scalar decode scale.
      axis, block_size: the blocking the arrays were made with.
      dtype: float32 (default), bfloat16 or float16.
      tensor_amax: if given, decode as TransformerEngine's dequantize kernel
        does, ``E2M1(code) * ((block_scale * amax) * f32(1/2688))`` (TE
        semantics only); ``tensor_scale`` is then not used. The two TE
        decodes differ by up to 2 ulp.

    >>> import jax.numpy as jnp
    >>> x = jnp.arange(16.0)[None] / 4
    >>> q = nvfp4_quantize(x)
    >>> nvfp4_dequantize(*q)[0, :6]  # block max 3.75: scale 0.625
    Array([0.    , 0.3125, 0.625 , 0.625 , 0.9375, 1.25  ], dtype=float32)
    """
    codes = jnp.asarray(codes)
    if codes.dtype != jnp.uint8:
        raise TypeError(f"codes must be uint8 E2M1 codes, got dtype {codes.dtype}")
    block_scales = jnp.asarray(block_scales)
    if block_scales.dtype != jnp.float8_e4m3fn:
        raise TypeError(f"block_scales must be float8_e4m3fn, got dtype {block_scales.dtype}")
    axes, sizes = _layout(codes.shape, axis, block_size)
    expect = _scale_shape(codes.shape, axes, sizes)
    if block_scales.shape != expect:
        raise ValueError(
            f"block_scales has shape {block_scales.shape}; codes of shape {codes.shape} "
            f"blocked by {sizes} along axes {axes} need {expect}"
        )
    dtype = numerics.check_out_dtype(dtype)
    if tensor_amax is not None:
        factor = _check_amax(tensor_amax)
    else:
        factor = jnp.asarray(tensor_scale, jnp.float32)
        if factor.shape != ():
            raise ValueError(f"tensor_scale must be a scalar, got shape {factor.shape}")
    return _dequantize(codes, block_scales, factor, axes, sizes, dtype, tensor_amax is not None)


def nvfp4_fake_quantize(
    x,
    *,
    axis: int | tuple[int, int] = -1,
    block_size: int | tuple[int, int] = 16,
    tensor_amax=None,
    semantics: Semantics = "te",
    decode: Literal["scale", "amax"] = "scale",
    rbits=None,
) -> jax.Array:
    """``nvfp4_dequantize(*nvfp4_quantize(x, ...))`` fused, in x's dtype.

    The codes are never materialized: each element's rounded E2M1 value is
    multiplied by its block's decode factor in the same pass.

    Args:
      x, axis, block_size, tensor_amax, semantics: as :func:`nvfp4_quantize`.
      decode: ``"scale"`` (default): ``E2M1(code) * (s8 * tensor_scale)``, what
        :func:`nvfp4_dequantize` of the stored arrays gives; ``"amax"``: TE's
        dequantize kernel, ``E2M1(code) * ((s8 * amax) * f32(1/2688))``
        (TE semantics only).
      rbits: random bits for stochastic rounding, as :func:`nvfp4_quantize`.

    >>> import jax.numpy as jnp
    >>> nvfp4_fake_quantize(jnp.array([[5.0, -1.1, 0.3] + [0.0] * 13]))[0, :3]
    Array([ 5.       , -1.25     ,  0.4166667], dtype=float32)
    """
    x = _check_x(x)
    axes, sizes = _layout(x.shape, axis, block_size)
    amax = _check_amax(tensor_amax)
    semantics = _check_semantics(semantics, len(sizes) == 2, amax)
    if decode not in DECODES:
        raise ValueError(f"unknown decode {decode!r}; allowed: {', '.join(DECODES)}")
    if decode == "amax" and semantics != "te":
        raise ValueError("decode='amax' is TransformerEngine's kernel formula; use semantics='te'")
    return _fake_quantize(x, amax, axes, sizes, semantics, decode, _check_rbits(rbits, x.shape))


def nvfp4_quantize_4over6(
    x,
    *,
    axis: int | tuple[int, int] = -1,
    block_size: int | tuple[int, int] = 16,
    tensor_amax=None,
    importance=None,
) -> NVFP4Arrays:
    """NVFP4 with each block scaled to 4 or to 6, whichever has less squared error.

    Four Over Six (Cook et al. 2025, arXiv:2512.02010): E2M1's top step is
    from 4 to 6, so a block whose values sit between 2/3 of its maximum and
    the maximum loses much of them when the maximum maps to 6. Each block is
    quantized twice, with TE's block scale chain aimed at 6
    (``e4m3(block_amax * (S_enc * f32(1/6)))``) and at 4
    (``e4m3(block_amax * (S_enc * f32(1/4)))``), and keeps the one whose
    decoded values have the smaller float32 sum of squared errors
    (``importance``-weighted if given; ties and NaN blocks keep 6). The
    tensor scale uses 256 instead of 448 as the largest block scale,
    ``S_enc = 1536 / amax``, so that the 4-target's block scales (up to 384)
    fit E4M3. Both candidates follow :func:`nvfp4_quantize`'s TE arithmetic
    otherwise, and the result is ordinary NVFP4: any NVFP4 decoder reads it.

    Args:
      x, axis, block_size, tensor_amax: as :func:`nvfp4_quantize` (TE semantics).
      importance: optional non-negative float32 weights in x's shape (or
        broadcastable to it) for the block errors.

    Returns:
      ``NVFP4Arrays`` as :func:`nvfp4_quantize`.

    >>> import jax.numpy as jnp
    >>> x = jnp.array([[4.0, 4.5, 5.0, 5.4] + [0.0] * 12])
    >>> nvfp4_dequantize(*nvfp4_quantize(x))[0, :4]  # 5.4 -> 6: grid 3.6, 5.4
    Array([3.6000001, 3.6000001, 5.4      , 5.4      ], dtype=float32)
    >>> nvfp4_dequantize(*nvfp4_quantize_4over6(x))[0, :4]  # 5.4 -> 4: grid 4.05, 5.4
    Array([4.05, 4.05, 5.4 , 5.4 ], dtype=float32)
    """
    x = _check_x(x)
    axes, sizes = _layout(x.shape, axis, block_size)
    amax = _check_amax(tensor_amax)
    if importance is not None:
        importance = jnp.broadcast_to(jnp.asarray(importance, jnp.float32), x.shape)
    return _four_over_six(x, amax, axes, sizes, importance)


def nvfp4_encode(
    x,
    block_scales,
    tensor_scale,
    *,
    axis: int | tuple[int, int] = -1,
    block_size: int | tuple[int, int] = 16,
) -> jax.Array:
    """E2M1 codes of ``x`` under given block scales and tensor scale (TE's rounding).

    ``code = fp4(x * min(1 / (s8 * tensor_scale), FLT_MAX))``, the element
    step of :func:`nvfp4_quantize` with the scales fixed instead of derived
    from ``x``: for post-training methods that choose the scales first
    (GPTQ rounds onto fixed grids). ``nvfp4_encode(x, *nvfp4_quantize(x)[1:])``
    is ``nvfp4_quantize(x).codes``.

    >>> import jax.numpy as jnp
    >>> q = nvfp4_quantize(jnp.array([[6.0, 1.0] + [0.0] * 14]))
    >>> nvfp4_encode(jnp.array([[3.1, -0.9] + [0.0] * 14]), q.block_scales, q.tensor_scale)[0, :2]
    Array([ 5, 10], dtype=uint8)
    """
    x = _check_x(x)
    axes, sizes = _layout(x.shape, axis, block_size)
    block_scales = jnp.asarray(block_scales)
    expect = _scale_shape(x.shape, axes, sizes)
    if block_scales.dtype != jnp.float8_e4m3fn or block_scales.shape != expect:
        raise ValueError(
            f"block_scales must be float8_e4m3fn of shape {expect} for x of shape {x.shape}, "
            f"got {block_scales.dtype}{tuple(block_scales.shape)}"
        )
    tensor_scale = jnp.asarray(tensor_scale, jnp.float32)
    if tensor_scale.shape != ():
        raise ValueError(f"tensor_scale must be a scalar, got shape {tensor_scale.shape}")
    return _encode(x, block_scales, tensor_scale, axes, sizes)
