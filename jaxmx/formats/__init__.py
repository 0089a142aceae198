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

A format names its *family* (``MXFormat.family``): the arithmetic of its
reference implementation, a :class:`Family` registered under that name
(:mod:`jaxmx.families` registers OCP MX, NVFP4, the shared-microexponent
formats and per-tensor FP8, each with its formats).

Reference: OCP Microscaling Formats (MX) Specification v1.0, sections 5.3
(element data types) and 5.4 (scale data type).
"""

# ruff: noqa: I001 (records first: the other modules build on them)
from jaxmx.formats._records import ElementFormat
from jaxmx.formats._records import MicroExponent
from jaxmx.formats._records import MXFormat
from jaxmx.formats._records import ScaleFormat
from jaxmx.formats._family import DEFAULT_OFFSETS
from jaxmx.formats._family import DESCRIPTIONS
from jaxmx.formats._family import Family
from jaxmx.formats._family import FamilyRules
from jaxmx.formats._family import get_family
from jaxmx.formats._family import list_families
from jaxmx.formats._family import register_family
from jaxmx.formats._elements import BF16
from jaxmx.formats._elements import E8M0
from jaxmx.formats._elements import FP4_E2M1
from jaxmx.formats._elements import FP6_E2M3
from jaxmx.formats._elements import FP6_E3M2
from jaxmx.formats._elements import FP8_E4M3
from jaxmx.formats._elements import FP8_E5M2
from jaxmx.formats._elements import FP16
from jaxmx.formats._elements import INT2
from jaxmx.formats._elements import INT4
from jaxmx.formats._elements import INT8
from jaxmx.formats._elements import MICRO_1X2
from jaxmx.formats._elements import SM_INT3
from jaxmx.formats._elements import SM_INT4
from jaxmx.formats._elements import SM_INT5
from jaxmx.formats._elements import SM_INT8
from jaxmx.formats._elements import UE4M3
from jaxmx.formats._elements import float_format
from jaxmx.formats._catalog import get_format
from jaxmx.formats._catalog import list_formats
from jaxmx.formats._catalog import register_format

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
    "Family",
    "FamilyRules",
    "register_family",
    "get_family",
    "list_families",
    "DESCRIPTIONS",
    "DEFAULT_OFFSETS",
    "CODECS",
    "float_format",
    "get_format",
    "list_formats",
    "register_format",
    # The registered formats.
    "MXFP8_E4M3",
    "MXFP8_E5M2",
    "MXFP6_E3M2",
    "MXFP6_E2M3",
    "MXFP4_E2M1",
    "MXINT8",
    "MXINT4",
    "MXINT2",
    "NVFP4",
    "MX9",
    "MX6",
    "MX4",
    "MSFP16",
    "MSFP12",
    "TENSOR_FP8_E4M3",
    "TENSOR_FP8_E5M2",
]

# The formats jaxmx ships are registered by their families; their constants
# are read from the registry (the families register before any user code runs).
_REGISTERED = frozenset(__all__[__all__.index("MXFP8_E4M3") :])

# Former name of DESCRIPTIONS (family name -> reference).
CODECS = DESCRIPTIONS


def __getattr__(name: str) -> MXFormat:
    if name in _REGISTERED:
        return get_format(name.lower())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
