"""Argument checks shared by the post-training methods."""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxmx import numerics
from jaxmx.formats import MXFormat, get_family, get_format
from jaxmx.spec import QuantSpec

_SCALE_MODES = numerics.SCALE_MODES


# --------------------------------------------------------------------------
# Checks shared by the methods.
# --------------------------------------------------------------------------


def _check_format(format: Any) -> MXFormat:
    """A format whose family implements the methods (a scale search and a fixed grid)."""
    fmt = get_format(format)
    if not get_family(fmt).searchable:
        if fmt.scale is None:
            raise ValueError(
                f"{fmt.name} has one scale per tensor and no blocks to choose scales for; the "
                "PTQ methods take block formats (OCP MX, NVFP4, MX9/MX6/MX4, MSFP)"
            )
        raise ValueError(
            f"{fmt.name}'s family {fmt.family!r} implements no scale search, so the PTQ "
            "methods cannot take it (a family provides them with Family.search, onto, grid "
            "and round_to_grid)"
        )
    return fmt


def _spec(
    fmt: MXFormat, ndim: int, axis: Any, block_size: Any, scale_mode: Any, packed: bool = False
) -> QuantSpec:
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


def _check_scale_mode(scale_mode: Any) -> str:
    if not isinstance(scale_mode, str) or scale_mode not in _SCALE_MODES:
        raise ValueError(f"unknown scale_mode {scale_mode!r}; allowed: {', '.join(_SCALE_MODES)}")
    return scale_mode


def _check_offsets(offsets: Any) -> tuple[int, ...]:
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
