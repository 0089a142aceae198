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

import jax.numpy as jnp
from jax import lax

from jaxmx import codes, numerics
from jaxmx.numerics import u32
from jaxmx.pallas import _bits
from jaxmx.spec import QuantSpec


def _blocks(spec: QuantSpec, dtype, x_ref, r_ref):
    """``(sign, mag, rbits, e, nonfinite)`` of a tile, as jaxmx.families.ocp's ``blocks``."""
    fmt = spec.format
    bits = _bits.f32_bits(x_ref[...], dtype)
    sign = lax.shift_right_logical(bits, u32(31))
    mag = bits & u32(0x7FFFFFFF)
    # Magnitudes are below 2^31, so their int32 order is their float order
    # (Inf above every finite value, NaN above Inf); a signed reduction is
    # the one every backend has.
    amax = jnp.max(mag.astype(jnp.int32), axis=-1, keepdims=True).astype(jnp.uint32)
    if spec.flush_subnormals:
        tiny = amax < u32(0x00800000)
        mag = jnp.where(tiny, u32(0), mag)
        amax = jnp.where(tiny, u32(0), amax)
    e, nonfinite = numerics.shared_exponent(
        amax,
        fmt.element,
        spec.scale_mode,
        min_exponent=fmt.scale.min_exponent,
        max_exponent=fmt.scale.max_exponent,
    )
    rbits = None if r_ref is None else r_ref[...]
    return sign, mag, rbits, e, nonfinite


def quantize_body(spec: QuantSpec, dtype, x_ref, *refs) -> None:
    """Writes a tile's raw codes (uint8, the wire code) and biased scales (uint8)."""
    r_ref, c_ref, s_ref = refs if len(refs) == 3 else (None, *refs)
    fmt = spec.format
    elem = fmt.element
    sign, mag, rbits, e, nonfinite = _blocks(spec, dtype, x_ref, r_ref)
    mag = jnp.where(nonfinite, u32(0), mag)
    code = numerics.encode_magnitude(mag, e, elem, spec.rounding, rbits)
    sign = jnp.where(nonfinite, u32(0), sign)
    c_ref[...] = codes.raw_codes(sign, code, elem)
    biased = (e + fmt.scale.bias).astype(jnp.uint8)
    s_ref[...] = jnp.where(nonfinite, jnp.uint8(fmt.scale.nan_code), biased)


def fake_quantize_body(spec: QuantSpec, dtype, x_ref, *refs) -> None:
    """Writes a tile's fake-quantized values as the bits of ``dtype``."""
    r_ref, o_ref = refs if len(refs) == 2 else (None, *refs)
    elem = spec.format.element
    sign, mag, rbits, e, nonfinite = _blocks(spec, dtype, x_ref, r_ref)
    # decode(encode(.)) has round_magnitude's bits; round_magnitude's own
    # saturation bound is a float bitcast of a constant, which Pallas's
    # Triton lowering does not take.
    code = numerics.encode_magnitude(mag, e, elem, spec.rounding, rbits)
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
