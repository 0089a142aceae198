"""NVFP4: E2M1 elements, an E4M3 scale per 16 (or per 16x16 tile), a float32 tensor scale.

TransformerEngine's arithmetic, bit for bit (see :mod:`._kernels`): the
tensor scale maps the tensor's amax onto E4M3 x E2M1's range, each block
scale is rounded to E4M3, and elements round to E2M1 (nearest even or
stochastic). Post-training: Four Over Six (each block's maximum mapped to 6
or to 4, whichever has less error).
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxmx import codes
from jaxmx.bitstream import pack_codes
from jaxmx.families._common import expand, make_tensor, to_grid
from jaxmx.families.nvfp4 import _kernels
from jaxmx.formats import (
    DEFAULT_OFFSETS,
    FP4_E2M1,
    UE4M3,
    Family,
    FamilyRules,
    MXFormat,
    register_family,
    register_format,
)
from jaxmx.spec import QuantSpec


def _data(raw_codes, spec: QuantSpec):
    if spec.packed:
        return pack_codes(raw_codes, spec.format.element.bits, spec.axis)
    return codes.raw_to_storage(raw_codes, spec.format.element)


class NVFP4(Family):
    name = "nvfp4"
    description = "TransformerEngine's NVFP4: E4M3 block scales under a float32 tensor scale"
    rules = FamilyRules(
        roundings=("nearest_even", "stochastic"),
        scale_modes=("floor",),
        flush_subnormals=False,
        block_sizes="tiles",
        tensor_amax=True,
        array_ops=False,
    )

    def check_format(self, fmt: MXFormat) -> None:
        sc = fmt.scale
        if not (
            fmt.element.name == "fp4_e2m1"
            and sc is not None
            and sc.kind == "float"
            and fmt.tensor_scale
            and fmt.micro is None
        ):
            raise ValueError(
                f"MXFormat {fmt.name!r}: family 'nvfp4' needs FP4 E2M1 elements, a float block "
                "scale and a tensor scale"
            )

    def quantize(self, x, rbits, tensor_amax, spec):
        q = _kernels.nvfp4_quantize(
            x, axis=spec.axis, block_size=spec.block_size, tensor_amax=tensor_amax, rbits=rbits
        )
        data = _data(q.codes, spec)
        return make_tensor(spec, x, data, q.block_scales, tensor_scale=q.tensor_scale)

    def fake_quantize(self, x, rbits, tensor_amax, spec):
        return _kernels.nvfp4_fake_quantize(
            x, axis=spec.axis, block_size=spec.block_size, tensor_amax=tensor_amax, rbits=rbits
        )

    def dequantize(self, t, dtype):
        raw = codes.storage_to_raw(t.data, t.format.element).astype(jnp.uint8)
        return _kernels.nvfp4_dequantize(
            raw, t.scale, t.tensor_scale, axis=t.axis, block_size=t.block_size, dtype=dtype
        )

    def onto(self, x, like, spec):
        c = _kernels.nvfp4_encode(
            x, like.scale, like.tensor_scale, axis=spec.axis, block_size=spec.block_size
        )
        return make_tensor(spec, x, _data(c, spec), like.scale, tensor_scale=like.tensor_scale)

    def search(self, x, offsets, importance, spec):
        if tuple(offsets) != DEFAULT_OFFSETS:
            raise ValueError(
                "NVFP4's search chooses each block's target (6 or 4, Four Over Six); exponent "
                f"offsets apply to power-of-two scales only, got offsets={offsets!r}"
            )
        q = _kernels.nvfp4_quantize_4over6(
            x, axis=spec.axis, block_size=spec.block_size, importance=importance
        )
        data = _data(q.codes, spec)
        return make_tensor(spec, x, data, q.block_scales, tensor_scale=q.tensor_scale)

    def grid(self, like):
        s8 = like.scale.astype(jnp.float32)  # exact: every E4M3 value is a float32
        return expand(s8, like) * like.tensor_scale

    def native_matmuls(self, fmt):
        # lax.scaled_dot takes the E2M1 codes with their E4M3 block scales;
        # the tensor scales multiply the product (jaxmx.native).
        return ("scaled_dot",)

    def round_to_grid(self, w, dec, fmt):
        # E2M1(round(w / dec)) * dec; a zero block scale holds zeros only.
        safe = jnp.where(dec > 0, dec, 1.0)
        return jnp.where(dec > 0, to_grid(w / safe, 0, fmt.element) * safe, 0.0)


register_family(NVFP4())

register_format(
    MXFormat(
        name="nvfp4",
        element=FP4_E2M1,
        scale=UE4M3,
        block_size=16,
        tensor_scale=True,
        family="nvfp4",
        reference="NVIDIA NVFP4 (TransformerEngine; arXiv 2509.25149)",
    )
)
