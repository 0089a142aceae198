"""Quantization maps for optimizer state: the value tables and fast lookups into them.

A map is a sorted table of at most 256 float32 values in [-1, 1]. A code is
an index into it; a block of state is stored as codes plus one scale, and
decodes to ``values[code] * scale``. Two families are used by the published
low-bit optimizers:

* the **dynamic map** (Dettmers 2016, "8-Bit Approximations for Parallelism
  in Deep Learning", arXiv:1511.04561; the ``create_dynamic_map`` of
  bitsandbytes): decades ``10**-(E-1) .. 10**0``, decade ``i`` holding the
  midpoints of an even split of ``[0.1, 1]`` into ``2**i`` (signed) or
  ``2**(i+1)`` (unsigned) parts, plus 0 and 1. With ``bits`` total bits
  ``E = bits - 1``: 8 bits give bitsandbytes' ``dynamic`` and ``udynamic``
  maps, 4 signed bits the first-moment map of Li et al. (NeurIPS 2023).
  The signed map has +1 but no -1 (its largest negative value is
  -0.99297 at 8 bits, -0.8875 at 4 bits), as in both references.
* the **linear map without zero** (Li et al. 2023, section 4.2):
  ``(i + 1) / 2**bits`` for ``i = 0 .. 2**bits - 1``. Excluding zero keeps a
  small second moment from decoding to 0, which would blow up ``m / sqrt(v)``.

Encoding picks, for a normalized value ``n``, the map value nearest to it in
exact arithmetic (ties go to the smaller magnitude), or one of the two
neighbours at random with probabilities that make the result unbiased
(stochastic rounding). bitsandbytes and Li et al. find the nearest value with
a binary search over the table, which on a CPU is eight dependent gathers per
element; here the search is replaced by one lookup keyed on the float32 bit
pattern of ``|n|`` (its exponent and top mantissa bits), fine enough that
each key range contains at most one decision threshold, then one compare.
The tables are built in float64 NumPy once per map.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["QuantMap", "dynamic_map", "linear_map"]

_MAX_CELL_BITS = 12  # finest key: 12 mantissa bits (4096 cells per binade)
_TWO_BITS = 0x40000000  # float32 bit pattern of 2.0; |n| never reaches it


def _dynamic_values(signed: bool, bits: int) -> np.ndarray:
    exponents = bits - 1  # number of decades, E
    values = [0.0, 1.0]
    for i in range(exponents):
        parts = 2**i if signed else 2 ** (i + 1)
        edges = np.linspace(0.1, 1.0, parts + 1)
        means = (edges[:-1] + edges[1:]) / 2.0 * 10.0 ** (i - (exponents - 1))
        values += list(means)
        if signed:
            values += list(-means)
    out = np.sort(np.asarray(values, np.float64).astype(np.float32))
    if len(out) != 2**bits or len(np.unique(out)) != len(out):
        raise AssertionError(f"dynamic map of {bits} bits has {len(out)} values")
    return out


def _threshold_bits(points: np.ndarray, strict: bool) -> np.ndarray:
    """Smallest float32 bit pattern ``b`` with ``float(b) > p`` (strict) or ``>= p``."""
    out = []
    for p in points:
        f = np.float32(p)
        if float(f) < p or (strict and float(f) == p):
            f = np.nextafter(f, np.float32(np.inf), dtype=np.float32)
        out.append(int(np.asarray(f, np.float32).view(np.uint32)))
    return np.asarray(out, np.int64)


def _cells(thresholds: list[np.ndarray]) -> tuple[int, int, list[np.ndarray], list[np.ndarray]]:
    """Lookup tables keyed on ``bits >> shift``, one per threshold list.

    For a key range (cell) the tables hold how many thresholds lie at or
    below the cell's first bit pattern (``base``) and the single threshold
    strictly inside the cell, if any (``inside``, else 0xFFFFFFFF), so that
    ``count(bits >= T_j) == base + (bits >= inside)``. The finest key needed
    is the coarsest one that leaves at most one threshold inside every cell;
    :func:`_tables` packs both into one uint32 per cell.
    """
    lowest = min(int(t.min()) for t in thresholds if len(t))
    for cell_bits in range(4, _MAX_CELL_BITS + 1):
        shift = 23 - cell_bits
        first, last = lowest >> shift, (_TWO_BITS >> shift) - 1
        starts = np.arange(first, last + 1, dtype=np.int64) << shift
        bases, insides, ok = [], [], True
        for t in thresholds:
            base = np.searchsorted(t, starts, side="right")
            ends = np.searchsorted(t, starts + (1 << shift), side="left")
            if np.any(ends - base > 1):
                ok = False
                break
            inside = np.where(ends > base, t[np.minimum(base, len(t) - 1)], 0xFFFFFFFF)
            bases.append(base.astype(np.uint8))
            insides.append(inside.astype(np.uint32))
        if ok:
            return shift, first, bases, insides
    raise AssertionError("map values are too close together for the lookup tables")


@dataclasses.dataclass(frozen=True)
class QuantMap:
    """A quantization map: sorted float32 values, codes index them.

    Build one with :func:`dynamic_map` or :func:`linear_map`. Hashable, so
    it can be static metadata of a jitted function.

    >>> m = dynamic_map(signed=True, bits=4)
    >>> m.values[:3], m.values[-2:]
    (array([-0.8875, -0.6625, -0.4375], dtype=float32), array([0.8875, 1.    ], dtype=float32))
    >>> m.decode(m.encode(jnp.array([0.3, -0.03, 0.0])))
    Array([ 0.2125, -0.0325,  0.    ], dtype=float32)
    """

    name: str  # "dynamic" or "linear"
    bits: int  # code width; the map has 2**bits values
    signed: bool  # whether the map holds negative values
    zero: bool = True  # whether encoding may produce the value 0 (False: Li et al.'s "DE-0")

    def __post_init__(self):
        if self.name not in ("dynamic", "linear"):
            raise ValueError(f"unknown map {self.name!r}; allowed: 'dynamic', 'linear'")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"map bits must be an int in 2..8, got {self.bits!r}")
        if self.name == "linear" and self.signed:
            raise ValueError("the linear map without zero is unsigned (second moments)")
        if self.name == "linear" and self.zero:
            raise ValueError("the linear map (i + 1) / 2**bits has no zero; use zero=False")
        if self.signed and not self.zero:
            raise ValueError("zero=False is for unsigned maps; a signed map needs 0 (zero=True)")

    @property
    def values(self) -> np.ndarray:
        """The sorted float32 values; code ``i`` decodes to ``values[i]``."""
        return _tables(self)["values"]

    @property
    def zero_code(self) -> int:
        """Code of the smallest magnitude encoding can produce (0's code when signed)."""
        return _tables(self)["zero"]

    def encode(self, n: jax.Array, rbits: jax.Array | None = None) -> jax.Array:
        """Codes (uint8) of normalized values ``n`` (float32, nominally in [-1, 1]).

        Args:
          n: normalized values; magnitudes beyond the map's end saturate, and
            an unsigned map takes ``|n|``.
          rbits: uint32 random bits shaped like ``n`` for stochastic rounding;
            None rounds to the nearest map value (ties to the smaller magnitude).

        Returns:
          uint8 codes shaped like ``n``.
        """
        t = _tables(self)
        bits = lax.bitcast_convert_type(n.astype(jnp.float32), jnp.uint32)
        mag = bits & jnp.uint32(0x7FFFFFFF)
        cell = jnp.clip((mag >> t["shift"]).astype(jnp.int32) - t["first"], 0, t["cells"] - 1)
        if self.signed:
            negative = (bits >> 31).astype(jnp.int32)
            cell = cell + negative * t["cells"]
        # Position inside the cell; 0 below the first cell (clipped into it).
        low = jnp.where(
            mag < jnp.uint32(t["first"] << t["shift"]), 0, mag & jnp.uint32((1 << t["shift"]) - 1)
        )
        # One lookup per element, used once (so XLA fuses it): the entry is
        # base * 2**23 + 2**23 - offset, with base the number of thresholds
        # below the cell and offset that of the threshold inside it (2**23
        # when none), so adding the position gives base + (low >= offset)
        # in the top bits.
        entry = lookup(t["floor" if rbits is not None else "near"], cell)
        idx = ((entry + low) >> 23).astype(jnp.int32)
        if rbits is not None:
            if self.signed:
                row = negative * t["mags"].shape[1]
                last = jnp.where(negative == 1, t["last"][1], t["last"][0])
            else:
                row, last = 0, int(t["last"][0])
            flat = t["mags"].reshape(-1)
            lo = lookup(flat, row + idx)
            hi = lookup(flat, row + jnp.minimum(idx + 1, last))
            gap = hi - lo
            a = lax.bitcast_convert_type(mag, jnp.float32)
            p = jnp.where(gap > 0, (a - lo) / jnp.where(gap > 0, gap, 1.0), 0.0)
            # 24 random bits as a uniform number in [0, 1): up with probability p.
            u = (rbits >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)
            idx = jnp.minimum(idx + (u < p).astype(jnp.int32), last)
        if self.signed:
            idx = jnp.where(negative == 1, -idx, idx)
        return (t["zero"] + idx).astype(jnp.uint8)

    def decode(self, codes: jax.Array) -> jax.Array:
        """float32 map values of ``codes``."""
        return lookup(self.values, codes.astype(jnp.int32))


def lookup(table, index: jax.Array) -> jax.Array:
    """``table[index]`` for in-range integer indices, as one plain gather.

    ``jnp`` indexing wraps negative indices and guards the bounds, which on
    XLA:CPU costs about two extra passes over the index array.
    """
    table = jnp.asarray(table)
    dims = lax.GatherDimensionNumbers(
        offset_dims=(), collapsed_slice_dims=(0,), start_index_map=(0,)
    )
    return lax.gather(
        table, index[..., None], dims, (1,), mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS
    )


def dynamic_map(*, signed: bool, bits: int = 8, zero: bool = True) -> QuantMap:
    """The dynamic (decade) map of bitsandbytes / Li et al.

    Args:
      signed: True for first moments (values in [-1, 1]), False for second
        moments ([0, 1]).
      bits: code width; 8 is bitsandbytes' map, 4 the first-moment map of
        Li et al. 2023.
      zero: for an unsigned map, False never encodes to 0 (values below the
        smallest positive one round up to it): Li et al.'s "DE-0", their fix
        of the zero-point problem (a second moment stored as 0 makes
        ``m / (sqrt(v) + eps)`` explode at the next step).

    >>> dynamic_map(signed=False, bits=8).values[:3]
    array([0.00e+00, 3.25e-07, 7.75e-07], dtype=float32)
    """
    return QuantMap("dynamic", bits, bool(signed), bool(zero))


def linear_map(*, bits: int = 4) -> QuantMap:
    """The unsigned linear map without zero, ``(i + 1) / 2**bits`` (Li et al. 2023).

    >>> linear_map(bits=4).values[:3]
    array([0.0625, 0.125 , 0.1875], dtype=float32)
    """
    return QuantMap("linear", bits, False, False)


@functools.cache
def _tables(m: QuantMap) -> dict:
    if m.name == "dynamic":
        values = _dynamic_values(m.signed, m.bits)
    else:
        values = (np.arange(2**m.bits, dtype=np.float64) + 1) / 2**m.bits
        values = values.astype(np.float32)
    if m.signed:
        zero = int(np.flatnonzero(values == 0)[0])
        sides = [values[zero:], -values[zero::-1]]  # magnitudes away from 0, each side
    elif m.name == "dynamic" and not m.zero:
        zero = 1  # the code of values[0] == 0 is never produced
        sides = [values[1:]]
    else:
        zero = 0
        sides = [values]
    width = max(len(s) for s in sides)
    mags = np.stack([np.pad(s, (0, width - len(s)), mode="edge") for s in sides])
    near, floor = [], []
    for s in sides:
        s64 = s.astype(np.float64)
        near.append(_threshold_bits((s64[:-1] + s64[1:]) / 2.0, strict=True))
        floor.append(_threshold_bits(s64[1:], strict=False))
    # One key for both lookups (nearest and floor), so they index the same cells.
    shift, first, bases, insides = _cells(near + floor)
    k = len(sides)
    near_base, floor_base, near_inside, floor_inside = (
        bases[:k],
        bases[k:],
        insides[:k],
        insides[k:],
    )
    cells = len(near_base[0])

    def packed(bases, insides):
        base = np.concatenate(bases).astype(np.uint32)
        inside = np.concatenate(insides).astype(np.int64)
        starts = (np.tile(np.arange(len(bases[0])), len(bases)) + first) << shift
        offset = np.where(inside == 0xFFFFFFFF, 1 << 23, inside - starts)
        return (base << 23) + (1 << 23) - offset.astype(np.uint32)

    return {
        "values": values,
        "zero": zero,
        "shift": shift,
        "first": first,
        "cells": cells,
        "mags": mags.astype(np.float32),
        "last": np.asarray([len(s) - 1 for s in sides], np.int32),
        "near": packed(near_base, near_inside),
        "floor": packed(floor_base, floor_inside),
    }
