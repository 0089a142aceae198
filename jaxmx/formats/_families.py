"""What each family (a reference arithmetic) requires of a format record."""

from __future__ import annotations

# The arithmetic a format follows, each that of its reference implementation.
# A new format of an existing family is a record; a family is a codec here and
# an implementation in jaxmx (see jaxmx.quantize).
CODECS: dict[str, str] = {
    "ocp": "OCP MX v1.0 section 6.3 (the MX paper's emulator): E8M0 power-of-two block scales",
    "nvfp4": "TransformerEngine's NVFP4: E4M3 block scales under a float32 tensor scale",
    "microexp": "AMD Quark's fake_quantize_mx6_mx9: 8-bit shared exponent + 1-bit microexponents",
    "tensor": "per-tensor current scaling: one float32 scale, amax / max_normal",
}


def check_codec(f) -> None:
    """Refuses records whose fields the named arithmetic cannot honour.

    Each codec implements one layout; a record that names it with other
    fields (an NVFP4 codec over FP8 elements, OCP blocks with a tensor
    scale) would be quantized as something it does not describe.
    """
    e, sc = f.element, f.scale
    sm_int = e.kind == "int" and e.int_encoding == "sign_magnitude"
    need = {
        "ocp": (
            sc is not None and sc.kind == "pow2" and f.micro is None and not f.tensor_scale
            and not sm_int,
            "an E8M0-style pow2 block scale, no microexponents, no tensor scale, and a float "
            "or two's-complement element",
        ),
        "nvfp4": (
            e.name == "fp4_e2m1" and sc is not None and sc.kind == "float" and f.tensor_scale
            and f.micro is None,
            "FP4 E2M1 elements, a float block scale and a tensor scale",
        ),
        "microexp": (
            sm_int and e.bits <= 8 and sc is not None and sc.name == "e8m0" and not f.tensor_scale,
            "sign-magnitude integer elements of at most 8 bits under an E8M0 shared exponent",
        ),
        "tensor": (
            e.name in ("fp8_e4m3", "fp8_e5m2") and sc is None and f.micro is None,
            "FP8 E4M3 or E5M2 elements and no block scale",
        ),
    }[f.codec]  # fmt: skip
    if not need[0]:
        raise ValueError(f"MXFormat {f.name!r}: codec {f.codec!r} needs {need[1]}")
    if f.codec == "ocp":
        # Values are computed and returned in float32: the finest step of the
        # element grid under the smallest scale must be a float32 number.
        lowest = -e.mantissa_bits if e.kind == "int" else 1 - e.bias - e.mantissa_bits
        lowest += sc.min_exponent
        if lowest < -149:
            raise ValueError(
                f"MXFormat {f.name!r}: element {e.name!r} under the smallest {sc.name} scale "
                f"(2^{sc.min_exponent}) has steps of 2^{lowest}, below float32's smallest "
                "subnormal 2^-149; jaxmx computes in float32, so such a grid cannot be "
                "represented (use an element with fewer mantissa bits or a larger bias)"
            )
