"""NVFP4's public kernels: quantize, dequantize and the fused fake_quantize.

The jitted pipelines live here with the functions the family record calls;
:func:`nvfp4_quantize_4over6` and :func:`nvfp4_encode` (:mod:`._search`) are
re-exported. The pieces: argument checks and the blocking in
:mod:`._layout`, the tensor and block scales in :mod:`._scales`, the E2M1
element step in :mod:`._e2m1`. The scales come from a scale rule, a field
of each kernel's static spec (:class:`._layout.Static`); the package uses
TransformerEngine's alone, and the tests run torchao's ``NVFP4Tensor``
rounding of the scales through the same pipelines (``tests/_torchao_nvfp4.py``).

NVFP4 is NVIDIA's Blackwell format: FP4 E2M1 elements, an E4M3 scale per 16
elements, a float32 scale per tensor. Semantics are TransformerEngine's
(``quantize_nvfp4`` and ``dequantize_nvfp4.cuh``), every step one float32
operation rounded to nearest even, exactly as below (``e4m3`` rounds to
nearest even to ``float8_e4m3fn``; ``fp4`` rounds to nearest E2M1 value,
ties to the even code, saturating at 6 and keeping the sign, so -0.0 gives
code 8)::

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
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from jaxmx import numerics
from jaxmx.families import _f32 as f32
from jaxmx.families.nvfp4 import _e2m1, _layout, _scales
from jaxmx.families.nvfp4._layout import NVFP4Arrays, Static
from jaxmx.families.nvfp4._search import nvfp4_encode, nvfp4_quantize_4over6
from jaxmx.numerics import u32

__all__ = [
    "NVFP4Arrays",
    "nvfp4_dequantize",
    "nvfp4_encode",
    "nvfp4_fake_quantize",
    "nvfp4_quantize",
    "nvfp4_quantize_4over6",
]

DECODES = ("scale", "amax")

# The conditionals take x itself and return the final dtype: an operand or
# result that is a bit-cast view of x would be copied in full across the
# conditional's boundary.


@functools.partial(jax.jit, static_argnums=(2,))
def _quantize(x, tensor_amax, static: Static, rbits=None) -> NVFP4Arrays:
    """The codes and scales under ``static.rule`` (the tests pass other rules here)."""
    within, block_amax, t = _scales.prepare(x, tensor_amax, static)

    def run(exact, x, block_amax, t, rbits):
        b = lax.optimization_barrier(static.rule.blocks(block_amax, t, exact))
        nan_block = (b.s8 & jnp.uint8(0x7F)) == jnp.uint8(_scales.E4M3_NAN)
        xb, _ = _layout.split(f32.bits(x), static.axes, static.sizes)
        rb = None if rbits is None else _layout.split(rbits, static.axes, static.sizes)[0]
        return _e2m1.codes(xb, b.enc, nan_block, rb).reshape(x.shape), b.s8

    codes, s8 = _scales.branches(run)(t.fast, x, block_amax, t, rbits)
    scales = lax.bitcast_convert_type(jnp.squeeze(s8, within), jnp.float8_e4m3fn)
    return NVFP4Arrays(codes, scales, f32.from_bits(t.tensor_scale))


@functools.partial(jax.jit, static_argnums=(2,))
def _fake_quantize(x, tensor_amax, static: Static, rbits=None) -> jax.Array:
    """The decoded values under ``static.rule`` and ``static.decode``, in x's dtype."""
    _, block_amax, t = _scales.prepare(x, tensor_amax, static)

    def run(exact, x, block_amax, t, rbits):
        b = static.rule.blocks(block_amax, t, exact)
        amax = static.decode == "amax"
        dec = _scales.amax_decode(b.s8, t.amax, exact) if amax else b.dec
        enc, dec = lax.optimization_barrier((b.enc, dec))
        xb, _ = _layout.split(f32.bits(x), static.axes, static.sizes)
        rb = None if rbits is None else _layout.split(rbits, static.axes, static.sizes)[0]
        r = _e2m1.round_(_scales.scaled_magnitude(xb & u32(f32.ABS), enc), rb)
        # A NaN block's decode factor is NaN: no need to mask its codes.
        out = _e2m1.values(r | (xb & u32(f32.SIGN)), dec, exact)
        return numerics.bits_to_dtype(out.reshape(x.shape), x.dtype)

    return _scales.branches(run)(t.fast, x, block_amax, t, rbits)


@functools.partial(jax.jit, static_argnums=(3,))
def _dequantize(codes, block_scales, factor, static: Static) -> jax.Array:
    """``factor`` is the tensor scale, or with ``decode="amax"`` the amax of TE's kernel formula."""
    from_amax = static.decode == "amax"
    within = _layout.split(codes, static.axes, static.sizes)[1]
    s8 = jnp.expand_dims(lax.bitcast_convert_type(block_scales, jnp.uint8), within)
    fb = f32.bits(factor)
    m = fb & u32(f32.ABS)
    # Fast (float) where every nonzero decode factor and value stays normal.
    fast = (m >= u32(_scales.FAST_AMAX if from_amax else _scales.FAST_TE)) | (m == 0)

    def run(exact, codes, s8, fb):
        if from_amax:
            dec = _scales.amax_decode(s8, fb & u32(f32.ABS), exact)
        else:
            s8f = _scales.e4m3_to_f32(s8)
            dec = f32.mul(s8f, fb) if exact else _scales.fmul(s8f, fb)
        dec = lax.optimization_barrier(dec)
        cb, _ = _layout.split(codes.astype(jnp.uint32), static.axes, static.sizes)
        out = _e2m1.values(_e2m1.value_of(cb), dec, exact)
        return numerics.bits_to_dtype(out.reshape(codes.shape), static.dtype)

    return _scales.branches(run)(fast, codes, s8, fb)


def nvfp4_quantize(
    x,
    *,
    axis: int | tuple[int, int] = -1,
    block_size: int | tuple[int, int] = 16,
    tensor_amax=None,
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
      rbits: uniform uint32 random bits in x's shape: round each scaled
        element to E2M1 stochastically (up with probability equal to the
        fraction of its step) instead of to nearest even; the scales are
        unchanged. The gradients of NVFP4 training (arXiv 2509.25149).

    Returns:
      ``NVFP4Arrays(codes, block_scales, tensor_scale)``: uint8 E2M1 codes
      (sign in bit 3; code 8 is -0.0) in x's shape; ``float8_e4m3fn`` block
      scales in x's shape with each blocked axis divided by its block size;
      the float32 scalar decode scale ``1 / S_enc``. See the module
      docstring for every step and for zeros, NaN and Inf.

    Raises:
      ValueError: partial blocks, axis out of range, negative ``tensor_amax``.
      TypeError: non-float input, malformed ``axis``/``block_size``.

    >>> import jax.numpy as jnp
    >>> x = jnp.array([[0.0] * 14 + [-0.3, 6.0]])
    >>> codes, scales, ts = nvfp4_quantize(x)
    >>> codes[0, -2:], scales
    (Array([9, 7], dtype=uint8), Array([[448]], dtype=float8_e4m3fn))
    >>> ts  # 1 / S_enc = amax / 2688
    Array(0.00223214, dtype=float32)
    """
    x = _layout.check_x(x)
    axes, sizes = _layout.layout(x.shape, axis, block_size)
    amax = _layout.check_amax(tensor_amax)
    rbits = _layout.check_rbits(rbits, x.shape)
    return _quantize(x, amax, Static(axes, sizes, _scales.TE), rbits)


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
        does, ``E2M1(code) * ((block_scale * amax) * f32(1/2688))``;
        ``tensor_scale`` is then not used. The two TE decodes differ by up
        to 2 ulp.

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
    axes, sizes = _layout.layout(codes.shape, axis, block_size)
    expect = _layout.scale_shape(codes.shape, axes, sizes)
    if block_scales.shape != expect:
        raise ValueError(
            f"block_scales has shape {block_scales.shape}; codes of shape {codes.shape} "
            f"blocked by {sizes} along axes {axes} need {expect}"
        )
    dtype = numerics.check_out_dtype(dtype)
    if tensor_amax is not None:
        factor = _layout.check_amax(tensor_amax)
    else:
        factor = jnp.asarray(tensor_scale, jnp.float32)
        if factor.shape != ():
            raise ValueError(f"tensor_scale must be a scalar, got shape {factor.shape}")
    decode = "scale" if tensor_amax is None else "amax"
    return _dequantize(codes, block_scales, factor, Static(axes, sizes, decode=decode, dtype=dtype))


def nvfp4_fake_quantize(
    x,
    *,
    axis: int | tuple[int, int] = -1,
    block_size: int | tuple[int, int] = 16,
    tensor_amax=None,
    decode: Literal["scale", "amax"] = "scale",
    rbits=None,
) -> jax.Array:
    """``nvfp4_dequantize(*nvfp4_quantize(x, ...))`` fused, in x's dtype.

    The codes are never materialized: each element's rounded E2M1 value is
    multiplied by its block's decode factor in the same pass.

    Args:
      x, axis, block_size, tensor_amax: as :func:`nvfp4_quantize`.
      decode: ``"scale"`` (default): ``E2M1(code) * (s8 * tensor_scale)``, what
        :func:`nvfp4_dequantize` of the stored arrays gives; ``"amax"``: TE's
        dequantize kernel, ``E2M1(code) * ((s8 * amax) * f32(1/2688))``.
      rbits: random bits for stochastic rounding, as :func:`nvfp4_quantize`.

    >>> import jax.numpy as jnp
    >>> nvfp4_fake_quantize(jnp.array([[5.0, -1.1, 0.3] + [0.0] * 13]))[0, :3]
    Array([ 5.       , -1.25     ,  0.4166667], dtype=float32)
    """
    x = _layout.check_x(x)
    axes, sizes = _layout.layout(x.shape, axis, block_size)
    amax = _layout.check_amax(tensor_amax)
    if decode not in DECODES:
        raise ValueError(f"unknown decode {decode!r}; allowed: {', '.join(DECODES)}")
    rbits = _layout.check_rbits(rbits, x.shape)
    return _fake_quantize(x, amax, Static(axes, sizes, _scales.TE, decode), rbits)
