"""Per-tensor FP8 (current scaling): FP8 codes under one float32 scale per tensor.

TransformerEngine's ``Float8CurrentScaling``: the scale maps the tensor's
amax onto the element's largest normal (see :mod:`._kernels`). No blocks, so
no post-training scale choice and no structural array ops.
"""

from __future__ import annotations

from jaxmx.families._common import make_tensor
from jaxmx.families.tensor_fp8 import _kernels
from jaxmx.formats import (
    FP8_E4M3,
    FP8_E5M2,
    ElementFormat,
    Family,
    FamilyRules,
    MXFormat,
    register_family,
    register_format,
)


def _element(fmt: MXFormat) -> str:
    return fmt.element.name.removeprefix("fp8_")  # "e4m3" or "e5m2"


class TensorFP8(Family):
    name = "tensor"
    description = "per-tensor current scaling: one float32 scale, amax / max_normal"
    rules = FamilyRules(
        roundings=("nearest_even",),
        scale_modes=("floor",),
        flush_subnormals=False,
        block_sizes="tensor",
        tensor_amax=False,
        array_ops=False,
    )

    def check_format(self, fmt: MXFormat) -> None:
        if fmt.element.name not in ("fp8_e4m3", "fp8_e5m2") or fmt.scale is not None:
            raise ValueError(
                f"MXFormat {fmt.name!r}: family 'tensor' needs FP8 E4M3 or E5M2 elements and "
                "no block scale"
            )
        if fmt.micro is not None:
            raise ValueError(f"MXFormat {fmt.name!r}: family 'tensor' has no microexponents")

    def quantize(self, x, rbits, tensor_amax, spec):
        q = _kernels.tensor_fp8_quantize(x, _element(spec.format))
        return make_tensor(spec, x, q.codes, None, tensor_scale=q.scale)

    def fake_quantize(self, x, rbits, tensor_amax, spec):
        return _kernels.tensor_fp8_fake_quantize(x, _element(spec.format))

    def dequantize(self, t, dtype):
        return _kernels.tensor_fp8_dequantize(t.data, t.tensor_scale, dtype=dtype)


register_family(TensorFP8())


def _per_tensor(name: str, element: ElementFormat) -> MXFormat:
    return MXFormat(
        name=name,
        element=element,
        scale=None,
        block_size=None,
        tensor_scale=True,
        family="tensor",
        reference="per-tensor current scaling (TransformerEngine Float8CurrentScaling)",
    )


# Per-tensor FP8: the baselines of the BDR paper's comparison.
register_format(_per_tensor("tensor_fp8_e4m3", FP8_E4M3))
register_format(_per_tensor("tensor_fp8_e5m2", FP8_E5M2))
