"""Moving floats by their bits, as unsigned integers of their width.

Array ops that only move values (slice, gather, concatenate, select,
transpose, all-gather) run on the bytes of floats (FP8 codes, E8M0 scales,
bfloat16 weights), bitcast to the unsigned integer of their
width and back, for two reasons:

* XLA may canonicalize the NaN payloads of a float8 array it gathers or
  selects (an E5M2 -NaN code 0xFE came back as 0x7F); codes and scales must
  come out as they went in.
* XLA:CPU widens the float8 and bfloat16 operands of a collective
  (``lax.all_gather`` in :mod:`jaxmx.fsdp`) to 16 or 32 bits; unsigned
  integers of their width are gathered as they are, on every backend.

Sub-byte floats held in a byte (``float4_e2m1fn``, whose 4 bits do not fill
its itemsize) cannot be bitcast to ``uint8`` and move as they are; wider
floats (float32 scales of a custom family) move as unsigned integers too,
which no backend widens.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["bits", "move"]


def bits(a: jax.Array) -> jax.Array:
    """The same bytes as unsigned integers of the same width (floats whose
    bits fill their itemsize); any other array as it is."""
    dt = np.dtype(a.dtype)
    if jnp.issubdtype(dt, jnp.floating) and jnp.finfo(dt).bits == 8 * dt.itemsize:
        return lax.bitcast_convert_type(a, np.dtype(f"uint{8 * dt.itemsize}"))
    return a


def move(a: jax.Array, fn: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """``fn`` applied to the bytes of ``a`` (see :func:`bits`), back in ``a``'s dtype."""
    out = fn(bits(a))
    return out if out.dtype == a.dtype else lax.bitcast_convert_type(out, a.dtype)
