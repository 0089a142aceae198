"""Per-block exponent search for the OCP formats (post-training quantization).

Each block tries the exponent of its scale rule plus each offset and keeps
the one whose round-to-nearest result has the least (weighted) sum of
squared errors; ties keep the earlier candidate, and 0 comes first, so no
block's error exceeds the direct cast's. MSE-optimal clipping (Banner et
al. 2019, arXiv:1810.05723; Sakr et al. 2022, arXiv:2206.06501) over E8M0
scales.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxmx import numerics
from jaxmx.blocks import from_blocks, to_blocks
from jaxmx.families.ocp import _kernels
from jaxmx.spec import QuantSpec


def _search(x, spec: QuantSpec, offsets, importance=None):
    """(best exponent, best rounded values in blocked layout, the blocks)."""
    fmt, axis, bs = spec.format, spec.axis, spec.block_size
    blk = _kernels.blocks(x, spec)
    block_axis = blk.mag.ndim + axis
    finite = jnp.where(blk.mag >= jnp.uint32(0x7F800000), jnp.uint32(0), blk.mag)
    ref = numerics.bits_to_f32(finite)
    imp = None if importance is None else to_blocks(importance, axis, bs)
    lo, hi = fmt.scale.min_exponent, fmt.scale.max_exponent
    best_e = best_v = best_err = None
    for d in offsets:  # a handful of candidates: unrolled, each one fused pass
        e = jnp.clip(blk.exponent + d, lo, hi)
        v = numerics.bits_to_f32(numerics.round_magnitude(finite, e, fmt.element))
        sq = jnp.square(v - ref) if imp is None else imp * jnp.square(v - ref)
        err = jnp.sum(sq, axis=block_axis, keepdims=True)
        if best_e is None:
            best_e, best_v, best_err = e, v, err
        else:
            better = err < best_err  # strict: ties keep the earlier (direct) exponent
            best_e = jnp.where(better, e, best_e)
            best_v = jnp.where(better, v, best_v)
            best_err = jnp.where(better, err, best_err)
    return best_e, best_v, blk


@functools.partial(jax.jit, static_argnums=(1, 2))
def search_exponents(x, spec: QuantSpec, offsets, importance=None):
    """The chosen int32 exponent of each block (kept-dims blocked layout)."""
    return _search(x, spec, offsets, importance)[0]


@functools.partial(jax.jit, static_argnums=(1, 2))
def fake_search(x, spec: QuantSpec, offsets):
    """The searched values in one pass, float32 (NaN/Inf blocks become NaN)."""
    _, v, blk = _search(x, spec, offsets)
    bits = numerics.f32_to_bits(v) | lax.shift_left(blk.sign, jnp.uint32(31))
    bits = jnp.where(blk.nonfinite, jnp.uint32(0x7FC00000), bits)
    return from_blocks(numerics.bits_to_f32(bits), spec.axis, x.shape[spec.axis])
