"""QuantSpec: everything that says how to quantize one tensor, validated once.

:func:`jaxmx.quantize`, :func:`jaxmx.fake_quantize` and the matmuls build a
:class:`QuantSpec` from their arguments and hand it, frozen and hashable, to
the jitted code as one static argument. Every check of a quantization
argument lives here, so a value is refused the same way whichever entry
point it came through.

What each family of formats accepts is data too (``Family.rules``, a
:class:`jaxmx.formats.FamilyRules`): the OCP formats take every scale rule,
rounding and block size; NVFP4 takes 1-D blocks or 2-D tiles and
nearest-even or stochastic rounding; the BDR formats and per-tensor FP8 are
defined with one rounding and their own blocking.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxmx import numerics
from jaxmx.formats import FamilyRules, MXFormat, get_family, get_format

__all__ = ["QuantSpec", "check_axis", "check_flag", "is_positive_int"]


def check_flag(value, name: str) -> bool:
    # Only real booleans: bool("no") is True, and a flag must not flip silently.
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def is_positive_int(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, np.integer)) and v > 0


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: format, blocking, scale rule, rounding, storage.

    Build it with :meth:`make`, which validates; the fields are then final.

    >>> from jaxmx.spec import QuantSpec
    >>> QuantSpec.make("mxfp8", ndim=2, axis=0)
    QuantSpec(format=MXFormat('mxfp8_e4m3', block_size=32), axis=-2, block_size=32, \
scale_mode='floor', rounding='nearest_even', flush_subnormals=False, packed=False)
    """

    format: MXFormat
    # The blocked axis, counted from the end (negative). For 2-D tiles, the
    # last axis; tiles cover the last two.
    axis: int
    # Elements per block along axis; a pair (rows, columns) for 2-D tiles;
    # None for per-tensor formats.
    block_size: int | tuple[int, int] | None
    scale_mode: str = "floor"
    rounding: str = "nearest_even"
    flush_subnormals: bool = False
    # Sub-byte codes packed into bytes (formats whose codes are whole bytes:
    # always False).
    packed: bool = False

    @property
    def rules(self) -> FamilyRules:
        return get_family(self.format).rules

    @property
    def random_bits(self) -> bool:
        """Whether quantizing with this spec consumes random bits."""
        return numerics.rounding_mode(self.rounding).random_bits

    @staticmethod
    def block_size_is_free(fmt: MXFormat) -> bool:
        """Whether ``fmt`` takes a block size other than its own."""
        return get_family(fmt).rules.block_sizes in ("any", "tiles")

    @staticmethod
    def scale_modes_of(fmt: MXFormat) -> tuple[str, ...]:
        """The scale rules ``fmt`` implements (the first is its default)."""
        return get_family(fmt).rules.scale_modes

    @property
    def tiles(self) -> bool:
        return isinstance(self.block_size, tuple)

    @classmethod
    def make(
        cls,
        format,
        ndim: int,
        *,
        axis=-1,
        block_size=None,
        scale_mode: str = "floor",
        rounding: str = "nearest_even",
        flush_subnormals: bool = False,
        packed: bool = False,
    ) -> QuantSpec:
        """Validates every argument and returns the spec.

        Raises:
          ValueError: unknown format, scale mode or rounding; an option the
            format's family does not implement; axis out of range; bad
            block size.
          TypeError: non-int axis or block size, non-bool flags.
        """
        fmt = get_format(format)
        rules = get_family(fmt).rules
        axis = check_axis(axis, ndim)
        if not isinstance(scale_mode, str) or scale_mode not in numerics.SCALE_MODES:
            raise ValueError(
                f"unknown scale_mode {scale_mode!r}; allowed: {', '.join(numerics.SCALE_MODES)}"
            )
        if scale_mode not in rules.scale_modes:
            raise ValueError(
                f"{fmt.name} sets its scales by its own rule ({fmt.reference}); "
                f"scale_mode={scale_mode!r} does not apply to it (allowed: "
                f"{', '.join(rules.scale_modes)})"
            )
        numerics.rounding_mode(rounding)
        if rounding not in rules.roundings:
            raise ValueError(
                f"{fmt.name} implements rounding {', '.join(rules.roundings)} only "
                f"(its reference, {fmt.reference}, defines no other); got {rounding!r}"
            )
        flush = check_flag(flush_subnormals, "flush_subnormals")
        if flush and not rules.flush_subnormals:
            raise ValueError(
                f"flush_subnormals=True is the MX emulator's rule for OCP formats; {fmt.name} "
                "defines its own handling of tiny values (see docs/semantics.md)"
            )
        packed = check_flag(packed, "packed") and fmt.packable
        bs = _check_block_size(block_size, fmt, rules, axis, ndim)
        return cls(fmt, axis, bs, scale_mode, rounding, flush, packed)


def check_axis(axis, ndim: int) -> int:
    """``axis`` validated for rank ``ndim``, counted from the end (negative)."""
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis must be an int, got {axis!r}")
    if ndim == 0:
        raise ValueError("cannot quantize a scalar (0-d array): MX blocks need an axis")
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"axis {axis} is out of range for an array of rank {ndim}; allowed: {-ndim}..{ndim - 1}"
        )
    return int(axis) - ndim if axis >= 0 else int(axis)


def _check_block_size(block_size, fmt: MXFormat, rules: FamilyRules, axis: int, ndim: int):
    kind = rules.block_sizes
    if kind == "tensor":
        if block_size is not None:
            raise ValueError(
                f"{fmt.name} has one scale per tensor and no blocks; got block_size="
                f"{block_size!r} (leave it None)"
            )
        return None
    if block_size is None:
        return fmt.block_size
    if kind == "fixed":
        if block_size != fmt.block_size:
            raise ValueError(
                f"{fmt.name} is defined with blocks of {fmt.block_size}; got block_size="
                f"{block_size!r} (register a format with other blocks to change it)"
            )
        return fmt.block_size
    if kind == "tiles" and isinstance(block_size, tuple):
        if len(block_size) != 2 or not all(is_positive_int(b) for b in block_size):
            raise ValueError(
                f"2-D tiles take a pair of positive ints, e.g. (16, 16); got {block_size!r}"
            )
        if ndim < 2:
            raise ValueError(f"2-D tiles need an array of rank >= 2, got rank {ndim}")
        if axis != -1:
            raise ValueError(
                f"2-D tiles cover the last two axes; pass axis=-1 (got axis={axis}); move "
                "other axes last first"
            )
        return (int(block_size[0]), int(block_size[1]))
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        allowed = (
            "a positive int, a pair of ints (2-D tiles)" if kind == "tiles" else "a positive int"
        )
        raise TypeError(f"block_size must be {allowed} or None, got {block_size!r}")
    if block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size}")
    return int(block_size)
