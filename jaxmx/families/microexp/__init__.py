"""Shared microexponents (MX9, MX6, MX4) and block floating point (MSFP16, MSFP12).

AMD Quark's arithmetic, bit for bit (see :mod:`._kernels`): sign-magnitude
integer codes, an 8-bit shared exponent per block (held as an E8M0 byte in
``t.scale``) and, for MX9/MX6/MX4, one microexponent bit per pair of
elements (``t.micro``) that moves the pair one binade finer.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax

from jaxmx.bitstream import pack_codes
from jaxmx.families._common import expand, make_tensor
from jaxmx.families.microexp import _kernels
from jaxmx.formats import (
    E8M0,
    MICRO_1X2,
    SM_INT3,
    SM_INT4,
    SM_INT5,
    SM_INT8,
    ElementFormat,
    Family,
    FamilyRules,
    MicroExponent,
    MXFormat,
    register_family,
    register_format,
)
from jaxmx.spec import QuantSpec


@functools.cache
def _spec(fmt: MXFormat) -> _kernels.MicroexpSpec:
    # Quark's quant_bit is the element width: sign + magnitude bits.
    return _kernels.MicroexpSpec(
        name=fmt.name,
        mantissa_bits=fmt.element.bits - 1,
        block_size=fmt.block_size,
        sub_block_size=None if fmt.micro is None else fmt.micro.group,
    )


def _tensor(x, q: _kernels.MicroexpCodes, spec: QuantSpec):
    data, micro = q.mantissas, q.micro
    if spec.packed:
        data = pack_codes(data, spec.format.element.bits, spec.axis)
    if spec.packed and micro is not None:
        micro = pack_codes(micro, 1, spec.axis)
    scale = lax.bitcast_convert_type(q.shared_exponent, spec.format.scale.storage_dtype)
    return make_tensor(spec, x, data, scale, micro=micro)


class Microexp(Family):
    name = "microexp"
    description = "AMD Quark's fake_quantize_mx6_mx9: 8-bit shared exponent + 1-bit microexponents"
    rules = FamilyRules(
        roundings=("nearest_even",),
        scale_modes=("floor",),
        flush_subnormals=False,
        block_sizes="fixed",
        tensor_amax=False,
        array_ops=False,
    )

    def check_format(self, fmt: MXFormat) -> None:
        e, sc = fmt.element, fmt.scale
        if not (
            e.kind == "int"
            and e.int_encoding == "sign_magnitude"
            and e.bits <= 8
            and sc is not None
            and sc.name == "e8m0"
            and not fmt.tensor_scale
        ):
            raise ValueError(
                f"MXFormat {fmt.name!r}: family 'microexp' needs sign-magnitude integer "
                "elements of at most 8 bits under an E8M0 shared exponent"
            )

    def quantize(self, x, rbits, tensor_amax, spec):
        return _tensor(x, _kernels.quantize(x, _spec(spec.format), axis=spec.axis), spec)

    def fake_quantize(self, x, rbits, tensor_amax, spec):
        return _kernels.fake_quantize(x, _spec(spec.format), axis=spec.axis)

    def dequantize(self, t, dtype):
        exponent = lax.bitcast_convert_type(t.scale, jnp.uint8)
        return _kernels.dequantize(
            t.data, exponent, t.micro, _spec(t.format), axis=t.axis, dtype=dtype
        )

    def onto(self, x, like, spec):
        exponent = lax.bitcast_convert_type(like.scale, jnp.uint8)
        q = _kernels.quantize_fixed(x, exponent, like.micro, _spec(spec.format), axis=spec.axis)
        return _tensor(x, q, spec)

    def search(self, x, offsets, importance, spec):
        q = _kernels.quantize_search(
            x, _spec(spec.format), axis=spec.axis, offsets=offsets, importance=importance
        )
        return _tensor(x, q, spec)

    def grid(self, like):
        # Each entry's step: 2^(block exponent - (bits - 2) - micro bit).
        block_exp = lax.bitcast_convert_type(like.scale, jnp.uint8).astype(jnp.int32) - 127
        step = expand(block_exp, like) - (like.format.element.bits - 2)
        if like.micro is not None:
            step = step - expand(like.micro.astype(jnp.int32), like, like.format.micro.group)
        return step

    def round_to_grid(self, w, step, fmt):
        # Sign-magnitude integers times 2^step, half to even, saturating.
        top = float((1 << (fmt.element.bits - 1)) - 1)
        return jnp.ldexp(jnp.clip(jnp.round(jnp.ldexp(w, -step)), -top, top), step)


register_family(Microexp())


def _bdr(name: str, element: ElementFormat, micro: MicroExponent | None) -> MXFormat:
    return MXFormat(
        name=name,
        element=element,
        scale=E8M0,
        block_size=16,
        micro=micro,
        family="microexp",
        reference="Rouhani et al., ISCA 2023 (AMD Quark 0.13)",
    )


# Shared microexponents and block floating point (the BDR paper).
register_format(_bdr("mx9", SM_INT8, MICRO_1X2))
register_format(_bdr("mx6", SM_INT5, MICRO_1X2))
register_format(_bdr("mx4", SM_INT3, MICRO_1X2))
register_format(_bdr("msfp16", SM_INT8, None))
register_format(_bdr("msfp12", SM_INT4, None))
