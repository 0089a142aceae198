"""The registry of formats by name, and the formats jaxmx registers."""

from __future__ import annotations

import difflib

import numpy as np

from jaxmx.formats._elements import (
    E8M0,
    FP4_E2M1,
    FP6_E2M3,
    FP6_E3M2,
    FP8_E4M3,
    FP8_E5M2,
    INT2,
    INT4,
    INT8,
    MICRO_1X2,
    SM_INT3,
    SM_INT4,
    SM_INT5,
    SM_INT8,
    UE4M3,
)
from jaxmx.formats._records import ElementFormat, MicroExponent, MXFormat

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
