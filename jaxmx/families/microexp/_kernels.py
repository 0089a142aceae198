"""Shared microexponents (MX9, MX6, MX4) and block floating point (MSFP16, MSFP12).

The formats of Rouhani et al., "With Shared Microexponents, A Little Shifting
Goes a Long Way" (ISCA 2023), from which the OCP MX formats grew. Elements are
sign-magnitude integers under a two-level power-of-two scale:

* one 8-bit shared exponent per block of 16 elements (E8M0, bias 127);
* for MX9 / MX6 / MX4, one 1-bit microexponent per pair of elements that
  shifts the pair's grid one binade finer when both of its elements lie
  below the block's exponent; MSFP16 / MSFP12 have none.

========  ==============  =========  ==========  ==================
format    element bits    codes      micro bits  bits per element
========  ==============  =========  ==========  ==================
mx9       1 + 7           -127..127  1 per 2     8 + 8/16 + 1/2 = 9
mx6       1 + 4           -15..15    1 per 2     5 + 8/16 + 1/2 = 6
mx4       1 + 2           -3..3      1 per 2     3 + 8/16 + 1/2 = 4
msfp16    1 + 7           -127..127  none        8 + 8/16 = 8.5
msfp12    1 + 3           -7..7      none        4 + 8/16 = 4.5
========  ==============  =========  ==========  ==================

Semantics are AMD Quark 0.13's ``fake_quantize_mx6_mx9`` (``quant_bit`` is the
element width ``1 + mantissa_bits``), per block, every step exact::

    E(v)       = biased float32 exponent field of v          # 0 for zero and subnormals
    x'         = +0.0 where |x| < 2^-126, else x              # subnormals and -0.0 -> +0.0
    e_i        = E(x'_i), or 0 where x_i is NaN or +-Inf      # exponents ignore specials
    block_E    = max_i e_i                                    # block_exp = block_E - 127
    micro      = 1 for a pair iff e_i < block_E for both of its elements
    step_i     = block_exp - micro - quant_bit + 2
    code_i     = clip(round_half_even(x'_i / 2^step_i), -max_code, max_code)
    y_i        = code_i * 2^step_i, or x_i itself where x_i is NaN or +-Inf

The microexponent is chosen from the exponents before rounding, so an
element of a shifted pair that would round up to ``2^block_exp`` is clipped
to the top code of its finer grid. A negative element that rounds to zero
keeps its sign (``y = -0.0``, code "-0"), as ``torch.round`` does; -0.0 and
subnormal inputs become +0.0. An all-zero block gets ``block_exp = -127``
(exponent byte 0) and micro bits 0. A partial last block is zero-padded,
which changes neither its exponent nor its microexponents.

Storage (:func:`quantize`): each element is one uint8 *sign-magnitude code
at its real width*, ``sign << mantissa_bits | magnitude`` (MX6: 5 bits, the
sign in bit 4), so the "-0" code exists and is used; the shared exponent is
one uint8 per block, ``block_exp + 127``; microexponents are one uint8 (0/1)
per pair, the blocked axis of length ``blocks * 8``. NaN and Inf have no
element code: a block that holds one gets the exponent byte 0xFF (E8M0's
NaN, which no finite block uses since ``block_E <= 254``) and dequantizes to
NaN throughout, the convention of jaxmx's OCP MX formats; its codes and
micro bits are still Quark's (Inf -> the saturated code with its sign, NaN
-> +0). :func:`fake_quantize` keeps Quark's behaviour instead: NaN and Inf
pass through and the rest of their block is quantized as usual. So
``dequantize(quantize(x))`` equals ``fake_quantize(x)`` bit for bit on
every block without NaN or Inf.

bfloat16 and float16 inputs widen exactly and are quantized as float32 (what
Quark's float32 path computes); every result is exactly representable in the
input dtype, which :func:`fake_quantize` returns.

:func:`pack` stores codes at their real width and micro bits 8 per byte, so
a tensor in whole blocks takes exactly ``bits_per_element`` bits per
element (:func:`nbytes`). Quark's registered ``bfp16`` is a different
format (blocks of 8, two's complement codes, a scale that doubles on
overflow); not modelled here.

Every step runs on float32 bit patterns in integers: XLA:CPU flushes
float32 subnormals in arithmetic, and this keeps results identical on
every backend. A nonzero result is never subnormal here (inputs below 2^-126
are flushed, and 2^-126 is on every grid finer than it), so the fused path
builds normal floats directly; :func:`dequantize` of arbitrary codes also
handles subnormal results exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmx import numerics
from jaxmx.blocks import from_blocks, to_blocks
from jaxmx.numerics import f32_to_bits

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
    "quantize",
    "quantize_fixed",
    "quantize_search",
    "dequantize",
    "fake_quantize",
]

_MANT_MASK = 0x007FFFFF
_IMPLICIT = 0x00800000
_SIGN = 0x80000000
_EXP_BIAS = 127
_NAN_EXPONENT = 0xFF  # the E8M0 NaN byte: a block holding NaN or Inf


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


# --------------------------------------------------------------------------
# Argument checks.
# --------------------------------------------------------------------------


def _check_input(x) -> jax.Array:
    x = jnp.asarray(x)
    if not any(x.dtype == d for d in numerics.FLOAT_DTYPES):
        raise TypeError(f"x has dtype {x.dtype}; allowed: float32, bfloat16, float16")
    if x.ndim == 0:
        raise ValueError("x is a scalar (0-d); block formats need an axis")
    return x


def _check_axis(axis, ndim: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis must be an int, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"axis {axis} is out of range for rank {ndim}; allowed {-ndim}..{ndim - 1}"
        )
    # Counted from the end, so the same call works on a vmapped (smaller) rank.
    return int(axis) - ndim if axis >= 0 else int(axis)


# --------------------------------------------------------------------------
# The shared core: exponents, microexponents and rounded code magnitudes.
# --------------------------------------------------------------------------


def _sub_size(spec: MicroexpSpec) -> int:
    return spec.block_size if spec.sub_block_size is None else spec.sub_block_size


def _sub_index(shape: tuple[int, ...], j: int, spec: MicroexpSpec) -> jax.Array:
    """Index of each element's sub-block within its block (blocked layout, axis ``j``)."""
    i = lax.broadcasted_iota(jnp.int32, shape, j)
    sub = _sub_size(spec)
    return (
        lax.shift_right_logical(i, jnp.int32(sub.bit_length() - 1))
        if sub & (sub - 1) == 0
        else i // sub
    )


def _max_and_mask(e: jax.Array, sub_index: jax.Array, j: int) -> tuple[jax.Array, jax.Array]:
    """Per block: the max of ``e`` and a mask of the sub-blocks that reach it.

    One variadic reduction: (e, 1 << sub-block) pairs combine to the larger
    e, OR-ing the masks of equal ones. So the microexponents need no
    per-pair pass: a sub-block is shifted iff its bit is clear. (A pair's
    max taken elementwise, by reversing each pair, stops XLA:CPU from
    vectorizing the encode loop: 3x slower.)
    """

    def combine(a, b):
        (ea, ma), (eb, mb) = a, b
        return (
            jnp.maximum(ea, eb),
            jnp.where(ea > eb, ma, jnp.where(eb > ea, mb, ma | mb)),
        )

    bit = lax.shift_left(jnp.uint32(1), sub_index.astype(jnp.uint32))
    return lax.reduce((e, bit), (jnp.int32(0), jnp.uint32(0)), combine, (j,))


class _Rounded(NamedTuple):
    bits: jax.Array  # uint32 input bit patterns, blocked layout
    field: jax.Array  # int32 biased exponent field (0: zero/subnormal, 255: NaN/Inf)
    block_e: jax.Array  # int32 biased block exponent, kept dims (..., nb, 1, ...)
    keep: jax.Array | None  # uint32 mask of unshifted sub-blocks, kept dims; None: no micro
    micro: jax.Array | int  # int32 0/1 per element (its sub-block's bit); 0 without micro
    k: jax.Array  # uint32 code magnitude (garbage where field is 255)


def _round(x: jax.Array, spec: MicroexpSpec, axis: int, fixed=None) -> tuple[_Rounded, int]:
    """Exponents, micro bits and code magnitudes; ``fixed``: given ``(block_e, keep)``.

    With ``fixed`` the block exponents (int32, kept dims) and the masks of
    unshifted sub-blocks (uint32, kept dims; None without microexponents)
    are taken as given instead of read off ``x``: elements above a block's
    grid saturate at its top code.
    """
    bits = to_blocks(f32_to_bits(x), axis, spec.block_size)
    j = bits.ndim + axis  # the within-block axis
    field = (lax.shift_right_logical(bits, jnp.uint32(23)) & jnp.uint32(0xFF)).astype(jnp.int32)
    # NaN and Inf do not take part in choosing exponents (Quark zeroes them
    # first); zero and subnormals have field 0, the flush of x'.
    e = jnp.where(field == 255, 0, field)
    if fixed is not None:
        block_e, keep = fixed
        micro = 0
        if keep is not None:
            sub_index = _sub_index(e.shape, j, spec)
            micro = (lax.shift_right_logical(keep, sub_index.astype(jnp.uint32)) & 1) ^ 1
            micro = micro.astype(jnp.int32)
    elif spec.sub_block_size is None:
        block_e = jnp.max(e, axis=j, keepdims=True)
        keep, micro = None, 0
    else:
        # micro = 1 iff every element of the sub-block is below the block
        # exponent, i.e. none of them reaches it.
        sub_index = _sub_index(e.shape, j, spec)
        block_e, keep = _max_and_mask(e, sub_index, j)
        block_e, keep = jnp.expand_dims(block_e, j), jnp.expand_dims(keep, j)
        micro = (lax.shift_right_logical(keep, sub_index.astype(jnp.uint32)) & 1) ^ 1
        micro = micro.astype(jnp.int32)
    # x' / 2^step = sig * 2^(field - 150 - step): drop = step + 150 - field bits,
    # with step = block_e - 127 - micro - quant_bit + 2. For a nonzero finite
    # element drop >= 25 - quant_bit >= 17; at 24 and above the code is 0 or 1.
    drop = (block_e - micro - spec.element_bits + 25) - field
    drop = jnp.clip(drop, 1, 31).astype(jnp.uint32)
    sig = jnp.where(field == 0, jnp.uint32(0), (bits & jnp.uint32(_MANT_MASK)) | _IMPLICIT)
    # Round half to even: sig < 2^24 and half <= 2^30, so nothing overflows.
    half_m1 = lax.shift_left(jnp.uint32(1), drop - jnp.uint32(1)) - jnp.uint32(1)
    lsb = lax.shift_right_logical(sig, drop) & jnp.uint32(1)
    k = lax.shift_right_logical(sig + half_m1 + lsb, drop)
    k = jnp.minimum(k, jnp.uint32(spec.max_code))
    return _Rounded(bits, field, block_e, keep, micro, k), j


# --------------------------------------------------------------------------
# quantize / dequantize / fake_quantize.
# --------------------------------------------------------------------------


def quantize(x, spec: str | MicroexpSpec, *, axis: int = -1) -> MicroexpCodes:
    """Codes, shared exponents and microexponents of ``x`` blocked along ``axis``.

    Args:
      x: float32, bfloat16 or float16 array (bfloat16/float16 widen exactly).
      spec: a :class:`MicroexpSpec` or its name (``"mx9"``, ``"mx6"``,
        ``"mx4"``, ``"msfp16"``, ``"msfp12"``).
      axis: the blocked axis; a partial last block is zero-padded.

    Returns:
      :class:`MicroexpCodes`: ``mantissas`` uint8 ``sign << mantissa_bits |
      magnitude`` in x's shape; ``shared_exponent`` uint8 ``block_exp + 127``
      (0xFF for a block holding NaN or Inf), the axis replaced by the number
      of blocks; ``micro`` uint8 0/1, the axis replaced by blocks times
      sub-blocks per block (``None`` for MSFP).

    >>> import jax.numpy as jnp
    >>> x = jnp.array([3.0, 0.2, 0.9, 0.1] + [0.0] * 12)
    >>> q = quantize(x, "mx4")
    >>> q.mantissas[:4].tolist(), int(q.shared_exponent[0]) - 127, q.micro[:2].tolist()
    ([3, 0, 2, 0], 1, [0, 1])
    """
    spec = get_spec(spec)
    x = _check_input(x)
    return _quantize(x, spec, _check_axis(axis, x.ndim))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize(x, spec: MicroexpSpec, axis: int, fixed=None) -> MicroexpCodes:
    r, j = _round(x, spec, axis, fixed)
    top = jnp.uint32(spec.max_code)
    inf = r.field == 255
    nan = inf & ((r.bits & jnp.uint32(_MANT_MASK)) != 0)
    # Quark clips x / 2^step: Inf saturates with its sign; NaN gets +0 here
    # (its block decodes to NaN through the exponent byte anyway).
    k = jnp.where(inf, top, r.k)
    sign = lax.shift_right_logical(r.bits, jnp.uint32(31))
    sign = jnp.where((r.field == 0) | nan, jnp.uint32(0), sign)
    k = jnp.where(nan, jnp.uint32(0), k)
    codes = (lax.shift_left(sign, jnp.uint32(spec.mantissa_bits)) | k).astype(jnp.uint8)
    nonfinite = jnp.max(r.field, axis=j, keepdims=True) == 255
    se = jnp.where(nonfinite, _NAN_EXPONENT, r.block_e).astype(jnp.uint8)
    micro = None
    if r.keep is not None:
        shape = list(r.keep.shape)
        shape[j] = spec.subs_per_block
        s = lax.broadcasted_iota(jnp.uint32, tuple(shape), j)
        m = (lax.shift_right_logical(r.keep, s) & 1) ^ 1
        micro = from_blocks(m.astype(jnp.uint8), axis, shape[j - 1] * shape[j])
    return MicroexpCodes(
        mantissas=from_blocks(codes, axis, x.shape[axis]),
        shared_exponent=jnp.squeeze(se, j),
        micro=micro,
    )


# --------------------------------------------------------------------------
# Post-training: chosen shared exponents, and fixed ones.
# --------------------------------------------------------------------------


def _fixed_of(shared_exponent, micro, spec: MicroexpSpec, axis: int, ndim: int):
    """``(block_e, keep)`` in the kept-dims blocked layout from stored exponents and micro bits."""
    j = ndim + 1 + axis
    block_e = jnp.expand_dims(jnp.asarray(shared_exponent).astype(jnp.int32), j)
    if spec.sub_block_size is None:
        return block_e, None
    m = to_blocks(jnp.asarray(micro).astype(jnp.uint32), axis, spec.subs_per_block)
    s = lax.broadcasted_iota(jnp.uint32, m.shape, j)
    keep = jnp.sum(lax.shift_left(jnp.uint32(1) - (m & 1), s), axis=j, keepdims=True)
    return block_e, keep.astype(jnp.uint32)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _quantize_fixed(x, shared_exponent, micro, spec: MicroexpSpec, axis: int) -> MicroexpCodes:
    return _quantize(x, spec, axis, _fixed_of(shared_exponent, micro, spec, axis, x.ndim))


def _signed_values(r: _Rounded, spec: MicroexpSpec) -> jax.Array:
    # code * 2^step in float32 (a selection criterion: flushes do not matter).
    step = r.block_e - 127 - r.micro - spec.element_bits + 2
    v = jnp.ldexp(r.k.astype(jnp.float32), step)
    return jnp.where(lax.shift_right_logical(r.bits, jnp.uint32(31)) == 1, -v, v)


def _sub_sums(a: jax.Array, spec: MicroexpSpec, j: int) -> jax.Array:
    """Sums over each sub-block: the within-block axis ``j`` becomes sub-blocks."""
    shape = a.shape[:j] + (spec.subs_per_block, _sub_size(spec)) + a.shape[j + 1 :]
    return jnp.sum(a.reshape(shape), axis=j + 1)


def _keep_mask(shifted: jax.Array, j: int) -> jax.Array:
    """uint32 mask (kept dims) of the sub-blocks not shifted, from a bool per sub-block."""
    s = lax.broadcasted_iota(jnp.uint32, shifted.shape, j)
    bits = jnp.where(shifted, jnp.uint32(0), lax.shift_left(jnp.uint32(1), s))
    return jnp.sum(bits, axis=j, keepdims=True).astype(jnp.uint32)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _search(x, spec: MicroexpSpec, axis: int, offsets, importance=None) -> MicroexpCodes:
    r0, j = _round(x, spec, axis)
    ref = numerics.bits_to_f32(r0.bits)
    finite = r0.field != 255
    imp = None if importance is None else to_blocks(importance, axis, spec.block_size)

    def sq_err(fixed):
        r, _ = _round(x, spec, axis, fixed)
        sq = jnp.where(finite, jnp.square(_signed_values(r, spec) - ref), 0.0)
        return sq if imp is None else sq * imp

    best = None
    for d in offsets:  # 0 first: ties keep Quark's exponent
        block_e = jnp.clip(r0.block_e + d, 0, 254)
        if spec.sub_block_size is None:
            keep = None
            err = jnp.sum(sq_err((block_e, None)), axis=j, keepdims=True)
        else:
            # Each pair takes the micro bit with the smaller error, so
            # candidates are (exponent, best bits); at offset 0, ties keep
            # Quark's bit (shifted iff neither element reaches the exponent).
            e0 = _sub_sums(sq_err((block_e, jnp.uint32(0xFFFFFFFF))), spec, j)
            e1 = _sub_sums(sq_err((block_e, jnp.uint32(0))), spec, j)
            s = lax.broadcasted_iota(jnp.uint32, e0.shape, j)
            quark = (lax.shift_right_logical(r0.keep, s) & 1) == 0
            shifted = (e1 < e0) | ((e1 == e0) & quark) if d == 0 else e1 < e0
            keep = _keep_mask(shifted, j)
            err = jnp.sum(jnp.minimum(e0, e1), axis=j, keepdims=True)
        if best is None:
            best = (block_e, keep, err)
        else:
            better = err < best[2]
            best = (
                jnp.where(better, block_e, best[0]),
                None if keep is None else jnp.where(better, keep, best[1]),
                jnp.where(better, err, best[2]),
            )
    return _quantize(x, spec, axis, best[:2])


def quantize_fixed(
    x, shared_exponent, micro, spec: str | MicroexpSpec, *, axis: int = -1
) -> MicroexpCodes:
    """:func:`quantize` with the shared exponents and micro bits given instead of derived.

    Each element rounds half to even onto its pair's grid
    ``2^(block_exp - micro - quant_bit + 2)`` and saturates at the top code;
    the exponents and micro bits come back as given (blocks holding NaN or
    Inf still get the NaN byte). For post-training methods that fix the
    scales first: ``quantize_fixed(x, q.shared_exponent, q.micro, spec)``
    with ``q = quantize(x, spec)`` is ``q``.

    >>> import jax.numpy as jnp
    >>> q = quantize(jnp.array([3.0, 0.2, 0.9, 0.1] + [0.0] * 12), "mx4")
    >>> y = jnp.array([2.2, -0.4, 0.3, 0.7] + [0.0] * 12)
    >>> quantize_fixed(y, q.shared_exponent, q.micro, "mx4").mantissas[:4].tolist()
    [2, 4, 1, 1]
    """
    spec = get_spec(spec)
    x = _check_input(x)
    axis = _check_axis(axis, x.ndim)
    n = x.shape[axis]
    nb = -(-n // spec.block_size)
    want = _replace_axis(x.shape, axis, nb)
    se = jnp.asarray(shared_exponent)
    if se.dtype != jnp.uint8 or se.shape != want:
        raise ValueError(
            f"shared_exponent must be uint8 of shape {want} for x of shape {x.shape}, "
            f"got {se.dtype}{tuple(se.shape)}"
        )
    if spec.sub_block_size is not None:
        want_m = _replace_axis(x.shape, axis, nb * spec.subs_per_block)
        if micro is None or jnp.shape(micro) != want_m:
            raise ValueError(
                f"{spec.name} needs micro bits of shape {want_m}, got "
                f"{None if micro is None else jnp.shape(micro)}"
            )
    elif micro is not None:
        raise ValueError(f"{spec.name} has no microexponents: micro must be None")
    return _quantize_fixed(x, se, micro, spec, axis)


def quantize_search(
    x, spec: str | MicroexpSpec, *, axis: int = -1, offsets=(0, 1, -1, -2), importance=None
) -> MicroexpCodes:
    """:func:`quantize` with each block's shared exponent chosen by squared error.

    Each block tries Quark's exponent (the largest element exponent) plus
    each offset; under each, every pair takes the micro bit (its grid one
    binade finer, or not) whose rounded values have the smaller squared
    error, instead of Quark's rule (finer iff neither element reaches the
    exponent). The block keeps the exponent whose values have the smallest
    float32 sum of squared errors (``importance``-weighted if given; ties
    keep Quark's exponent and bits). A lower exponent or a finer pair
    saturates large elements but halves the step of the rest; a higher
    exponent stops a maximum that rounds past the top code from saturating.
    No block's error exceeds Quark's. ``offsets`` must start with 0.

    >>> import jax.numpy as jnp
    >>> x = jnp.array([1.95, 1.0, 0.25, -0.25] + [0.0] * 12)
    >>> dequantize(*quantize(x, "mx4"), "mx4")[:4]  # 1.95 saturates at 1.5
    Array([ 1.5 ,  1.  ,  0.25, -0.25], dtype=float32)
    >>> dequantize(*quantize_search(x, "mx4"), "mx4")[:4]  # exponent + 1: 1.95 -> 2
    Array([ 2.,  1.,  0., -0.], dtype=float32)
    """
    spec = get_spec(spec)
    x = _check_input(x)
    axis = _check_axis(axis, x.ndim)
    offsets = tuple(int(d) for d in offsets)
    if not offsets or offsets[0] != 0 or len(set(offsets)) != len(offsets):
        raise ValueError(f"offsets must be distinct ints starting with 0, got {offsets!r}")
    if importance is not None:
        importance = jnp.broadcast_to(jnp.asarray(importance, jnp.float32), x.shape)
    return _search(x, spec, axis, offsets, importance)


def dequantize(
    mantissas,
    shared_exponent,
    micro,
    spec: str | MicroexpSpec,
    *,
    axis: int = -1,
    dtype=jnp.float32,
) -> jax.Array:
    """``code * 2^(block_exp - micro - element_bits + 2)`` for every element, exactly.

    Args:
      mantissas, shared_exponent, micro: as :func:`quantize` returns them
        (``micro`` is ``None`` for formats without microexponents).
      spec: the format.
      axis: the blocked axis of ``mantissas``.
      dtype: float32 (default), bfloat16 or float16; results are rounded to
        nearest even into it (exact for every code a quantized
        bfloat16/float16 input produces).

    Returns:
      The values in ``dtype``, ``mantissas``' shape; NaN for every element
      of a block whose exponent byte is 0xFF.

    >>> import jax.numpy as jnp
    >>> q = quantize(jnp.array([3.0, 0.2, 0.9, 0.1] + [0.0] * 12), "mx4")
    >>> dequantize(*q, "mx4")[:4].tolist()
    [3.0, 0.0, 1.0, 0.0]
    """
    spec = get_spec(spec)
    mantissas = jnp.asarray(mantissas)
    shared_exponent = jnp.asarray(shared_exponent)
    if mantissas.dtype != jnp.uint8 or shared_exponent.dtype != jnp.uint8:
        raise TypeError(
            f"mantissas and shared_exponent must be uint8, got {mantissas.dtype} and "
            f"{shared_exponent.dtype}"
        )
    if mantissas.ndim == 0:
        raise ValueError("mantissas is a scalar (0-d); block formats need an axis")
    axis = _check_axis(axis, mantissas.ndim)
    nb = -(-mantissas.shape[axis] // spec.block_size)
    want = _replace_axis(mantissas.shape, axis, nb)
    if shared_exponent.shape != want:
        raise ValueError(
            f"shared_exponent has shape {shared_exponent.shape}; for mantissas of shape "
            f"{mantissas.shape} blocked along axis {axis} it must be {want}"
        )
    if spec.sub_block_size is None:
        if micro is not None:
            raise ValueError(f"{spec.name} has no microexponents; pass micro=None")
    else:
        if micro is None:
            raise ValueError(f"{spec.name} needs its micro bits (one per sub-block)")
        micro = jnp.asarray(micro)
        want = _replace_axis(mantissas.shape, axis, nb * spec.subs_per_block)
        if micro.shape != want or micro.dtype not in (jnp.uint8, jnp.bool_):
            raise ValueError(
                f"micro has shape {micro.shape} and dtype {micro.dtype}; it must be uint8 "
                f"or bool of shape {want}"
            )
    return _dequantize(
        mantissas, shared_exponent, micro, spec, axis, numerics.check_out_dtype(dtype)
    )


def _replace_axis(shape, axis: int, n: int) -> tuple[int, ...]:
    ax = len(shape) + axis
    return (*shape[:ax], n, *shape[ax + 1 :])


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _dequantize(mantissas, shared_exponent, micro, spec: MicroexpSpec, axis: int, dtype):
    codes = to_blocks(mantissas.astype(jnp.uint32), axis, spec.block_size)
    j = codes.ndim + axis
    se = jnp.expand_dims(shared_exponent, j).astype(jnp.int32)
    t = se - _EXP_BIAS - spec.element_bits + 2
    if micro is not None:
        # One bit per sub-block -> one per element.
        m = to_blocks(micro.astype(jnp.int32), axis, spec.subs_per_block)
        t = t - jnp.repeat(m, spec.sub_block_size, axis=j)
    k = codes & jnp.uint32(spec.max_code)
    sign = lax.shift_right_logical(codes, jnp.uint32(spec.mantissa_bits)) & jnp.uint32(1)
    bits = _assemble(k, t) | lax.shift_left(sign, jnp.uint32(31))
    bits = jnp.where(se == _NAN_EXPONENT, jnp.uint32(0x7FC00000), bits)
    return numerics.bits_to_dtype(from_blocks(bits, axis, mantissas.shape[axis]), dtype)


def _assemble(k: jax.Array, t: jax.Array) -> jax.Array:
    """float32 pattern of ``k * 2^t`` for ``0 <= k < 2^8`` and ``-150 < t < 128``, exactly.

    Subnormal results are built as subnormal patterns (dequantizing an
    arbitrary code under exponent byte 0 reaches 2^-134); ``k = 0`` gives +0.
    """
    fb = lax.bitcast_convert_type(k.astype(jnp.int32).astype(jnp.float32), jnp.uint32)
    lead = lax.shift_right_logical(fb, jnp.uint32(23)).astype(jnp.int32)  # 127 + log2(k)
    normal = fb + lax.shift_left(t.astype(jnp.uint32), jnp.uint32(23))
    sub = lax.shift_left(k, jnp.clip(t + 149, 0, 31).astype(jnp.uint32))
    return jnp.where(k == 0, jnp.uint32(0), jnp.where(lead + t >= 1, normal, sub))


def fake_quantize(x, spec: str | MicroexpSpec, *, axis: int = -1) -> jax.Array:
    """Quantize then dequantize in one fused pass, in x's dtype (Quark's ``y``).

    NaN and Inf elements pass through unchanged and the rest of their block
    is quantized as usual (Quark's behaviour; :func:`quantize` marks such a
    block NaN instead, as it has no code for them). Differentiable with the
    straight-through estimator (the tangent passes through unchanged).

    >>> import jax.numpy as jnp
    >>> # Block exponent 1 (from 3.0), grid 1.0; 0.7 and 0.1 are both below
    >>> # 2^1, so their microexponent halves their grid: 0.7 -> 0.5, not 1.0.
    >>> fake_quantize(jnp.array([3.0, 0.2, 0.7, 0.1] + [0.0] * 12), "mx4")[:4].tolist()
    [3.0, 0.0, 0.5, 0.0]
    >>> # Grid 2^-6 under block exponent 0; a negative rounding to zero keeps its sign.
    >>> fake_quantize(jnp.array([1.3, -0.005] + [0.0] * 14), "mx9")[:2].tolist()
    [1.296875, -0.0]
    """
    spec = get_spec(spec)
    x = _check_input(x)
    return _fake_quantize(x, spec, _check_axis(axis, x.ndim))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _fake_quantize(x, spec, axis):
    return _fake_quantize_impl(x, spec, axis)


@_fake_quantize.defjvp
def _fake_quantize_jvp(spec, axis, primals, tangents):
    return _fake_quantize(primals[0], spec, axis), tangents[0]


@functools.partial(jax.jit, static_argnums=(1, 2))
def _fake_quantize_impl(x, spec: MicroexpSpec, axis: int) -> jax.Array:
    r, _ = _round(x, spec, axis)
    # y = k * 2^step is 0 or a normal float32 (see the module docstring), so
    # its pattern is float(k)'s with the exponent field raised by step.
    step = r.block_e - r.micro - spec.element_bits + 2 - _EXP_BIAS
    kf = lax.bitcast_convert_type(r.k.astype(jnp.int32).astype(jnp.float32), jnp.uint32)
    kf = kf + lax.shift_left(step.astype(jnp.uint32), jnp.uint32(23))
    mag = jnp.where(r.k == 0, jnp.uint32(0), kf)
    # The sign survives rounding to zero (-0.0) but not the flush of x'.
    y = mag | (r.bits & jnp.uint32(_SIGN))
    y = jnp.where(r.field == 0, jnp.uint32(0), y)
    y = jnp.where(r.field == 255, r.bits, y)
    return numerics.bits_to_dtype(from_blocks(y, axis, x.shape[axis]), x.dtype)
