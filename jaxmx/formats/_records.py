"""The format records: element, scale, microexponent and block-scaled format."""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Literal

import ml_dtypes
import numpy as np

from jaxmx.formats._family import get_family

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

    Three kinds:

    * ``"pow2"``: a power of two stored as a biased exponent byte. The OCP
      formats' E8M0 (``2**(E - 127)`` for ``E`` in 0..254, 0xFF is NaN, no
      zero) and the 8-bit shared exponent of MX9/MX6/MX4 and MSFP are this.
    * ``"float"``: an unsigned small float whose grid is ``element``'s
      positive half (NVFP4's E4M3 scale: values 2^-9 .. 448, and zero). The
      exponent range is that of ``element``, subnormals included.
    * ``"float32"``: a float32 number held as float32 (``bits=32``,
      exponents -149 .. 127, ``bias`` and ``nan_code`` 0: NaN is float32's
      own), as blockwise INT8 schemes keep their absmax scales.
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
        object.__setattr__(self, "storage_dtype", np.dtype(self.storage_dtype))
        if self.kind not in ("pow2", "float", "float32"):
            raise ValueError(
                f"scale format {self.name!r}: unknown kind {self.kind!r}; allowed: pow2, float, "
                "float32"
            )
        if self.kind == "float32":
            got = (self.bits, self.bias, self.min_exponent, self.max_exponent, self.nan_code)
            if got != (32, 0, -149, 127, 0) or self.element is not None:
                raise ValueError(
                    f"scale format {self.name!r}: a float32 scale has bits=32, bias=0, "
                    "min_exponent=-149, max_exponent=127, nan_code=0 and no element; got "
                    f"(bits, bias, min_exponent, max_exponent, nan_code) = {got}"
                )
            if np.dtype(self.storage_dtype) != np.dtype(np.float32):
                raise ValueError(
                    f"scale format {self.name!r}: a float32 scale is held in float32, got "
                    f"{self.storage_dtype}"
                )
            return
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


@dataclasses.dataclass(frozen=True, kw_only=True, init=False)
class MXFormat:
    """A block-scaled format: elements, their scales, and the arithmetic that joins them.

    The OCP MX formats are an element format, an E8M0 scale and a block size.
    Their relatives add data, not code paths: a per-tensor float32 scale
    (``tensor_scale``; NVFP4, per-tensor FP8), a small-float block scale
    (``scale.kind == "float"``; NVFP4's E4M3), a second level of
    microexponents (``micro``; MX9/MX6/MX4), or no block scale at all
    (``scale=None``; per-tensor FP8). ``family`` names the arithmetic of the
    reference implementation the format is bit-exact with (a family
    registered with :func:`jaxmx.formats.register_family`; see
    :func:`jaxmx.formats.list_families`). ``codec`` is the former name of
    ``family``, accepted with a DeprecationWarning.
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
    # The arithmetic: the name of a registered family.
    family: str = "ocp"

    def __init__(
        self,
        *,
        name: str,
        element: ElementFormat,
        scale: ScaleFormat | None,
        block_size: int | None = 32,
        reference: str = "OCP MX v1.0",
        micro: MicroExponent | None = None,
        tensor_scale: bool = False,
        family: str | None = None,
        codec: str | None = None,
    ):
        if codec is not None:
            warnings.warn(
                "MXFormat(codec=...) is deprecated; the field is called family now",
                DeprecationWarning,
                stacklevel=2,
            )
            if family is not None and family != codec:
                raise ValueError(
                    f"MXFormat {name!r}: family={family!r} and codec={codec!r} disagree "
                    "(codec is the former name of family; pass family only)"
                )
            family = codec
        values = (name, element, scale, block_size, reference, micro, tensor_scale)
        values += ("ocp" if family is None else family,)
        for f, v in zip(dataclasses.fields(self), values, strict=True):
            object.__setattr__(self, f.name, v)
        self.__post_init__()

    @property
    def codec(self) -> str:
        """Deprecated: the former name of :attr:`family`."""
        warnings.warn(
            "MXFormat.codec is deprecated; read MXFormat.family", DeprecationWarning, stacklevel=2
        )
        return self.family

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
        try:
            family = get_family(self.family)
        except ValueError as e:
            raise ValueError(f"MXFormat {self.name!r}: {e}") from None
        family.check_format(self)
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
