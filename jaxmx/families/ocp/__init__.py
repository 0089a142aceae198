"""OCP MX v1.0: blocks sharing one power-of-two (E8M0) scale.

The arithmetic is section 6.3 of the specification and the MX paper's
emulator (microxcaling) in its exact mode; see :mod:`._kernels`. This
family takes every scale rule, rounding and block size jaxmx implements,
and is the one whose codes and scales the structural array ops and the
native block-scaled matmuls act on.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxmx import numerics, platforms
from jaxmx.families._common import expand, to_grid
from jaxmx.families.ocp import _kernels, _search
from jaxmx.formats import (
    E8M0,
    FP4_E2M1,
    FP6_E2M3,
    FP6_E3M2,
    FP8_E4M3,
    FP8_E5M2,
    INT2,
    INT4,
    INT8,
    ElementFormat,
    Family,
    FamilyRules,
    MXFormat,
    register_family,
    register_format,
)

# Element formats lax.scaled_dot takes with E8M0 scales.
_NATIVE_ELEMENTS = ("fp8_e4m3", "fp8_e5m2", "fp4_e2m1")


class OCP(Family):
    name = "ocp"
    description = (
        "OCP MX v1.0 section 6.3 (the MX paper's emulator): E8M0 power-of-two block scales"
    )
    rules = FamilyRules(
        roundings=numerics.ROUNDINGS,
        scale_modes=numerics.SCALE_MODES,
        flush_subnormals=True,
        block_sizes="any",
        tensor_amax=False,
        array_ops=True,
    )

    def check_format(self, fmt: MXFormat) -> None:
        e, sc = fmt.element, fmt.scale
        sm_int = e.kind == "int" and e.int_encoding == "sign_magnitude"
        if sc is None or sc.kind != "pow2" or fmt.micro is not None or fmt.tensor_scale or sm_int:
            raise ValueError(
                f"MXFormat {fmt.name!r}: family 'ocp' needs an E8M0-style pow2 block scale, no "
                "microexponents, no tensor scale, and a float or two's-complement element"
            )
        # Values are computed and returned in float32: the finest step of the
        # element grid under the smallest scale must be a float32 number.
        lowest = -e.mantissa_bits if e.kind == "int" else 1 - e.bias - e.mantissa_bits
        lowest += sc.min_exponent
        if lowest < -149:
            raise ValueError(
                f"MXFormat {fmt.name!r}: element {e.name!r} under the smallest {sc.name} scale "
                f"(2^{sc.min_exponent}) has steps of 2^{lowest}, below float32's smallest "
                "subnormal 2^-149; jaxmx computes in float32, so such a grid cannot be "
                "represented (use an element with fewer mantissa bits or a larger bias)"
            )

    def quantize(self, x, rbits, tensor_amax, spec):
        return _kernels.quantize(x, rbits, spec, platforms.forced())

    def fake_quantize(self, x, rbits, tensor_amax, spec):
        return _kernels.fake_quantize(x, rbits, spec)

    def dequantize(self, t, dtype):
        return _kernels.dequantize(t, dtype)

    def onto(self, x, like, spec):
        return _kernels.quantize_with_exponent(
            x, _kernels.exponents(like), spec, platforms.forced()
        )

    def search(self, x, offsets, importance, spec):
        e = _search.search_exponents(x, spec, offsets, importance)
        return _kernels.quantize_with_exponent(x, e, spec, platforms.forced())

    def fake_search(self, x, offsets, spec):
        return _search.fake_search(x, spec, offsets)

    def grid(self, like):
        return expand(jnp.squeeze(_kernels.exponents(like), like.axis), like)

    def round_to_grid(self, w, param, fmt):
        return to_grid(w, param, fmt.element)

    def native_matmuls(self, fmt):
        return ("scaled_dot",) if fmt.element.name in _NATIVE_ELEMENTS else ()


register_family(OCP())


def _mx(name: str, element: ElementFormat, reference: str = "OCP MX v1.0") -> MXFormat:
    return MXFormat(name=name, element=element, scale=E8M0, block_size=32, reference=reference)


register_format(_mx("mxfp8_e4m3", FP8_E4M3), aliases=("mxfp8",))
register_format(_mx("mxfp8_e5m2", FP8_E5M2))
# "mxfp6" is E3M2 everywhere (format, preset, recipe): the MX paper's MXFP6.
register_format(_mx("mxfp6_e3m2", FP6_E3M2), aliases=("mxfp6",))
register_format(_mx("mxfp6_e2m3", FP6_E2M3))
register_format(_mx("mxfp4_e2m1", FP4_E2M1), aliases=("mxfp4",))
register_format(_mx("mxint8", INT8))
register_format(_mx("mxint4", INT4, reference="jaxmx extension of OCP MX"))
register_format(_mx("mxint2", INT2, reference="jaxmx extension of OCP MX"))
