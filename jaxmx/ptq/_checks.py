"""Argument checks shared by the post-training methods."""

from __future__ import annotations

import numpy as np

from jaxmx import _codecs, numerics
from jaxmx.formats import MXFormat, get_format
from jaxmx.spec import QuantSpec

_SCALE_MODES = numerics.SCALE_MODES


# --------------------------------------------------------------------------
# Checks shared by the methods.
# --------------------------------------------------------------------------


# Families whose block scales the methods choose: OCP MX (E8M0 exponents),
# NVFP4 (E4M3 block scales under a tensor scale) and the shared-microexponent
# formats (an E8M0 exponent and micro bits). Per-tensor FP8 has no blocks.
_FAMILIES = ("ocp", *(name for name, c in _codecs.CODECS.items() if c.search is not None))
_DEFAULT_OFFSETS = (0, 1, -1, -2)


def _check_format(format) -> MXFormat:
    fmt = get_format(format)
    if fmt.codec not in _FAMILIES:
        raise ValueError(
            f"{fmt.name} has one scale per tensor and no blocks to choose scales for; the PTQ "
            "methods take block formats (OCP MX, NVFP4, MX9/MX6/MX4, MSFP)"
        )
    return fmt


def _spec(fmt: MXFormat, ndim: int, axis, block_size, scale_mode, packed=False) -> QuantSpec:
    """The blocking of a method's result; 2-D tiles cover the last two axes whatever ``axis``."""
    tiles = isinstance(block_size, tuple)
    return QuantSpec.make(
        fmt,
        ndim,
        axis=-1 if tiles else axis,
        block_size=block_size,
        scale_mode=scale_mode,
        packed=packed,
    )


def _check_scale_mode(scale_mode) -> str:
    if not isinstance(scale_mode, str) or scale_mode not in _SCALE_MODES:
        raise ValueError(f"unknown scale_mode {scale_mode!r}; allowed: {', '.join(_SCALE_MODES)}")
    return scale_mode


def _check_offsets(offsets) -> tuple[int, ...]:
    try:
        got = tuple(offsets)
    except TypeError:
        got = None
    if (
        not got
        or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) for d in got)
        or 0 not in got
        or len(set(got)) != len(got)
    ):
        raise ValueError(
            "offsets must be distinct ints that include 0 (the scale rule's own exponent), "
            f"e.g. (0, -1, -2); got {offsets!r}"
        )
    # 0 first: ties keep the direct cast's exponent (argmin takes the first).
    return (0, *(int(d) for d in got if d != 0))
