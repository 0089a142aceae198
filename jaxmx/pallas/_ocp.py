"""The OCP MX arithmetic as Pallas kernel bodies: one row of a tile is one block.

The same steps as :mod:`jaxmx.families.ocp` (OCP MX v1.0 section 6.3:
block max, shared exponent by the scale rule, elements rounded onto the
grid and saturated, the NaN scale for a block holding Inf or NaN), written
on a tile of ``(rows, block_size)`` float bit patterns with the integer
functions of :mod:`jaxmx.numerics`, so each element is read once and its
code and its block's scale are written once. The bodies are the same for
every Pallas backend; only the tiling around them differs
(:mod:`jaxmx.pallas._call`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import DTypeLike

from jaxmx import codes, numerics
from jaxmx.formats import ScaleFormat
from jaxmx.numerics import u32
from jaxmx.pallas import _bits
from jaxmx.spec import QuantSpec


def _scale(spec: QuantSpec) -> ScaleFormat:
    """The block scale's format; every OCP MX format has one (E8M0)."""
    scale = spec.format.scale
    assert scale is not None, f"{spec.format.name}: an OCP MX format without a block scale"
    return scale


def _rounding(spec: QuantSpec) -> numerics.Rounding:
    # QuantSpec.make checked it against numerics.ROUNDINGS.
    return cast(numerics.Rounding, spec.rounding)


def _blocks(
    spec: QuantSpec, bits: jax.Array, axis: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(sign, mag, e, nonfinite)`` of float32 patterns blocked along ``axis``, as
    jaxmx.families.ocp's ``blocks``; ``e`` and ``nonfinite`` keep the axis (length 1)."""
    scale = _scale(spec)
    sign = lax.shift_right_logical(bits, u32(31))
    mag = bits & u32(0x7FFFFFFF)
    # Magnitudes are below 2^31, so their int32 order is their float order
    # (Inf above every finite value, NaN above Inf); a signed reduction is
    # the one every backend has.
    amax = jnp.max(mag.astype(jnp.int32), axis=axis, keepdims=True).astype(jnp.uint32)
    if spec.flush_subnormals:
        tiny = amax < u32(0x00800000)
        mag = jnp.where(tiny, u32(0), mag)
        amax = jnp.where(tiny, u32(0), amax)
    e, nonfinite = numerics.shared_exponent(
        amax,
        spec.format.element,
        # QuantSpec.make checked it against numerics.SCALE_MODES.
        cast(numerics.ScaleMode, spec.scale_mode),
        min_exponent=scale.min_exponent,
        max_exponent=scale.max_exponent,
    )
    return sign, mag, e, nonfinite


def quantize_tile(
    spec: QuantSpec,
    bits: jax.Array,
    tensor: Sequence[jax.Array],
    rbits: jax.Array | None,
    axis: int,
) -> tuple[jax.Array, jax.Array]:
    """Raw codes (uint8, the wire code) and biased scales (uint8, ``axis`` of length 1)
    of float32 patterns ``bits`` blocked along ``axis``."""
    del tensor  # no per-tensor value
    elem, scale = spec.format.element, _scale(spec)
    sign, mag, e, nonfinite = _blocks(spec, bits, axis)
    mag = jnp.where(nonfinite, u32(0), mag)
    code = numerics.encode_magnitude(mag, e, elem, _rounding(spec), rbits)
    sign = jnp.where(nonfinite, u32(0), sign)
    biased = (e + scale.bias).astype(jnp.uint8)
    return codes.raw_codes(sign, code, elem), jnp.where(
        nonfinite, jnp.uint8(scale.nan_code), biased
    )


def quantize_body(spec: QuantSpec, dtype: DTypeLike, x_ref: jax.Ref, *refs: jax.Ref) -> None:
    """Writes a tile's raw codes (uint8, the wire code) and biased scales (uint8)."""
    # The random bits' rows come before the outputs when the rounding draws them.
    rbits = refs[0][...] if len(refs) == 3 else None
    c_ref, s_ref = refs[-2:]
    c_ref[...], s_ref[...] = quantize_tile(spec, _bits.f32_bits(x_ref[...], dtype), (), rbits, -1)


def fake_quantize_body(spec: QuantSpec, dtype: DTypeLike, x_ref: jax.Ref, *refs: jax.Ref) -> None:
    """Writes a tile's fake-quantized values as the bits of ``dtype``."""
    rbits = refs[0][...] if len(refs) == 2 else None
    o_ref = refs[-1]
    elem = spec.format.element
    sign, mag, e, nonfinite = _blocks(spec, _bits.f32_bits(x_ref[...], dtype), -1)
    # decode(encode(.)) has round_magnitude's bits; round_magnitude's own
    # saturation bound is a float bitcast of a constant, which Pallas's
    # Triton lowering does not take.
    code = numerics.encode_magnitude(mag, e, elem, _rounding(spec), rbits)
    bits = numerics.decode_magnitude(code, e, elem)
    if elem.kind == "int":  # two's complement has no -0
        sign = jnp.where(bits == 0, u32(0), sign)
    bits = bits | lax.shift_left(sign, u32(31))
    bits = jnp.where(nonfinite, u32(0x7FC00000), bits)
    o_ref[...] = _bits.narrow(bits, dtype)


def supported(spec: QuantSpec) -> str | None:
    """Why the kernels cannot take ``spec``, or None."""
    del spec  # every OCP format, scale rule, rounding and storage is covered
    return None
