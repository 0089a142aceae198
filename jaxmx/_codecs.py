"""The arithmetic of the non-OCP families, as MXTensor codecs.

Each codec turns a float array into an :class:`~jaxmx.MXTensor` and back
(and fuses the two for fake quantization) for every format whose
``MXFormat.codec`` names it, reading the format record for its parameters:

* ``"nvfp4"``: :mod:`jaxmx._scaled.nvfp4` (TransformerEngine's arithmetic);
  E2M1 codes, E4M3 block scales (``t.scale``), a float32 ``t.tensor_scale``.
* ``"microexp"``: :mod:`jaxmx._scaled.microexp` (AMD Quark's); sign-magnitude
  codes, the 8-bit shared exponent as an E8M0 ``t.scale``, microexponent
  bits in ``t.micro``. The block and group sizes come from the record.
* ``"tensor"``: :mod:`jaxmx._scaled.tensor_fp8`; FP8 codes and one float32
  ``t.tensor_scale``, no block scale.

The OCP codec lives in :mod:`jaxmx.quantize`, which joins them all.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmx import codes
from jaxmx._scaled import microexp, nvfp4, tensor_fp8
from jaxmx.bitstream import pack_codes
from jaxmx.formats import MXFormat
from jaxmx.spec import QuantSpec
from jaxmx.tensor import MXTensor

__all__ = ["Codec", "CODECS"]


class Codec(NamedTuple):
    """One family's arithmetic; ``rbits`` and ``tensor_amax`` may be None."""

    # (x, rbits, tensor_amax, spec) -> MXTensor
    quantize: Callable
    # (x, rbits, tensor_amax, spec) -> array in x's dtype
    fake_quantize: Callable
    # (unpacked MXTensor with its block axis canonical, dtype) -> array
    dequantize: Callable
    # Post-training (jaxmx.ptq); None for a family without block scales.
    # (x, like, spec) -> MXTensor: x rounded to nearest onto the scales of
    # ``like`` (an unpacked tensor of this family), ``spec`` its blocking.
    onto: Callable | None = None
    # (x, offsets, importance or None, spec) -> MXTensor: block scales chosen
    # by (weighted) squared error.
    search: Callable | None = None


def _tensor(t: QuantSpec, x, data, scale, *, tensor_scale=None, micro=None) -> MXTensor:
    return MXTensor(
        data=data,
        scale=scale,
        format=t.format,
        axis=t.axis,
        block_size=t.block_size,
        length=x.shape[t.axis],
        dtype=np.dtype(x.dtype),
        packed=t.packed,
        made_ndim=x.ndim,
        tensor_scale=tensor_scale,
        micro=micro,
    )


# --------------------------------------------------------------------------
# NVFP4.
# --------------------------------------------------------------------------


def _nvfp4_data(raw_codes, spec: QuantSpec):
    elem = spec.format.element
    if spec.packed:
        return pack_codes(raw_codes, elem.bits, spec.axis)
    return codes.raw_to_storage(raw_codes, elem)


def _nvfp4_quantize(x, rbits, tensor_amax, spec: QuantSpec) -> MXTensor:
    q = nvfp4.nvfp4_quantize(
        x, axis=spec.axis, block_size=spec.block_size, tensor_amax=tensor_amax, rbits=rbits
    )
    return _tensor(spec, x, _nvfp4_data(q.codes, spec), q.block_scales, tensor_scale=q.tensor_scale)


def _nvfp4_fake_quantize(x, rbits, tensor_amax, spec: QuantSpec):
    return nvfp4.nvfp4_fake_quantize(
        x, axis=spec.axis, block_size=spec.block_size, tensor_amax=tensor_amax, rbits=rbits
    )


def _nvfp4_dequantize(t: MXTensor, dtype):
    raw = codes.storage_to_raw(t.data, t.format.element).astype(jnp.uint8)
    return nvfp4.nvfp4_dequantize(
        raw, t.scale, t.tensor_scale, axis=t.axis, block_size=t.block_size, dtype=dtype
    )


def _nvfp4_onto(x, like: MXTensor, spec: QuantSpec) -> MXTensor:
    c = nvfp4.nvfp4_encode(
        x, like.scale, like.tensor_scale, axis=spec.axis, block_size=spec.block_size
    )
    return _tensor(spec, x, _nvfp4_data(c, spec), like.scale, tensor_scale=like.tensor_scale)


def _nvfp4_search(x, offsets, importance, spec: QuantSpec) -> MXTensor:
    del offsets  # Four Over Six has two targets, 6 and 4, not exponent offsets
    q = nvfp4.nvfp4_quantize_4over6(
        x, axis=spec.axis, block_size=spec.block_size, importance=importance
    )
    return _tensor(spec, x, _nvfp4_data(q.codes, spec), q.block_scales, tensor_scale=q.tensor_scale)


# --------------------------------------------------------------------------
# Shared microexponents and block floating point.
# --------------------------------------------------------------------------


@functools.cache
def _microexp_spec(fmt: MXFormat) -> microexp.MicroexpSpec:
    # Quark's quant_bit is the element width: sign + magnitude bits.
    return microexp.MicroexpSpec(
        name=fmt.name,
        mantissa_bits=fmt.element.bits - 1,
        block_size=fmt.block_size,
        sub_block_size=None if fmt.micro is None else fmt.micro.group,
    )


def _microexp_tensor(x, q: microexp.MicroexpCodes, spec: QuantSpec) -> MXTensor:
    data, micro = q.mantissas, q.micro
    if spec.packed:
        data = pack_codes(data, spec.format.element.bits, spec.axis)
    if spec.packed and micro is not None:
        micro = pack_codes(micro, 1, spec.axis)
    scale = lax.bitcast_convert_type(q.shared_exponent, spec.format.scale.storage_dtype)
    return _tensor(spec, x, data, scale, micro=micro)


def _microexp_quantize(x, rbits, tensor_amax, spec: QuantSpec) -> MXTensor:
    q = microexp.quantize(x, _microexp_spec(spec.format), axis=spec.axis)
    return _microexp_tensor(x, q, spec)


def _microexp_onto(x, like: MXTensor, spec: QuantSpec) -> MXTensor:
    exponent = lax.bitcast_convert_type(like.scale, jnp.uint8)
    q = microexp.quantize_fixed(
        x, exponent, like.micro, _microexp_spec(spec.format), axis=spec.axis
    )
    return _microexp_tensor(x, q, spec)


def _microexp_search(x, offsets, importance, spec: QuantSpec) -> MXTensor:
    q = microexp.quantize_search(
        x, _microexp_spec(spec.format), axis=spec.axis, offsets=offsets, importance=importance
    )
    return _microexp_tensor(x, q, spec)


def _microexp_fake_quantize(x, rbits, tensor_amax, spec: QuantSpec):
    return microexp.fake_quantize(x, _microexp_spec(spec.format), axis=spec.axis)


def _microexp_dequantize(t: MXTensor, dtype):
    exponent = lax.bitcast_convert_type(t.scale, jnp.uint8)
    return microexp.dequantize(
        t.data, exponent, t.micro, _microexp_spec(t.format), axis=t.axis, dtype=dtype
    )


# --------------------------------------------------------------------------
# Per-tensor FP8.
# --------------------------------------------------------------------------


def _element_name(fmt: MXFormat) -> str:
    return fmt.element.name.removeprefix("fp8_")  # "e4m3" or "e5m2"


def _tensor_quantize(x, rbits, tensor_amax, spec: QuantSpec) -> MXTensor:
    q = tensor_fp8.tensor_fp8_quantize(x, _element_name(spec.format))
    return _tensor(spec, x, q.codes, None, tensor_scale=q.scale)


def _tensor_fake_quantize(x, rbits, tensor_amax, spec: QuantSpec):
    return tensor_fp8.tensor_fp8_fake_quantize(x, _element_name(spec.format))


def _tensor_dequantize(t: MXTensor, dtype):
    return tensor_fp8.tensor_fp8_dequantize(t.data, t.tensor_scale, dtype=dtype)


CODECS: dict[str, Codec] = {
    "nvfp4": Codec(
        _nvfp4_quantize, _nvfp4_fake_quantize, _nvfp4_dequantize, _nvfp4_onto, _nvfp4_search
    ),
    "microexp": Codec(
        _microexp_quantize,
        _microexp_fake_quantize,
        _microexp_dequantize,
        _microexp_onto,
        _microexp_search,
    ),
    "tensor": Codec(_tensor_quantize, _tensor_fake_quantize, _tensor_dequantize),
}
