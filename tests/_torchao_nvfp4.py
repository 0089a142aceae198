"""torchao's NVFP4Tensor scale rounding, run through jaxmx's NVFP4 kernels (a test helper).

torchao's ``NVFP4Tensor`` rounds the scales differently from
TransformerEngine, which is all jaxmx implements: ``pts = amax / 2688``,
``s8 = e4m3(clamp((block_amax / 6) / pts, 2^-6, 448))``, ``code = fp4(x *
((1 / pts) / s8))``, ``value = E2M1(code) * (pts * s8)``. It floors block
scales at 2^-6 (an all-zero block gets byte 0x08), and an all-zero tensor
gives ``pts = 0`` and NaN scales (byte 0xFF). ``two_level=False`` is its
single-level mode (``pts = 1``). The two agree with TE on ordinary data and
differ where block scales fall below 2^-6, at some E4M3 midpoints (TE rounds
once, torchao twice) and for degenerate amax. The tests check these against
the torchao vectors (tests/data/vectors_turn2/nvfp4) bit for bit, which
holds while ``1 / pts`` and the encode factor stay finite (tensor amax above
about 2^-110); below that torchao's own arithmetic turns zeros into NaN
products, whose codes jaxmx does not reproduce.

:class:`TorchaoRule` is a scale rule (:class:`jaxmx.families.nvfp4._scales.ScaleRule`):
the package's jitted pipelines run it as they run TE's, so only the scale
arithmetic lives here; the element rounding, the codes and the decode are
the package's. 1x16 blocks along the last axis only (torchao has no tiles).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxmx.families import _f32 as f32
from jaxmx.families.nvfp4 import _kernels, _layout, _scales
from jaxmx.families.nvfp4._layout import NVFP4Arrays, Static
from jaxmx.families.nvfp4._scales import BlockScales, TensorScales
from jaxmx.numerics import u32

__all__ = ["TorchaoRule", "fake_quantize", "quantize"]

_SIX = 0x40C00000  # 6.0
# With pts >= 2^-100 and s8 >= 2^-6 every decode factor and value stays
# normal with room to spare, and a block amax whose quotient could be
# subnormal clamps to 2^-6 anyway: the float forms are exact.
_FAST = 0x0D800000  # 2^-100


@dataclasses.dataclass(frozen=True)
class TorchaoRule:
    """torchao's scales: two-level (``pts = amax / 2688``) or single-level (``pts = 1``)."""

    two_level: bool = True

    def tensor(self, block_amax, tensor_amax) -> TensorScales:
        amax = _scales.amax_bits(block_amax, tensor_amax)
        pts = f32.div(amax, u32(_scales.RANGE)) if self.two_level else u32(_scales.ONE)
        fast = (pts >= u32(_FAST)) & (pts < u32(f32.INF))
        return TensorScales(pts, f32.div(u32(_scales.ONE), pts), u32(0), amax, fast)

    def blocks(self, block_amax, t: TensorScales, exact: bool) -> BlockScales:
        pts = t.tensor_scale
        if exact:
            q = f32.div(f32.div(block_amax, u32(_SIX)), pts)
        else:
            # Two true divisions (XLA:CPU would otherwise multiply by a
            # reciprocal). A subnormal block amax reads as 0 here; its
            # quotient would be far below 2^-6 and clamp to it all the same.
            q = _scales.fdiv(_scales.fdiv(block_amax, u32(_SIX)), pts)
        # clamp(q, 2^-6, 448), NaN passing through.
        m = q & u32(f32.ABS)
        low = ((q >= u32(f32.SIGN)) & (m <= u32(f32.INF))) | (q < u32(_scales.E4M3_MIN_NORMAL))
        q = jnp.where(low, u32(_scales.E4M3_MIN_NORMAL), _scales.min_bits(q, _scales.E4M3_MAX))
        if exact:
            s8 = _scales.e4m3(q)
            s8f = _scales.e4m3_to_f32(s8)
            return BlockScales(s8, f32.div(t.s_enc, s8f), f32.mul(pts, s8f))
        s8, s8f = _scales.e4m3_float(q)
        return BlockScales(s8, _scales.fdiv(t.s_enc, s8f), _scales.fmul(pts, s8f))


def _static(x, two_level: bool) -> Static:
    axes, sizes = _layout.layout(x.shape, -1, 16)
    return Static(axes, sizes, TorchaoRule(bool(two_level)))


def quantize(x, *, two_level: bool = True) -> NVFP4Arrays:
    """``NVFP4Tensor.to_nvfp4(x)``'s codes, E4M3 block scales and tensor scale ``pts``.

    The tensor scale is ``amax / 2688`` (two-level) or 1; the arrays decode
    with :func:`jaxmx.families.nvfp4._kernels.nvfp4_dequantize` as TE's do.
    """
    x = _layout.check_x(x)
    return _kernels._quantize(x, None, _static(x, two_level))


def fake_quantize(x, *, two_level: bool = True) -> jax.Array:
    """``dequantize(*quantize(x))`` fused, in x's dtype (``E2M1(code) * (pts * s8)``)."""
    x = _layout.check_x(x)
    return _kernels._fake_quantize(x, None, _static(x, two_level))
