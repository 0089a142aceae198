"""The microexponent kernels' public functions: quantize, dequantize, fake_quantize.

The format records and argument checks are :mod:`._spec`, the shared
rounding core (exponents, micro bits, codes) is :mod:`._rounding`, and the
post-training variants :func:`quantize_fixed` and :func:`quantize_search`
are :mod:`._search`; this module re-exports their names, so it is the one
place to import the kernels from.

Shared microexponents (MX9, MX6, MX4) and block floating point (MSFP16,
MSFP12) are the formats of Rouhani et al., "With Shared Microexponents, A
Little Shifting Goes a Long Way" (ISCA 2023), from which the OCP MX formats
grew. Elements are sign-magnitude integers under a two-level power-of-two
scale:
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

``tests/_microexp_storage.py`` packs codes at their real width and micro
bits 8 per byte, so a tensor in whole blocks takes exactly
``bits_per_element`` bits per element. Quark's registered ``bfp16`` is a
different format (blocks of 8, two's complement codes, a scale that doubles
on overflow); not modelled here.

Every step runs on float32 bit patterns in integers: XLA:CPU flushes
float32 subnormals in arithmetic, and this keeps results identical on
every backend. A nonzero result is never subnormal here (inputs below 2^-126
are flushed, and 2^-126 is on every grid finer than it), so the fused path
builds normal floats directly; :func:`dequantize` of arbitrary codes also
handles subnormal results exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxmx import numerics
from jaxmx.blocks import from_blocks, to_blocks
from jaxmx.families.microexp import _rounding, _spec
from jaxmx.families.microexp._search import quantize_fixed, quantize_search
from jaxmx.families.microexp._spec import (
    MSFP12,
    MSFP16,
    MX4,
    MX6,
    MX9,
    SPECS,
    MicroexpCodes,
    MicroexpSpec,
    Static,
    get_spec,
)

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
    x = _spec.check_input(x)
    return _rounding.encode(x, Static(spec, _spec.check_axis(axis, x.ndim)))


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
    axis = _spec.check_axis(axis, mantissas.ndim)
    nb = -(-mantissas.shape[axis] // spec.block_size)
    want = _spec.replace_axis(mantissas.shape, axis, nb)
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
        want = _spec.replace_axis(mantissas.shape, axis, nb * spec.subs_per_block)
        if micro.shape != want or micro.dtype not in (jnp.uint8, jnp.bool_):
            raise ValueError(
                f"micro has shape {micro.shape} and dtype {micro.dtype}; it must be uint8 "
                f"or bool of shape {want}"
            )
    static = Static(spec, axis, dtype=numerics.check_out_dtype(dtype))
    return _dequantize(mantissas, shared_exponent, micro, static)


@functools.partial(jax.jit, static_argnums=(3,))
def _dequantize(mantissas, shared_exponent, micro, static: Static):
    spec, axis = static.spec, static.axis
    codes = to_blocks(mantissas.astype(jnp.uint32), axis, spec.block_size)
    j = codes.ndim + axis
    se = jnp.expand_dims(shared_exponent, j).astype(jnp.int32)
    t = se - _rounding.EXP_BIAS - spec.element_bits + 2
    if micro is not None:
        # One bit per sub-block -> one per element.
        m = to_blocks(micro.astype(jnp.int32), axis, spec.subs_per_block)
        t = t - jnp.repeat(m, spec.sub_block_size, axis=j)
    k = codes & jnp.uint32(spec.max_code)
    sign = lax.shift_right_logical(codes, jnp.uint32(spec.mantissa_bits)) & jnp.uint32(1)
    bits = _assemble(k, t) | lax.shift_left(sign, jnp.uint32(31))
    bits = jnp.where(se == _rounding.NAN_EXPONENT, jnp.uint32(0x7FC00000), bits)
    return numerics.bits_to_dtype(from_blocks(bits, axis, mantissas.shape[axis]), static.dtype)


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
    x = _spec.check_input(x)
    return _fake_quantize(x, Static(spec, _spec.check_axis(axis, x.ndim)))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _fake_quantize(x, static: Static):
    return _fake_quantize_impl(x, static)


@_fake_quantize.defjvp
def _fake_quantize_jvp(static, primals, tangents):
    return _fake_quantize(primals[0], static), tangents[0]


@functools.partial(jax.jit, static_argnums=(1,))
def _fake_quantize_impl(x, static: Static) -> jax.Array:
    spec, axis = static.spec, static.axis
    r, _ = _rounding.round_codes(x, spec, axis)
    # y = k * 2^step is 0 or a normal float32 (see the module docstring), so
    # its pattern is float(k)'s with the exponent field raised by step.
    step = r.block_e - r.micro - spec.element_bits + 2 - _rounding.EXP_BIAS
    kf = lax.bitcast_convert_type(r.k.astype(jnp.int32).astype(jnp.float32), jnp.uint32)
    kf = kf + lax.shift_left(step.astype(jnp.uint32), jnp.uint32(23))
    mag = jnp.where(r.k == 0, jnp.uint32(0), kf)
    # The sign survives rounding to zero (-0.0) but not the flush of x'.
    y = mag | (r.bits & jnp.uint32(_rounding.SIGN))
    y = jnp.where(r.field == 0, jnp.uint32(0), y)
    y = jnp.where(r.field == 255, r.bits, y)
    return numerics.bits_to_dtype(from_blocks(y, axis, x.shape[axis]), x.dtype)
