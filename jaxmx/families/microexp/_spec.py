"""The microexponent formats as records, and what their kernels are given.

:class:`MicroexpSpec` describes how one shared-exponent format lays out a
block (element width, block and sub-block sizes); the five formats of the
BDR paper are :data:`SPECS`. :class:`MicroexpCodes` is what quantization
returns. The public functions check their arguments here and hand each
jitted kernel one hashable :class:`Static` (format, axis, and the search
offsets or output dtype where a kernel has them).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmx import numerics

__all__ = [
    "MicroexpSpec",
    "MicroexpCodes",
    "SPECS",
    "MX9",
    "MX6",
    "MX4",
    "MSFP16",
    "MSFP12",
    "get_spec",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MicroexpSpec:
    """How one shared-exponent format lays out a block (hashable: a static jit argument).

    >>> MX6.element_bits, MX6.max_code, MX6.bits_per_element
    (5, 15, 6.0)
    >>> MSFP12.sub_block_size is None, MSFP12.bits_per_element
    (True, 4.5)
    """

    name: str  # registry name, e.g. "mx6"
    mantissa_bits: int  # magnitude bits of an element code; the sign is one more bit
    block_size: int = 16  # elements sharing one 8-bit exponent
    sub_block_size: int | None = 2  # elements sharing one microexponent bit; None: no micro
    exponent_bits: int = 8  # width of the shared exponent (E8M0, bias 127); only 8

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"name must be a non-empty string, got {self.name!r}")
        for field in ("mantissa_bits", "block_size", "exponent_bits"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{field} must be an int, got {v!r}")
        # Codes live in uint8 (sign + magnitude <= 8 bits), and the rounding
        # below keeps at least 17 bits of every significand to drop.
        if not 1 <= self.mantissa_bits <= 7:
            raise ValueError(f"mantissa_bits must be 1..7, got {self.mantissa_bits}")
        if self.block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {self.block_size}")
        if self.exponent_bits != 8:
            raise ValueError(
                f"exponent_bits must be 8 (an E8M0 shared exponent), got {self.exponent_bits}"
            )
        sub = self.sub_block_size
        if sub is not None:
            if isinstance(sub, bool) or not isinstance(sub, int):
                raise TypeError(f"sub_block_size must be an int or None, got {sub!r}")
            # Quark switches the microexponent off with sub_block_size = block_size;
            # here that is spelled None, so one configuration has one spelling.
            if not 1 <= sub < self.block_size or self.block_size % sub:
                raise ValueError(
                    f"sub_block_size must divide block_size {self.block_size} and be "
                    f"smaller than it (None: no microexponent), got {sub}"
                )
            # A block's microexponents travel as one 32-bit mask.
            if self.block_size // sub > 32:
                raise ValueError(
                    f"at most 32 sub-blocks per block, got {self.block_size} // {sub} "
                    f"= {self.block_size // sub}"
                )

    @property
    def element_bits(self) -> int:
        """Bits of one element code: sign + magnitude (Quark's ``quant_bit``)."""
        return 1 + self.mantissa_bits

    @property
    def max_code(self) -> int:
        """Largest code magnitude, ``2^mantissa_bits - 1``."""
        return (1 << self.mantissa_bits) - 1

    @property
    def subs_per_block(self) -> int:
        """Microexponent bits per block (1 without microexponents, for the layout)."""
        return 1 if self.sub_block_size is None else self.block_size // self.sub_block_size

    @property
    def bits_per_element(self) -> float:
        """Stored bits per element in whole blocks: code + exponent share + micro share."""
        micro = 0.0 if self.sub_block_size is None else 1.0 / self.sub_block_size
        return self.element_bits + self.exponent_bits / self.block_size + micro


MX9 = MicroexpSpec(name="mx9", mantissa_bits=7)
MX6 = MicroexpSpec(name="mx6", mantissa_bits=4)
MX4 = MicroexpSpec(name="mx4", mantissa_bits=2)
MSFP16 = MicroexpSpec(name="msfp16", mantissa_bits=7, sub_block_size=None)
MSFP12 = MicroexpSpec(name="msfp12", mantissa_bits=3, sub_block_size=None)
SPECS: dict[str, MicroexpSpec] = {s.name: s for s in (MX9, MX6, MX4, MSFP16, MSFP12)}


def get_spec(spec: str | MicroexpSpec) -> MicroexpSpec:
    """A spec from its name (``"mx9"``, ...) or the spec itself.

    >>> get_spec("mx4").mantissa_bits
    2
    """
    if isinstance(spec, MicroexpSpec):
        return spec
    if isinstance(spec, str) and spec in SPECS:
        return SPECS[spec]
    raise ValueError(f"unknown format {spec!r}; allowed: {', '.join(SPECS)} or a MicroexpSpec")


class MicroexpCodes(NamedTuple):
    """What :func:`quantize` returns (a pytree: passes through jit and vmap)."""

    mantissas: jax.Array  # uint8 sign << mantissa_bits | magnitude, x's shape
    shared_exponent: jax.Array  # uint8 block_exp + 127 (0xFF: NaN/Inf in block), axis -> blocks
    micro: jax.Array | None  # uint8 0/1 per sub-block, axis -> blocks * subs; None without


@dataclasses.dataclass(frozen=True)
class Static:
    """Everything static about one kernel call: jit's one (hashable) static argument.

    ``axis`` is the blocked axis counted from the end; ``offsets`` the
    exponent offsets a search tries; ``dtype`` the dequantized dtype.
    """

    spec: MicroexpSpec
    axis: int
    offsets: tuple[int, ...] = ()
    dtype: Any = None


# --------------------------------------------------------------------------
# Argument checks.
# --------------------------------------------------------------------------


def check_input(x) -> jax.Array:
    x = jnp.asarray(x)
    if not any(x.dtype == d for d in numerics.FLOAT_DTYPES):
        raise TypeError(f"x has dtype {x.dtype}; allowed: float32, bfloat16, float16")
    if x.ndim == 0:
        raise ValueError("x is a scalar (0-d); block formats need an axis")
    return x


def check_axis(axis, ndim: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis must be an int, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"axis {axis} is out of range for rank {ndim}; allowed {-ndim}..{ndim - 1}"
        )
    # Counted from the end, so the same call works on a vmapped (smaller) rank.
    return int(axis) - ndim if axis >= 0 else int(axis)


def replace_axis(shape, axis: int, n: int) -> tuple[int, ...]:
    """``shape`` with the length of ``axis`` (counted from the end) replaced by ``n``."""
    ax = len(shape) + axis
    return (*shape[:ax], n, *shape[ax + 1 :])
