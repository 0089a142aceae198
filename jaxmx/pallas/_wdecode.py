"""A weight tile decoded in on-chip memory and multiplied: the arithmetic of the weight-only matmul.

A tile of ``W`` arrives as it is stored: raw element codes (one per byte,
or two per byte when packed: element ``2i`` of the contraction axis in the
low nibble of byte ``i``, ``2i + 1`` in the high one) and one scale byte per
block of ``block_size`` rows. Each block's scale is spread over its code
rows by a broadcast and a reshape that merges whole sublane tiles (a block
covers 8, 16 or 32 code rows), the codes are decoded to float32 bit
patterns with the integer functions of :mod:`jaxmx.numerics` (exact,
float32 subnormals included, as :func:`jaxmx.dequantize`), and the tile is
multiplied into float32.

Packed codes are never interleaved back into one tile (neither Mosaic nor
Triton moves rows that way cheaply): the low nibbles are the even rows of
``W``, the high nibbles the odd ones, and ``x``'s even and odd columns,
split outside the kernel, multiply each, so a packed tile is two products
of half the contraction.

NVFP4's element values times their E4M3 block scale (at most 6 significant
bits, between 2^-10 and 2688) are exact in bfloat16 and float32; its
float32 tensor scale multiplies the accumulated product once, at the end
(:func:`finish`), as NVIDIA's block-scaled matmuls apply it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from jaxmx import numerics
from jaxmx.formats import FP4_E2M1, ElementFormat
from jaxmx.numerics import u32
from jaxmx.pallas import _nvfp4

E8M0_BIAS = 127
E8M0_NAN = 0xFF
QNAN = 0x7FC00000


@dataclasses.dataclass(frozen=True)
class Weight:
    """What a kernel knows of ``W`` (static): how to read its codes and scales."""

    family: str  # "ocp" (E8M0 scales) or "nvfp4" (E4M3 scales, a float32 tensor scale)
    element: ElementFormat
    block_size: int  # rows of W per scale
    packed: bool  # two 4-bit codes per byte along the contraction axis

    @property
    def per_byte(self) -> int:
        """Rows of ``W`` per row of stored codes."""
        return 2 if self.packed else 1

    @property
    def tensor_scale(self) -> bool:
        return self.family == "nvfp4"


def _on_rows(per_block: jax.Array, rows: int) -> jax.Array:
    """``(blocks, n)`` -> ``(blocks * rows, n)``: each block's value on its ``rows`` rows."""
    nb, n = per_block.shape
    spread = jnp.broadcast_to(per_block[:, None, :], (nb, rows, n))
    return spread.reshape(nb * rows, n)


def _element_bits(raw: jax.Array, e: jax.Array | int, elem: ElementFormat) -> jax.Array:
    """float32 patterns of raw wire codes (uint32) times ``2^e``, exactly."""
    sign = lax.shift_right_logical(raw, u32(elem.bits - 1)) & u32(1)
    mag = raw & u32(elem.sign_bit - 1)
    bits = numerics.decode_magnitude(mag, e, elem) | lax.shift_left(sign, u32(31))
    if elem.has_nan:  # codes above the largest finite one: the element's Inf or NaN
        special = mag > u32(elem.max_code)
        value = u32(QNAN)
        if elem.has_inf:
            inf = u32(0x7F800000) | lax.shift_left(sign, u32(31))
            value = jnp.where(mag == u32(elem.max_code + 1), inf, value)
        bits = jnp.where(special, value, bits)
    return bits


def decode(w: Weight, codes: jax.Array, scales: jax.Array, dtype: jnp.dtype) -> list[jax.Array]:
    """A tile's values in ``dtype`` (NVFP4: without its tensor scale).

    ``codes``: ``(code rows, n)`` uint8; ``scales``: ``(blocks, n)`` uint8.
    One array per nibble when packed (the even rows of W, then the odd ones).
    """
    c = codes.astype(jnp.uint32)
    halves = [c & u32(0xF), lax.shift_right_logical(c, u32(4))] if w.packed else [c]
    rows = codes.shape[0] // scales.shape[0]  # code rows per block
    s = scales.astype(jnp.uint32)
    if w.family == "nvfp4":
        factor = numerics.bits_to_f32(_on_rows(_nvfp4._e4m3_value(s), rows))
        values = [numerics.bits_to_f32(_element_bits(h, 0, FP4_E2M1)) * factor for h in halves]
    else:
        e = _on_rows(s.astype(jnp.int32) - E8M0_BIAS, rows)
        nan = _on_rows((s == u32(E8M0_NAN)).astype(jnp.int32), rows) != 0
        values = [
            numerics.bits_to_f32(jnp.where(nan, u32(QNAN), _element_bits(h, e, w.element)))
            for h in halves
        ]
    return [v.astype(dtype) for v in values]


def product(
    w: Weight,
    xs: list[jax.Array],
    codes: jax.Array,
    scales: jax.Array,
    valid_rows: jax.Array | None = None,
) -> jax.Array:
    """``x_tile @ W_tile`` in float32: ``xs`` is ``[x]``, or ``[x_even, x_odd]`` when packed.

    ``valid_rows``: code rows of the tile that lie inside ``W`` (the others,
    past its end, are set to zero before they are multiplied); None: all.
    """
    dtype = xs[0].dtype
    # bfloat16 products of bfloat16 operands are exact in float32; float32
    # operands multiply at full precision (Triton: IEEE, not TF32).
    precision = lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT
    acc = None
    for a, b in zip(xs, decode(w, codes, scales, dtype), strict=True):
        if valid_rows is not None:
            row = lax.broadcasted_iota(jnp.int32, b.shape, 0)
            b = jnp.where(row < valid_rows, b, jnp.zeros_like(b))
        p = jnp.dot(a, b, preferred_element_type=jnp.float32, precision=precision)
        acc = p if acc is None else acc + p
    assert acc is not None  # xs holds one or two tiles
    return acc


def finish(acc: jax.Array, tensor_scale: jax.Array | None, dtype: jnp.dtype) -> jax.Array:
    """The accumulated float32 product times NVFP4's tensor scale (``(1, 1)``), in ``dtype``."""
    if tensor_scale is not None:
        acc = acc * tensor_scale
    return acc.astype(dtype)
