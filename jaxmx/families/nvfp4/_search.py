"""NVFP4 for post-training methods: Four Over Six, and codes under given scales.

:func:`nvfp4_quantize_4over6` quantizes each block twice, its maximum aimed
at 6 and at 4, and keeps the scale with the smaller squared error;
:func:`nvfp4_encode` rounds ``x`` to E2M1 under block and tensor scales
chosen beforehand (GPTQ's fixed grids). Both follow TransformerEngine's
arithmetic from the scale on (:mod:`._scales`, :mod:`._e2m1`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxmx.families import _f32 as f32
from jaxmx.families.nvfp4 import _e2m1, _layout, _scales
from jaxmx.families.nvfp4._layout import NVFP4Arrays, Static
from jaxmx.numerics import u32

__all__ = ["nvfp4_encode", "nvfp4_quantize_4over6"]


@functools.partial(jax.jit, static_argnums=(2,))
def _four_over_six(x, tensor_amax, static: Static, importance=None) -> NVFP4Arrays:
    rule, axes, sizes = static.rule, static.axes, static.sizes
    within, block_amax, t = _scales.prepare(x, tensor_amax, static)
    factor4 = f32.mul(t.s_enc, u32(_scales.ONE_QUARTER))

    def run(exact, x, block_amax, t, factor4, importance):
        xb, _ = _layout.split(f32.bits(x), axes, sizes)
        mag = xb & u32(f32.ABS)
        ref = f32.from_bits(mag)
        imp = None if importance is None else _layout.split(importance, axes, sizes)[0]
        picks = []
        for factor in (t.factor, factor4):  # block amax -> 6, then -> 4
            b = rule.blocks(block_amax, t._replace(factor=factor), exact)
            r = _e2m1.round_(_scales.scaled_magnitude(mag, b.enc), None)
            sq = jnp.square(f32.from_bits(_e2m1.values(r, b.dec, exact)) - ref)
            sq = sq if imp is None else sq * imp
            picks.append((b.s8, r, jnp.sum(sq, axis=within, keepdims=True)))
        (s8_6, r6, err6), (s8_4, r4, err4) = picks
        four = err4 < err6  # strict: ties (and NaN blocks) keep 6
        s8 = jnp.where(four, s8_4, s8_6)
        nan_block = (s8 & jnp.uint8(0x7F)) == jnp.uint8(_scales.E4M3_NAN)
        c = jnp.where(nan_block, u32(0), _e2m1.code_of(jnp.where(four, r4, r6)))
        c = c | lax.shift_right_logical(xb & u32(f32.SIGN), u32(28))
        return c.astype(jnp.uint8).reshape(x.shape), s8

    codes, s8 = _scales.branches(run)(t.fast, x, block_amax, t, factor4, importance)
    scales = lax.bitcast_convert_type(jnp.squeeze(s8, within), jnp.float8_e4m3fn)
    return NVFP4Arrays(codes, scales, f32.from_bits(t.tensor_scale))


@functools.partial(jax.jit, static_argnums=(3,))
def _encode(x, block_scales, tensor_scale, static: Static) -> jax.Array:
    xb, within = _layout.split(f32.bits(x), static.axes, static.sizes)
    s8 = jnp.expand_dims(lax.bitcast_convert_type(block_scales, jnp.uint8), within)
    # TE's chain from the scale on (exact integer forms: per block, cheap).
    dec = f32.mul(_scales.e4m3_to_f32(s8), f32.bits(tensor_scale))
    enc = _scales.min_bits(f32.div(u32(_scales.ONE), dec), f32.FLT_MAX)
    nan_block = (s8 & jnp.uint8(0x7F)) == jnp.uint8(_scales.E4M3_NAN)
    return _e2m1.codes(xb, enc, nan_block).reshape(x.shape)


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
      x, axis, block_size, tensor_amax: as :func:`nvfp4_quantize`.
      importance: optional non-negative float32 weights in x's shape (or
        broadcastable to it) for the block errors.

    Returns:
      ``NVFP4Arrays`` as :func:`nvfp4_quantize`.

    >>> import jax.numpy as jnp
    >>> from jaxmx.families.nvfp4._kernels import nvfp4_dequantize, nvfp4_quantize
    >>> x = jnp.array([[4.0, 4.5, 5.0, 5.4] + [0.0] * 12])
    >>> nvfp4_dequantize(*nvfp4_quantize(x))[0, :4]  # 5.4 -> 6: grid 3.6, 5.4
    Array([3.6000001, 3.6000001, 5.4      , 5.4      ], dtype=float32)
    >>> nvfp4_dequantize(*nvfp4_quantize_4over6(x))[0, :4]  # 5.4 -> 4: grid 4.05, 5.4
    Array([4.05, 4.05, 5.4 , 5.4 ], dtype=float32)
    """
    x = _layout.check_x(x)
    axes, sizes = _layout.layout(x.shape, axis, block_size)
    amax = _layout.check_amax(tensor_amax)
    if importance is not None:
        importance = jnp.broadcast_to(jnp.asarray(importance, jnp.float32), x.shape)
    return _four_over_six(x, amax, Static(axes, sizes, _scales.TE_4OVER6), importance)


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
    >>> from jaxmx.families.nvfp4._kernels import nvfp4_quantize
    >>> q = nvfp4_quantize(jnp.array([[6.0, 1.0] + [0.0] * 14]))
    >>> nvfp4_encode(jnp.array([[3.1, -0.9] + [0.0] * 14]), q.block_scales, q.tensor_scale)[0, :2]
    Array([ 5, 10], dtype=uint8)
    """
    x = _layout.check_x(x)
    axes, sizes = _layout.layout(x.shape, axis, block_size)
    block_scales = jnp.asarray(block_scales)
    expect = _layout.scale_shape(x.shape, axes, sizes)
    if block_scales.dtype != jnp.float8_e4m3fn or block_scales.shape != expect:
        raise ValueError(
            f"block_scales must be float8_e4m3fn of shape {expect} for x of shape {x.shape}, "
            f"got {block_scales.dtype}{tuple(block_scales.shape)}"
        )
    tensor_scale = jnp.asarray(tensor_scale, jnp.float32)
    if tensor_scale.shape != ():
        raise ValueError(f"tensor_scale must be a scalar, got shape {tensor_scale.shape}")
    return _encode(x, block_scales, tensor_scale, Static(axes, sizes))
