"""MX formats described as data.

A block-scaled format is three pieces of data, not a branch in the code:

* an :class:`ElementFormat`: what each element stores (a small float with
  exponent/mantissa bits and a bias, or a symmetric fixed-point integer);
* a :class:`ScaleFormat`: what the shared per-block scale stores (for the OCP
  formats, an 8-bit power of two, E8M0);
* an :class:`MXFormat`: the two together, with the default block size.

The numerics in :mod:`jaxmx.numerics` read only the fields of these records,
so a new format is a new record, not a new code path. The constants of every
card are written exactly (hex floats or bit patterns) and are checked
against ml_dtypes by the test suite.

Reference: OCP Microscaling Formats (MX) Specification v1.0, sections 5.3
(element data types) and 5.4 (scale data type).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Literal

import ml_dtypes
import numpy as np

__all__ = [
    "ElementFormat",
    "ScaleFormat",
    "MXFormat",
    "FP8_E4M3",
    "FP8_E5M2",
    "FP6_E3M2",
    "FP6_E2M3",
    "FP4_E2M1",
    "INT8",
    "INT4",
    "INT2",
    "BF16",
    "FP16",
    "E8M0",
    "UE4M3",
    "MICRO_1X2",
    "SM_INT8",
    "SM_INT5",
    "SM_INT4",
    "SM_INT3",
    "MicroExponent",
    "CODECS",
    "float_format",
    "get_format",
    "list_formats",
    "register_format",
]


_UINT8 = np.dtype(np.uint8)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ElementFormat:
    """The number format of one element of a block.

    Floats follow the usual sign/exponent/mantissa layout with a bias and
    subnormals. Integers (``kind="int"``) are symmetric two's-complement
    fixed point: ``value = code * 2**-mantissa_bits`` with
    ``|code| <= 2**(bits - 1) - 1``. For rounding, an integer format behaves
    exactly like a float whose whole grid is the subnormal range plus one
    binade with minimum exponent 0, which is how :mod:`jaxmx.numerics` treats
    it.
    """

    name: str
    # "float" or "int" (symmetric fixed point).
    kind: Literal["float", "int"]
    # Storage bits per element, sign included.
    bits: int
    # Exponent field width (0 for integers).
    exponent_bits: int
    # Fraction bits: mantissa bits of a float, fractional bits of an integer.
    mantissa_bits: int
    # Exponent bias (integers: 1, so the minimum normal exponent is 0).
    bias: int
    # Largest finite magnitude, written exactly.
    max_normal: float
    # Smallest normal magnitude (integers: the first value of the top binade).
    min_normal: float
    # Smallest nonzero magnitude.
    min_subnormal: float
    # Bit pattern of the largest finite magnitude (sign bit clear).
    max_code: int
    # Whether the format encodes infinities / NaNs.
    has_inf: bool = False
    has_nan: bool = False
    # One-line description of the special values, for the card.
    specials: str = "none"
    # ml_dtypes / numpy dtype that holds one element code in an MXTensor;
    # None: uint8/uint16 (floats and sign-magnitude integers) or int8/int16
    # (two's-complement integers), by width.
    storage_dtype: np.dtype | None = None
    # How an integer's sign is stored: "twos_complement" (MXINT8) or
    # "sign_magnitude" (the BDR formats: a sign bit over the magnitude, so a
    # "-0" code exists). Floats always store sign and magnitude.
    int_encoding: Literal["twos_complement", "sign_magnitude"] = "twos_complement"

    def __post_init__(self):
        _check_element(self)
        if self.storage_dtype is None:
            wide = self.bits > 8
            dtype = (
                (np.int16 if wide else np.int8)
                if self.kind == "int" and self.int_encoding == "twos_complement"
                else (np.uint16 if wide else np.uint8)
            )
            object.__setattr__(self, "storage_dtype", np.dtype(dtype))
        else:
            object.__setattr__(self, "storage_dtype", np.dtype(self.storage_dtype))
        held = (
            4
            if self.storage_dtype == np.dtype(ml_dtypes.float4_e2m1fn)
            else (8 * self.storage_dtype.itemsize)
        )
        if held < self.bits:
            raise ValueError(
                f"element format {self.name!r}: storage_dtype {self.storage_dtype} holds "
                f"{held} bits, fewer than the format's {self.bits}"
            )

    @property
    def emin(self) -> int:
        """Unbiased exponent of the smallest normal (integers: 0)."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Unbiased exponent of the largest normal (``emax_elem`` in the spec)."""
        return math.floor(math.log2(self.max_normal))

    @property
    def sign_bit(self) -> int:
        return 1 << (self.bits - 1)

    def card(self) -> str:
        """A one-paragraph summary: bits, bias, range and special values."""
        if self.kind == "int":
            enc = self.int_encoding.replace("_", "-").replace("twos-", "two's ")
            layout = f"{self.bits}-bit {enc}, value = code * 2^-{self.mantissa_bits}"
        else:
            layout = (
                f"1 sign, {self.exponent_bits} exponent, {self.mantissa_bits} mantissa bits, "
                f"bias {self.bias}"
            )
        return (
            f"{self.name}: {layout}; max {self.max_normal!r} ({float.hex(self.max_normal)}, "
            f"code {self.max_code:#04x}); min normal {self.min_normal!r}; "
            f"min subnormal {self.min_subnormal!r}; specials: {self.specials}"
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScaleFormat:
    """The number format of a block's shared scale.

    Two kinds:

    * ``"pow2"``: a power of two stored as a biased exponent byte. The OCP
      formats' E8M0 (``2**(E - 127)`` for ``E`` in 0..254, 0xFF is NaN, no
      zero) and the 8-bit shared exponent of MX9/MX6/MX4 and MSFP are this.
    * ``"float"``: an unsigned small float whose grid is ``element``'s
      positive half (NVFP4's E4M3 scale: values 2^-9 .. 448, and zero). The
      exponent range is that of ``element``, subnormals included.
    """

    name: str
    # "pow2": a biased exponent byte; "float": an unsigned small float.
    kind: Literal["pow2", "float"]
    bits: int
    bias: int
    # Smallest and largest unbiased exponents a scale can hold (for "float":
    # of its smallest subnormal and of its largest normal).
    min_exponent: int
    max_exponent: int
    # Byte that encodes NaN (a block holding NaN or Inf gets this scale).
    nan_code: int
    storage_dtype: np.dtype = _UINT8
    # "float" scales: the float grid the scale is rounded to (read unsigned).
    element: ElementFormat | None = None

    def __post_init__(self):
        if self.kind not in ("pow2", "float"):
            raise ValueError(
                f"scale format {self.name!r}: unknown kind {self.kind!r}; allowed: pow2, float"
            )
        if _not_int(self.bits) or not 1 <= self.bits <= 8:
            raise ValueError(f"scale format {self.name!r}: bits must be 1..8, got {self.bits!r}")
        top = (1 << self.bits) - 1
        if self.kind == "pow2":
            if self.element is not None:
                raise ValueError(f"scale format {self.name!r}: a pow2 scale has no element")
            if not (
                0 <= self.min_exponent + self.bias <= self.max_exponent + self.bias <= top
                and 0 <= self.nan_code <= top
            ):
                raise ValueError(
                    f"scale format {self.name!r}: exponents {self.min_exponent}.."
                    f"{self.max_exponent} with bias {self.bias} and NaN code {self.nan_code} "
                    f"do not fit {self.bits} bits"
                )
        else:
            e = self.element
            if not isinstance(e, ElementFormat) or e.kind != "float":
                raise ValueError(
                    f"scale format {self.name!r}: a float scale needs a float element format, "
                    f"got {e!r}"
                )
            want = (e.bits, e.bias, 1 - e.bias - e.mantissa_bits, e.emax)
            got = (self.bits, self.bias, self.min_exponent, self.max_exponent)
            if want != got:
                raise ValueError(
                    f"scale format {self.name!r}: (bits, bias, min_exponent, max_exponent) "
                    f"{got} disagree with its element {e.name!r}: {want}"
                )
        if np.dtype(self.storage_dtype).itemsize != 1:
            raise ValueError(
                f"scale format {self.name!r}: storage_dtype must be one byte, "
                f"got {self.storage_dtype}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class MicroExponent:
    """A second scale level: ``bits`` per ``group`` consecutive elements of a block.

    The shared microexponent of MX9/MX6/MX4 (Rouhani et al., ISCA 2023): one
    bit per pair that moves the pair's grid one binade finer when neither
    element reaches the block's exponent.
    """

    name: str
    # Bits per group (1: a shift of 0 or 1 binade).
    bits: int = 1
    # Elements sharing one microexponent.
    group: int = 2

    def __post_init__(self):
        if _not_int(self.bits) or self.bits != 1:
            raise ValueError(f"microexponent {self.name!r}: bits must be 1, got {self.bits!r}")
        if _not_int(self.group) or self.group < 1:
            raise ValueError(
                f"microexponent {self.name!r}: group must be a positive int, got {self.group!r}"
            )


# The arithmetic a format follows, each that of its reference implementation.
# A new format of an existing family is a record; a family is a codec here and
# an implementation in jaxmx (see jaxmx.quantize).
CODECS: dict[str, str] = {
    "ocp": "OCP MX v1.0 section 6.3 (the MX paper's emulator): E8M0 power-of-two block scales",
    "nvfp4": "TransformerEngine's NVFP4: E4M3 block scales under a float32 tensor scale",
    "microexp": "AMD Quark's fake_quantize_mx6_mx9: 8-bit shared exponent + 1-bit microexponents",
    "tensor": "per-tensor current scaling: one float32 scale, amax / max_normal",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MXFormat:
    """A block-scaled format: elements, their scales, and the arithmetic that joins them.

    The OCP MX formats are an element format, an E8M0 scale and a block size.
    Their relatives add data, not code paths: a per-tensor float32 scale
    (``tensor_scale``; NVFP4, per-tensor FP8), a small-float block scale
    (``scale.kind == "float"``; NVFP4's E4M3), a second level of
    microexponents (``micro``; MX9/MX6/MX4), or no block scale at all
    (``scale=None``; per-tensor FP8). ``codec`` names the arithmetic of the
    reference implementation the format is bit-exact with (:data:`CODECS`).
    """

    name: str
    element: ElementFormat
    # The per-block scale; None: no block scale (per-tensor formats).
    scale: ScaleFormat | None
    # Elements sharing one scale, along the quantized axis (None: the tensor).
    block_size: int | None = 32
    # Where the format is defined.
    reference: str = "OCP MX v1.0"
    # A second scale level within each block.
    micro: MicroExponent | None = None
    # Whether a float32 scale per tensor multiplies the block scales.
    tensor_scale: bool = False
    # The arithmetic: a key of CODECS.
    codec: str = "ocp"

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"MXFormat name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.element, ElementFormat):
            raise TypeError(
                f"MXFormat {self.name!r}: element must be an ElementFormat, got "
                f"{type(self.element).__name__}"
            )
        if self.scale is not None and not isinstance(self.scale, ScaleFormat):
            raise TypeError(
                f"MXFormat {self.name!r}: scale must be a ScaleFormat or None, got "
                f"{type(self.scale).__name__}"
            )
        if self.micro is not None and not isinstance(self.micro, MicroExponent):
            raise TypeError(
                f"MXFormat {self.name!r}: micro must be a MicroExponent or None, got "
                f"{type(self.micro).__name__}"
            )
        if not isinstance(self.tensor_scale, (bool, np.bool_)):
            raise TypeError(
                f"MXFormat {self.name!r}: tensor_scale must be True or False, got "
                f"{self.tensor_scale!r}"
            )
        if self.codec not in CODECS:
            raise ValueError(
                f"MXFormat {self.name!r}: unknown codec {self.codec!r}; allowed: "
                f"{', '.join(CODECS)}"
            )
        _check_codec(self)
        if self.scale is None:
            if self.block_size is not None or not self.tensor_scale:
                raise ValueError(
                    f"MXFormat {self.name!r}: without a block scale, block_size must be None "
                    "and tensor_scale True (a per-tensor format)"
                )
            return
        if _not_int(self.block_size) or self.block_size < 1:
            raise ValueError(
                f"MXFormat {self.name!r}: block_size must be a positive int, got "
                f"{self.block_size!r}"
            )
        object.__setattr__(self, "block_size", int(self.block_size))
        if self.micro is not None and self.block_size % self.micro.group:
            raise ValueError(
                f"MXFormat {self.name!r}: microexponent groups of {self.micro.group} do not "
                f"divide blocks of {self.block_size}"
            )

    @property
    def packable(self) -> bool:
        """Whether packing saves memory: sub-byte codes, or microexponent bits."""
        return self.element.bits % 8 != 0 or self.micro is not None

    @property
    def bits_per_element(self) -> float:
        """Storage bits per element, amortized block scales and microexponents
        included (a per-tensor scale, 32 bits per tensor, is not counted)."""
        bits = float(self.element.bits)
        if self.scale is not None:
            bits += self.scale.bits / self.block_size
        if self.micro is not None:
            bits += self.micro.bits / self.micro.group
        return bits

    def __repr__(self) -> str:
        return f"MXFormat({self.name!r}, block_size={self.block_size})"

    def card(self) -> str:
        if self.scale is None:
            scales = "one float32 scale per tensor"
        else:
            scales = (
                f"blocks of {self.block_size} {self.element.name} elements sharing one "
                f"{self.scale.name} scale"
            )
            if self.micro is not None:
                scales += f", {self.micro.bits} microexponent bit per {self.micro.group}"
            if self.tensor_scale:
                scales += ", under a float32 scale per tensor"
        return (
            f"{self.name} ({self.reference}): {scales}, {self.bits_per_element:g} bits per "
            f"element.\n  element: {self.element.card()}"
        )


def _check_codec(f: MXFormat) -> None:
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


def _not_int(v) -> bool:
    return isinstance(v, bool) or not isinstance(v, (int, np.integer))


def _check_element(f: ElementFormat) -> None:
    """Refuses element formats the numerics cannot represent exactly.

    Every field must agree with the others (a card whose ``max_normal`` does
    not match its ``max_code`` would silently decode wrong values).
    """

    def bad(why: str):
        raise ValueError(f"element format {f.name!r}: {why}")

    if not isinstance(f.name, str) or not f.name:
        raise ValueError(f"element format name must be a non-empty string, got {f.name!r}")
    if f.kind not in ("float", "int"):
        bad(f"kind must be 'float' or 'int', got {f.kind!r}")
    if f.int_encoding not in ("twos_complement", "sign_magnitude"):
        bad(f"int_encoding must be 'twos_complement' or 'sign_magnitude', got {f.int_encoding!r}")
    for field in ("bits", "exponent_bits", "mantissa_bits", "bias", "max_code"):
        if _not_int(getattr(f, field)):
            bad(f"{field} must be an int, got {getattr(f, field)!r}")
    if not 2 <= f.bits <= 16:
        bad(f"bits must be 2..16 (codes are held in at most 16 bits), got {f.bits}")
    m = f.mantissa_bits
    if f.kind == "float":
        if f.exponent_bits < 1 or m < 0 or 1 + f.exponent_bits + m != f.bits:
            bad(
                f"a float needs bits == 1 + exponent_bits + mantissa_bits with exponent_bits "
                f">= 1, got bits={f.bits}, exponent_bits={f.exponent_bits}, mantissa_bits={m}"
            )
        field, mant = f.max_code >> m, f.max_code & ((1 << m) - 1)
        top = (
            (1 + mant / 2**m) * 2.0 ** (field - f.bias) if field else mant * 2.0 ** (1 - f.bias - m)
        )
    else:
        if f.exponent_bits != 0 or f.bias != 1 or m != f.bits - 2:
            # value = code * 2^-(bits - 2): magnitudes below 2, as MXINT8's
            # 1.6 fixed point. The shared-exponent rule (emax 0) assumes it;
            # another binary point is the same grid under another scale.
            bad(
                "an int needs exponent_bits=0, bias=1 and mantissa_bits = bits - 2 (a "
                f"sign, one integer bit and bits - 2 fraction bits, as MXINT8), got "
                f"exponent_bits={f.exponent_bits}, bias={f.bias}, mantissa_bits={m}"
            )
        if f.max_code != (1 << (f.bits - 1)) - 1:
            bad(f"an int's max_code must be 2^(bits-1) - 1 = {(1 << (f.bits - 1)) - 1}")
        top = f.max_code * 2.0**-m
    if not 0 < f.max_code < 1 << (f.bits - 1):
        bad(f"max_code {f.max_code:#x} does not fit {f.bits - 1} magnitude bits")
    if f.kind == "float":
        _check_float32_range(f.name, f.emax, 1 - f.bias - m)
    if f.max_normal != top:
        bad(f"max_normal {f.max_normal!r} is not the value of max_code {f.max_code:#x} ({top!r})")
    if f.min_normal != 2.0 ** (1 - f.bias) or f.min_subnormal != 2.0 ** (1 - f.bias - m):
        bad(
            f"min_normal {f.min_normal!r} / min_subnormal {f.min_subnormal!r} must be "
            f"2^(1 - bias) = {2.0 ** (1 - f.bias)!r} / 2^(1 - bias - mantissa_bits) = "
            f"{2.0 ** (1 - f.bias - m)!r}"
        )
    if (f.has_inf or f.has_nan) and f.kind == "int":
        bad("integer formats have no Inf or NaN codes")
    if f.kind == "float" and f.max_code >= (1 << (f.bits - 1)) - 1 and (f.has_inf or f.has_nan):
        bad("has_inf/has_nan need codes above max_code, but max_code is the largest magnitude")


def _check_float32_range(name: str, emax: int, min_subnormal_exp: int) -> None:
    """Codes decode and round through float32 arithmetic: a grid beyond
    float32's exponents (2^-149 .. 2^127) would silently lose values."""
    if emax > 127 or min_subnormal_exp < -149:
        raise ValueError(
            f"element format {name!r}: its values span 2^{min_subnormal_exp} .. 2^{emax}; "
            "jaxmx computes in float32, so element grids must lie within 2^-149 .. 2^127 "
            "(at most 8 exponent bits, with a bias that keeps both ends in range)"
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


# --------------------------------------------------------------------------
# The registry.
# --------------------------------------------------------------------------

_REGISTRY: dict[str, MXFormat] = {}
_ALIASES: dict[str, str] = {}


def register_format(fmt: MXFormat, *, aliases: tuple[str, ...] = ()) -> MXFormat:
    """Adds ``fmt`` (and optional alias names) to the registry.

    Args:
      fmt: the format to register; its ``name`` must be new.
      aliases: other names that :func:`get_format` resolves to ``fmt``.

    Returns:
      ``fmt``, so the call can be used in an assignment.

    >>> import jaxmx
    >>> fmt = jaxmx.MXFormat(name="mxfp8_e4m3_b16", element=jaxmx.formats.FP8_E4M3,
    ...                      scale=jaxmx.formats.E8M0, block_size=16, reference="example")
    >>> jaxmx.register_format(fmt).block_size
    16
    """
    if not isinstance(fmt, MXFormat):
        raise TypeError(f"register_format expects an MXFormat, got {type(fmt).__name__}")
    if not isinstance(aliases, (tuple, list)) or not all(isinstance(a, str) and a for a in aliases):
        # A bare string would register each of its characters as an alias.
        raise TypeError(f"aliases must be a tuple of non-empty names, got {aliases!r}")
    for name in (fmt.name, *aliases):
        if name in _REGISTRY or name in _ALIASES:
            raise ValueError(
                f"format name {name!r} is already registered; names and aliases must be new "
                "(see jaxmx.list_formats(aliases=True))"
            )
    _REGISTRY[fmt.name] = fmt
    for alias in aliases:
        _ALIASES[alias] = fmt.name
    return fmt


def list_formats(*, aliases: bool = False) -> list[str]:
    """Names of the registered formats (and, if asked, their aliases).

    >>> import jaxmx
    >>> jaxmx.list_formats()[:3]
    ['mxfp8_e4m3', 'mxfp8_e5m2', 'mxfp6_e3m2']
    """
    if not isinstance(aliases, (bool, np.bool_)):
        raise TypeError(f"aliases must be True or False, got {aliases!r}")
    names = list(_REGISTRY)
    if aliases:
        names += list(_ALIASES)
    return names


def get_format(fmt: str | MXFormat) -> MXFormat:
    """Resolves a format name (or alias) to its :class:`MXFormat`.

    Args:
      fmt: a registered name such as ``"mxfp4_e2m1"``, an alias such as
        ``"mxfp4"``, or an :class:`MXFormat` (returned unchanged).

    Raises:
      ValueError: ``fmt`` is not a known name; the message lists the known ones.

    >>> import jaxmx
    >>> jaxmx.get_format("mxfp6").name
    'mxfp6_e3m2'
    """
    if isinstance(fmt, MXFormat):
        return fmt
    if not isinstance(fmt, str):
        raise TypeError(f"format must be a format name or an MXFormat, got {type(fmt).__name__}")
    key = fmt.lower()
    key = _ALIASES.get(key, key)
    try:
        return _REGISTRY[key]
    except KeyError:
        known = (
            ", ".join(list_formats())
            + "; aliases: "
            + ", ".join(f"{a} -> {t}" for a, t in _ALIASES.items())
        )
        close = difflib.get_close_matches(key, [*_REGISTRY, *_ALIASES], n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise ValueError(f"unknown format {fmt!r}{hint}; known formats: {known}") from None


def _mx(name: str, element: ElementFormat, reference: str = "OCP MX v1.0") -> MXFormat:
    return MXFormat(name=name, element=element, scale=E8M0, block_size=32, reference=reference)


MXFP8_E4M3 = register_format(_mx("mxfp8_e4m3", FP8_E4M3), aliases=("mxfp8",))
MXFP8_E5M2 = register_format(_mx("mxfp8_e5m2", FP8_E5M2))
# "mxfp6" is E3M2 everywhere (format, preset, recipe): the MX paper's MXFP6.
MXFP6_E3M2 = register_format(_mx("mxfp6_e3m2", FP6_E3M2), aliases=("mxfp6",))
MXFP6_E2M3 = register_format(_mx("mxfp6_e2m3", FP6_E2M3))
MXFP4_E2M1 = register_format(_mx("mxfp4_e2m1", FP4_E2M1), aliases=("mxfp4",))
MXINT8 = register_format(_mx("mxint8", INT8))
MXINT4 = register_format(_mx("mxint4", INT4, reference="jaxmx extension of OCP MX"))
MXINT2 = register_format(_mx("mxint2", INT2, reference="jaxmx extension of OCP MX"))

# NVFP4: NVIDIA's Blackwell format, TransformerEngine's arithmetic.
NVFP4 = register_format(
    MXFormat(
        name="nvfp4",
        element=FP4_E2M1,
        scale=UE4M3,
        block_size=16,
        tensor_scale=True,
        codec="nvfp4",
        reference="NVIDIA NVFP4 (TransformerEngine; arXiv 2509.25149)",
    )
)


def _bdr(name: str, element: ElementFormat, micro: MicroExponent | None) -> MXFormat:
    return MXFormat(
        name=name,
        element=element,
        scale=E8M0,
        block_size=16,
        micro=micro,
        codec="microexp",
        reference="Rouhani et al., ISCA 2023 (AMD Quark 0.13)",
    )


# Shared microexponents and block floating point (the BDR paper).
MX9 = register_format(_bdr("mx9", SM_INT8, MICRO_1X2))
MX6 = register_format(_bdr("mx6", SM_INT5, MICRO_1X2))
MX4 = register_format(_bdr("mx4", SM_INT3, MICRO_1X2))
MSFP16 = register_format(_bdr("msfp16", SM_INT8, None))
MSFP12 = register_format(_bdr("msfp12", SM_INT4, None))


def _per_tensor(name: str, element: ElementFormat) -> MXFormat:
    return MXFormat(
        name=name,
        element=element,
        scale=None,
        block_size=None,
        tensor_scale=True,
        codec="tensor",
        reference="per-tensor current scaling (TransformerEngine Float8CurrentScaling)",
    )


# Per-tensor FP8: the baselines of the BDR paper's comparison.
TENSOR_FP8_E4M3 = register_format(_per_tensor("tensor_fp8_e4m3", FP8_E4M3))
TENSOR_FP8_E5M2 = register_format(_per_tensor("tensor_fp8_e5m2", FP8_E5M2))
