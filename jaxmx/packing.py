"""Packed storage of sub-byte element codes: MXTensors in and out.

:func:`pack` stores the codes of a sub-byte format (FP4, FP6, INT4, INT2,
custom widths) packed along the quantized axis, :func:`unpack` undoes it;
the bit layout is :mod:`jaxmx.bitstream`'s. The tensor keeps its length,
so a padded last group is dropped again on unpacking.
"""

from __future__ import annotations

import dataclasses

import jax

from jaxmx.bitstream import pack_codes, unpack_codes
from jaxmx.codes import raw_to_storage, storage_to_raw
from jaxmx.tensor import MXTensor

__all__ = ["pack", "unpack"]


def pack(t: MXTensor) -> MXTensor:
    """Packs the codes of a format whose width is not whole bytes into bytes.

    FP4, FP6, INT4, INT2 and custom 3- to 15-bit formats. 8- and 16-bit
    formats are already whole bytes per element and are returned as they
    are; so is a tensor that is already packed.

    >>> import jax.numpy as jnp, jaxmx
    >>> t = jaxmx.quantize(jnp.ones((4, 64)), "mxfp4")
    >>> p = jaxmx.pack(t)
    >>> p.data.shape, p.data.dtype, t.nbytes, p.nbytes
    ((4, 32), dtype('uint8'), 264, 136)
    """
    if not isinstance(t, MXTensor):
        raise TypeError(f"pack expects an MXTensor, got {type(t).__name__}")
    if t.packed or not t.format.packable:
        return t
    return _pack(t)


@jax.jit
def _pack(t: MXTensor) -> MXTensor:
    elem = t.format.element
    t = t.canonical()
    raw = storage_to_raw(t.data, elem)
    micro = None if t.micro is None else pack_codes(t.micro, 1, t.axis)
    return dataclasses.replace(t, data=pack_codes(raw, elem.bits, t.axis), micro=micro, packed=True)


def unpack(t: MXTensor) -> MXTensor:
    """Inverse of :func:`pack`: one code per element, in the storage dtype.

    >>> import jax.numpy as jnp, jaxmx
    >>> t = jaxmx.quantize(jnp.ones((4, 64)), "mxfp6_e3m2")
    >>> u = jaxmx.unpack(jaxmx.pack(t))
    >>> bool((u.data == t.data).all())
    True
    """
    if not isinstance(t, MXTensor):
        raise TypeError(f"unpack expects an MXTensor, got {type(t).__name__}")
    if not t.packed:
        return t
    return _unpack(t)


@jax.jit
def _unpack(t: MXTensor) -> MXTensor:
    elem = t.format.element
    t = t.canonical()
    raw = unpack_codes(t.data, elem.bits, t.axis, t.length)
    micro = t.micro
    if micro is not None:  # one bit per group: blocks * groups per block
        groups = t.num_blocks * (t.block_size // t.format.micro.group)
        micro = unpack_codes(micro, 1, t.axis, groups)
    return dataclasses.replace(t, data=raw_to_storage(raw, elem), micro=micro, packed=False)
