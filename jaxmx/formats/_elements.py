"""The element, scale and microexponent records of the registered formats, and ``float_format``."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from jaxmx.formats._records import (
    ElementFormat,
    MicroExponent,
    ScaleFormat,
    _check_float32_range,
)

# --------------------------------------------------------------------------
# Element formats. Values: OCP MX v1.0 tables 2-4; ml_dtypes agrees (tested).
# --------------------------------------------------------------------------

FP8_E4M3 = ElementFormat(
    name="fp8_e4m3",
    kind="float",
    bits=8,
    exponent_bits=4,
    mantissa_bits=3,
    bias=7,
    max_normal=float.fromhex("0x1.Cp8"),  # 448 = 1.75 * 2^8, code S.1111.110
    min_normal=float.fromhex("0x1p-6"),  # 0.015625
    min_subnormal=float.fromhex("0x1p-9"),  # 0.001953125
    max_code=0x7E,
    has_nan=True,
    specials="no Inf; NaN = S.1111.111 (0x7F, 0xFF)",
    storage_dtype=np.dtype(ml_dtypes.float8_e4m3fn),
)
"""FP8 E4M3 (``float8_e4m3fn``): 1/4/3 bits, bias 7, max 448, no Inf."""

FP8_E5M2 = ElementFormat(
    name="fp8_e5m2",
    kind="float",
    bits=8,
    exponent_bits=5,
    mantissa_bits=2,
    bias=15,
    max_normal=float.fromhex("0x1.Cp15"),  # 57344 = 1.75 * 2^15, code S.11110.11
    min_normal=float.fromhex("0x1p-14"),  # 6.103515625e-05
    min_subnormal=float.fromhex("0x1p-16"),  # 1.52587890625e-05
    max_code=0x7B,
    has_inf=True,
    has_nan=True,
    specials="+-Inf = S.11111.00 (0x7C, 0xFC); NaN = S.11111.{01,10,11}",
    storage_dtype=np.dtype(ml_dtypes.float8_e5m2),
)
"""FP8 E5M2 (``float8_e5m2``): 1/5/2 bits, bias 15, max 57344, IEEE-style Inf/NaN."""

FP6_E3M2 = ElementFormat(
    name="fp6_e3m2",
    kind="float",
    bits=6,
    exponent_bits=3,
    mantissa_bits=2,
    bias=3,
    max_normal=float.fromhex("0x1.Cp4"),  # 28 = 1.75 * 2^4, code S.111.11
    min_normal=float.fromhex("0x1p-2"),  # 0.25
    min_subnormal=float.fromhex("0x1p-4"),  # 0.0625
    max_code=0x1F,
    storage_dtype=np.dtype(np.uint8),  # XLA has no FP6 type: 6-bit codes in a byte
)
"""FP6 E3M2 (``float6_e3m2fn``): 1/3/2 bits, bias 3, max 28, no Inf/NaN."""

FP6_E2M3 = ElementFormat(
    name="fp6_e2m3",
    kind="float",
    bits=6,
    exponent_bits=2,
    mantissa_bits=3,
    bias=1,
    max_normal=float.fromhex("0x1.Ep2"),  # 7.5 = 1.875 * 2^2, code S.11.111
    min_normal=float.fromhex("0x1p0"),  # 1.0
    min_subnormal=float.fromhex("0x1p-3"),  # 0.125
    max_code=0x1F,
    storage_dtype=np.dtype(np.uint8),
)
"""FP6 E2M3 (``float6_e2m3fn``): 1/2/3 bits, bias 1, max 7.5, no Inf/NaN."""

FP4_E2M1 = ElementFormat(
    name="fp4_e2m1",
    kind="float",
    bits=4,
    exponent_bits=2,
    mantissa_bits=1,
    bias=1,
    max_normal=float.fromhex("0x1.8p2"),  # 6 = 1.5 * 2^2, code S.11.1
    min_normal=float.fromhex("0x1p0"),  # 1.0
    min_subnormal=float.fromhex("0x1p-1"),  # 0.5
    max_code=0x7,
    specials="none; magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}",
    storage_dtype=np.dtype(ml_dtypes.float4_e2m1fn),
)
"""FP4 E2M1 (``float4_e2m1fn``): 1/2/1 bits, bias 1, max 6, no Inf/NaN."""

INT8 = ElementFormat(
    name="int8",
    kind="int",
    bits=8,
    exponent_bits=0,
    mantissa_bits=6,
    bias=1,
    max_normal=float.fromhex("0x1.FCp0"),  # 127/64 = 1.984375, code 127
    min_normal=float.fromhex("0x1p0"),  # 1.0 (code 64)
    min_subnormal=float.fromhex("0x1p-6"),  # 1/64, the step
    max_code=0x7F,
    specials="none; symmetric, code -128 unused",
    storage_dtype=np.dtype(np.int8),
)
"""INT8 of MXINT8: two's complement Q1.6, value = code / 64, symmetric +-127/64."""

INT4 = ElementFormat(
    name="int4",
    kind="int",
    bits=4,
    exponent_bits=0,
    mantissa_bits=2,
    bias=1,
    max_normal=float.fromhex("0x1.Cp0"),  # 7/4 = 1.75, code 7
    min_normal=float.fromhex("0x1p0"),  # 1.0 (code 4)
    min_subnormal=float.fromhex("0x1p-2"),  # 1/4, the step
    max_code=0x7,
    specials="none; symmetric, code -8 unused",
    storage_dtype=np.dtype(np.int8),
)
"""INT4 (jaxmx extension): value = code / 4, symmetric +-7/4."""

INT2 = ElementFormat(
    name="int2",
    kind="int",
    bits=2,
    exponent_bits=0,
    mantissa_bits=0,
    bias=1,
    max_normal=float.fromhex("0x1p0"),  # 1, code 1
    min_normal=float.fromhex("0x1p0"),
    min_subnormal=float.fromhex("0x1p0"),
    max_code=0x1,
    specials="none; values {-1, 0, 1}, code -2 unused",
    storage_dtype=np.dtype(np.int8),
)
"""INT2 (jaxmx extension): values {-1, 0, 1}."""


def _sign_magnitude_int(bits: int) -> ElementFormat:
    # The BDR formats' elements: a sign bit over bits - 1 magnitude bits, read
    # as Q1.(bits - 2) fixed point under the block's power of two.
    m = bits - 2
    return ElementFormat(
        name=f"int{bits}_sm",
        kind="int",
        bits=bits,
        exponent_bits=0,
        mantissa_bits=m,
        bias=1,
        max_normal=((1 << (bits - 1)) - 1) * 2.0**-m,
        min_normal=1.0,
        min_subnormal=2.0**-m,
        max_code=(1 << (bits - 1)) - 1,
        specials="none; sign-magnitude, so a -0 code exists",
        int_encoding="sign_magnitude",
    )


SM_INT8 = _sign_magnitude_int(8)
"""Sign + 7-bit magnitude (MX9, MSFP16): value = code / 64, +-127/64."""
SM_INT5 = _sign_magnitude_int(5)
"""Sign + 4-bit magnitude (MX6): value = code / 8, +-15/8."""
SM_INT4 = _sign_magnitude_int(4)
"""Sign + 3-bit magnitude (MSFP12): value = code / 4, +-7/4."""
SM_INT3 = _sign_magnitude_int(3)
"""Sign + 2-bit magnitude (MX4): value = code / 2, +-3/2."""


def float_format(
    exponent_bits: int, mantissa_bits: int, *, bias: int | None = None, name: str | None = None
) -> ElementFormat:
    """An IEEE-754-style binary float: the all-ones exponent holds Inf and NaN.

    Useful with :func:`jaxmx.round_to` to emulate narrow vector units, e.g. a
    12-bit bfloat (8 exponent bits, 3 mantissa bits).

    >>> import jaxmx
    >>> f = jaxmx.formats.float_format(8, 3)
    >>> f.name, f.max_normal == float.fromhex("0x1.Ep127")
    ('float_e8m3', True)
    """
    if exponent_bits < 2 or mantissa_bits < 0 or exponent_bits + mantissa_bits > 15:
        raise ValueError(
            f"float_format needs 2 <= exponent_bits and exponent_bits + mantissa_bits <= 15, "
            f"got exponent_bits={exponent_bits}, mantissa_bits={mantissa_bits}"
        )
    bias = (1 << (exponent_bits - 1)) - 1 if bias is None else bias
    emax = (1 << exponent_bits) - 2 - bias
    name = name or f"float_e{exponent_bits}m{mantissa_bits}"
    _check_float32_range(name, emax, 1 - bias - mantissa_bits)
    return ElementFormat(
        name=name,
        kind="float",
        bits=1 + exponent_bits + mantissa_bits,
        exponent_bits=exponent_bits,
        mantissa_bits=mantissa_bits,
        bias=bias,
        max_normal=(2.0 - 2.0**-mantissa_bits) * 2.0**emax,
        min_normal=2.0 ** (1 - bias),
        min_subnormal=2.0 ** (1 - bias - mantissa_bits),
        max_code=(((1 << exponent_bits) - 1) << mantissa_bits) - 1,
        has_inf=True,
        has_nan=True,
        specials="IEEE: exponent all ones holds +-Inf (mantissa 0) and NaN",
    )


BF16 = float_format(8, 7, name="bfloat16")
"""bfloat16: 1/8/7 bits, bias 127, max 0x1.FEp127 (code 0x7F7F), IEEE Inf/NaN."""

FP16 = float_format(5, 10, name="float16")
"""float16 (IEEE binary16): 1/5/10 bits, bias 15, max 65504 (code 0x7BFF), Inf/NaN."""

E8M0 = ScaleFormat(
    name="e8m0",
    kind="pow2",
    bits=8,
    bias=127,
    min_exponent=-127,  # byte 0x00: 2^-127, a float32 subnormal
    max_exponent=127,  # byte 0xFE: 2^127
    nan_code=0xFF,
    storage_dtype=np.dtype(ml_dtypes.float8_e8m0fnu),
)
"""E8M0 (``float8_e8m0fnu``): 2^(E-127) for E in 0..254; 0xFF is NaN; no zero."""

UE4M3 = ScaleFormat(
    name="ue4m3",
    kind="float",
    bits=8,
    bias=7,
    min_exponent=-9,  # 2^-9, the smallest E4M3 subnormal
    max_exponent=8,  # 448 = 1.75 * 2^8
    nan_code=0x7F,
    storage_dtype=np.dtype(ml_dtypes.float8_e4m3fn),
    element=FP8_E4M3,
)
"""Unsigned E4M3 (``float8_e4m3fn``, sign clear): NVFP4's block scale, 0 and 2^-9 .. 448."""

MICRO_1X2 = MicroExponent(name="micro1x2", bits=1, group=2)
"""One microexponent bit per pair of elements (MX9/MX6/MX4)."""
