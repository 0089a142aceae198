"""Checks and layout helpers shared by the MXTensor array operations."""

from __future__ import annotations

import dataclasses
import operator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmx.blocks import pack_group, packed_length
from jaxmx.formats import get_family
from jaxmx.packing import pack, unpack
from jaxmx.tensor import MXTensor

_OUT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


# --------------------------------------------------------------------------
# Checks and small helpers.
# --------------------------------------------------------------------------


def _replace(t: MXTensor, **changes) -> MXTensor:
    """``dataclasses.replace`` that keeps ``made_ndim`` the rank of the new leaves.

    The ops here change the rank on purpose (reshape, indexing, stack); the
    recorded rank is what tells vmap/scan-made rank changes apart.
    """
    out = dataclasses.replace(t, **changes)
    if out.made_ndim is not None and out.made_ndim != out.data.ndim:
        out = dataclasses.replace(out, made_ndim=out.data.ndim)
    return out


def _tensor(t, op: str) -> MXTensor:
    if not isinstance(t, MXTensor):
        raise TypeError(f"jaxmx.{op} expects an MXTensor, got {type(t).__name__}")
    if op != "astype":
        _check_layout(t, op)
    return t.canonical()


def _check_layout(t: MXTensor, op: str) -> None:
    if not get_family(t.format).rules.array_ops:
        raise TypeError(
            f"jaxmx.{op} acts on the codes and scales of OCP MX tensors; {_where(t)} is of "
            f"the {t.format.family!r} family (tensor scale, E4M3 or microexponent leaves, or "
            "scales of its own), for which no exact rule is implemented. Dequantize first "
            "(t.dequantize()) and quantize the result again if you need it in this format"
        )


def _axis(axis, ndim: int, what: str = "axis") -> int:
    """A non-negative axis index, or a clear error."""
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"{what} must be an int, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"{what} {axis} is out of range for an MXTensor of rank {ndim}; "
            f"allowed: {-ndim}..{ndim - 1}"
        )
    return int(axis) % ndim


def _where(t: MXTensor) -> str:
    return (
        f"{t.format.name} MXTensor of shape {t.shape} (blocks of {t.block_size} along axis "
        f"{t.ndim + t.axis}{', packed' if t.packed else ''})"
    )


def _group(t: MXTensor) -> tuple[int, int]:
    """(codes, bytes) per packing group; (1, 1) for unpacked codes."""
    return pack_group(t.format.element.bits) if t.packed else (1, 1)


def _stored(t: MXTensor, length: int) -> int:
    return packed_length(length, t.format.element.bits) if t.packed else length


def _bytes_at(t: MXTensor, i: int) -> int:
    """Index in ``data`` along the block axis where code ``i`` starts (``i`` on a group)."""
    g, nbytes = _group(t)
    return i // g * nbytes


def _on_group(t: MXTensor, *positions: int) -> bool:
    """Whether every code position is a packing-group boundary (or the end)."""
    g, _ = _group(t)
    return all(p % g == 0 or p == t.length for p in positions)


def _block_aligned(t: MXTensor) -> bool:
    """Whether every block starts on a byte of ``data`` (always when unpacked)."""
    return not t.packed or (t.block_size * t.format.element.bits) % 8 == 0


def _via_unpacked(t: MXTensor, fn) -> MXTensor:
    """``fn`` on the unpacked codes, packed again: exact, since packing is lossless."""
    return pack(fn(unpack(t))) if t.packed else fn(t)


def _scale_bytes(t: MXTensor) -> jax.Array:
    return lax.bitcast_convert_type(t.scale, jnp.uint8)


def _scale_from_bytes(b: jax.Array, t: MXTensor) -> jax.Array:
    return lax.bitcast_convert_type(b.astype(jnp.uint8), t.format.scale.storage_dtype)


def _static_int(v, what: str) -> int:
    if isinstance(v, jax.core.Tracer):
        raise TypeError(
            f"{what} along the block axis of an MXTensor must be known at trace time (it "
            "decides which blocks are kept); got a traced value"
        )
    return operator.index(v)
