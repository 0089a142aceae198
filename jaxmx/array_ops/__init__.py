"""MXTensor as an array: operations that act on codes and scales, exactly.

Some array operations commute with block quantization: moving whole blocks
around (transposes, reshapes that keep blocks whole, slices and gathers
aligned to blocks, concatenation at block boundaries), flipping signs, and
multiplying by a power of two (which only changes the scales). These run
on the codes and scales directly, never through float values, so

    dequantize(op(t)) == op(dequantize(t))      bit for bit,

and for whole-block moves of a tensor made by :func:`jaxmx.quantize`, also
``op(quantize(x)) == quantize(op(x))``. Everything else raises an error that
says what was asked and what is allowed: nothing here dequantizes and
quantizes again behind the caller's back.

Rules that depend on the data (a code or exponent that has no exact image)
cannot raise under ``jit``; there the affected block gets the NaN scale, so
the result is never a wrong number:

* ``-t`` and ``abs(t)`` of an MXINT block holding the code -2^(bits-1) (never
  written by :func:`jaxmx.quantize`, which is symmetric; only hand-made or
  imported tensors hold it): +2^(bits-1) has no code.
* :func:`ldexp` (and ``t * 2.0**k``) of a nonzero block whose exponent
  leaves the scale's range (E8M0: [-127, 127]). All-zero blocks keep their
  scale; a Python ``k`` that moves every exponent out of range is refused.

MXINT codes are two's complement and have no -0: ``-t`` of a zero MXINT
element is +0, where ``-dequantize(t)`` is -0.0 (equal as numbers).

Packed tensors: operations along other axes move the packed bytes as they
are. Along the block axis, bytes are moved directly where the cut falls on
a byte boundary; elsewhere the codes are unpacked, moved and packed again,
which is exact (packing is lossless).
"""

from __future__ import annotations

from jaxmx.array_ops._codewise import absolute, astype, ldexp, multiply, negative
from jaxmx.array_ops._index import concatenate, getitem, stack, take
from jaxmx.array_ops._shape import moveaxis, reshape, swapaxes, transpose
from jaxmx.tensor import register_ops

__all__ = [
    "absolute",
    "astype",
    "concatenate",
    "ldexp",
    "moveaxis",
    "multiply",
    "negative",
    "reshape",
    "getitem",
    "stack",
    "swapaxes",
    "take",
    "transpose",
]


register_ops(
    transpose=transpose,
    swapaxes=swapaxes,
    reshape=reshape,
    take=take,
    getitem=getitem,
    negative=negative,
    absolute=absolute,
    multiply=multiply,
    ldexp=ldexp,
    astype=astype,
)
