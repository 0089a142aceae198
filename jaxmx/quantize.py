"""quantize, dequantize and fake_quantize: float arrays <-> block-scaled tensors.

The public entry points check their arguments once (a frozen
:class:`~jaxmx.spec.QuantSpec`) and hand the work to the format's family
(:func:`jaxmx.formats.get_family`; the built-in ones are in
:mod:`jaxmx.families`). The OCP MX arithmetic (OCP MX v1.0 section 6.3) is
:mod:`jaxmx.families.ocp`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxmx import numerics, pallas
from jaxmx.families._arguments import arguments as _arguments
from jaxmx.families._arguments import check_array as check_array  # re-exported for the ops
from jaxmx.families._arguments import check_rounding as check_rounding
from jaxmx.families._arguments import random_bits as random_bits
from jaxmx.formats import MXFormat, get_family
from jaxmx.packing import unpack
from jaxmx.spec import QuantSpec
from jaxmx.tensor import MXTensor, register_ops

__all__ = ["quantize", "dequantize", "fake_quantize"]


# --------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------


def quantize(
    x: jax.typing.ArrayLike,
    format: str | MXFormat,
    *,
    axis: int = -1,
    block_size: int | None = None,
    scale_mode: str = "floor",
    rounding: str = "nearest_even",
    flush_subnormals: bool = False,
    key: jax.Array | None = None,
    packed: bool = False,
    tensor_amax: jax.typing.ArrayLike | None = None,
    implementation: str | None = None,
) -> MXTensor:
    """Quantizes ``x`` to an MX format along one axis.

    Blocks of ``block_size`` consecutive elements along ``axis`` share one
    scale. A last partial block is handled as if padded with zeros (the
    padding never changes a value). Bit-exact with OCP MX v1.0 section 6.3
    and the MX paper's reference emulator (microxcaling) in its exact mode.

    Args:
      x: float32, bfloat16 or float16 array of any rank. (NumPy float64
        input becomes float32 as in every JAX function unless x64 is on; a
        float64 JAX array is refused rather than rounded twice.)
      format: a format name (``jaxmx.list_formats()``, aliases ``"mxfp8"``,
        ``"mxfp6"``, ``"mxfp4"``) or an :class:`~jaxmx.MXFormat`.
      axis: the axis along which blocks run (for a matmul operand: its
        contraction axis).
      block_size: elements per block; ``None`` means the format's default (32).
      scale_mode: rule for the shared exponent: ``"floor"`` (OCP, default),
        ``"rceil"`` (NVIDIA/TransformerEngine/JAX: never clips the block
        max), ``"ceil"``, ``"even"``. See :func:`jaxmx.numerics.shared_exponent`.
      rounding: ``"nearest_even"`` (default), ``"nearest_away"`` (ties away
        from zero, microxcaling's "nearest"), ``"toward_zero"``, or
        ``"stochastic"`` (unbiased within the element's range; needs ``key``).
      flush_subnormals: zero every block whose largest magnitude is a
        float32 subnormal (or zero), as the MX paper's emulator does; other
        blocks keep their subnormal elements. By default nothing is flushed.
      key: PRNG key for stochastic rounding.
      packed: return sub-byte codes (FP4, FP6, INT4, INT2, MX6/MX4 codes and
        microexponents) packed into bytes (see :func:`jaxmx.pack`), written
        directly without the one-code-per-byte intermediate. No effect on
        8-bit formats.
      tensor_amax: NVFP4 only: the amax that sets the per-tensor scale
        (calibrated, or the same for every shard); default ``max |x|``.
      implementation: ``"xla"``: the exact emulation in XLA ops, every
        format and option, every platform. ``"pallas"``: one fused Pallas
        kernel, the same bits, for the OCP formats and NVFP4 (see
        :mod:`jaxmx.pallas` for what it covers); compiled for TPUs (Mosaic) and NVIDIA GPUs
        (Triton), refused when compiled for a platform with no kernel (the
        CPU; :func:`jaxmx.pallas.interpret` runs it interpreted there).
        ``None`` (default): the best implementation verified on the
        platform, which is ``"xla"`` everywhere until the kernels have run
        on hardware.

    The relatives of the OCP formats follow their own reference arithmetic
    (``format.family``; see docs/semantics.md): ``"nvfp4"`` (blocks of 16 or
    ``block_size=(16, 16)`` tiles over the last two axes, E4M3 block scales
    in ``t.scale``, ``t.tensor_scale``; rounding nearest_even or
    stochastic), ``"mx9"``/``"mx6"``/``"mx4"``/``"msfp16"``/``"msfp12"``
    (blocks of 16, microexponents in ``t.micro``), and
    ``"tensor_fp8_e4m3"``/``"tensor_fp8_e5m2"`` (one float32 scale,
    ``t.tensor_scale``). Options their references do not define
    (``scale_mode``, ``flush_subnormals``, other roundings) are refused.

    Returns:
      An :class:`~jaxmx.MXTensor`. Elements saturate to the format's largest
      finite value; a block holding NaN or Inf gets the NaN scale.

    Raises:
      ValueError: unknown format, axis out of range, bad block size, rounding
        or scale mode, or stochastic rounding without a key.
      TypeError: integer, complex or float64 input.

    >>> import jax.numpy as jnp, jaxmx
    >>> x = jnp.array([[0.3, -1.7, 5.0, 100.0]])
    >>> t = jaxmx.quantize(x, "mxfp4", block_size=4)
    >>> t.scale  # 2^(floor(log2 100) - 2): the block max sets the scale
    Array([[16]], dtype=float8_e8m0fnu)
    >>> jaxmx.dequantize(t)  # small values drown next to the block max
    Array([[ 0., -0.,  8., 96.]], dtype=float32)
    """
    x, rbits, amax, spec = _arguments(
        x, format, key, tensor_amax, axis=axis, block_size=block_size, scale_mode=scale_mode,
        rounding=rounding, flush_subnormals=flush_subnormals, packed=packed,
    )  # fmt: skip
    impl = pallas.check_implementation(implementation)
    return _quantize_nodiff(x, rbits, amax, spec, impl)


def quantize_spec(x, rbits, tensor_amax, spec: QuantSpec, implementation="xla") -> MXTensor:
    """:func:`quantize` with validated arguments (for jaxmx's ops)."""
    if implementation == "pallas":
        return pallas.quantize(x, rbits, tensor_amax, spec)
    return get_family(spec.format).quantize(x, rbits, tensor_amax, spec)


def fake_quantize_spec(x, rbits, tensor_amax, spec: QuantSpec, implementation="xla") -> jax.Array:
    """:func:`fake_quantize` with validated arguments, no custom gradient."""
    if implementation == "pallas":
        return pallas.fake_quantize(x, rbits, tensor_amax, spec)
    return get_family(spec.format).fake_quantize(x, rbits, tensor_amax, spec)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _quantize_nodiff(x, rbits, tensor_amax, spec, implementation):
    return quantize_spec(x, rbits, tensor_amax, spec, implementation)


@_quantize_nodiff.defjvp
def _quantize_jvp(spec, implementation, primals, tangents):
    # Rounding to codes has a zero derivative almost everywhere; a silent zero
    # gradient through dequantize(quantize(x)) is never what a user wants.
    raise TypeError(
        "jaxmx.quantize is not differentiable (its codes are integers); use "
        "jaxmx.fake_quantize for a straight-through gradient, or wrap the input in "
        "jax.lax.stop_gradient if no gradient should flow"
    )


def dequantize(t: MXTensor, dtype: jax.typing.DTypeLike = jnp.float32) -> jax.Array:
    """Decodes an :class:`~jaxmx.MXTensor` to a float array, exactly.

    Every MX value (element times scale) is a float32 number, subnormals
    included, so the float32 result is exact; bfloat16 and float16 results
    are rounded to nearest even. Blocks with a NaN scale decode to NaN.

    Args:
      t: the tensor; packed or not.
      dtype: float32 (default), bfloat16 or float16.

    >>> import jax.numpy as jnp, jaxmx
    >>> t = jaxmx.quantize(jnp.array([1.0, 2.5, -3.0, 0.1]), "mxfp8", block_size=4)
    >>> jaxmx.dequantize(t)
    Array([ 1.   ,  2.5  , -3.   ,  0.1015625], dtype=float32)
    """
    if not isinstance(t, MXTensor):
        raise TypeError(f"dequantize expects an MXTensor, got {type(t).__name__}")
    dtype = numerics.check_out_dtype(dtype)
    return _decode(unpack(t).canonical(), dtype)


def _decode(t: MXTensor, dtype) -> jax.Array:
    if t.tensor_scale is not None and t.tensor_scale.ndim:
        # Made under vmap or stacked by scan: one tensor scale per mapped
        # item, on the leading axes of every leaf.
        return jax.vmap(lambda u: _decode(u, dtype))(t)
    return get_family(t.format).dequantize(t, dtype)


def fake_quantize(
    x: jax.typing.ArrayLike,
    format: str | MXFormat,
    *,
    axis: int = -1,
    block_size: int | None = None,
    scale_mode: str = "floor",
    rounding: str = "nearest_even",
    flush_subnormals: bool = False,
    key: jax.Array | None = None,
    tensor_amax: jax.typing.ArrayLike | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """``dequantize(quantize(x, ...))`` in one fused pass, in ``x``'s dtype.

    Takes the same arguments as :func:`quantize` (``implementation``
    included: ``"pallas"`` writes the values from one kernel). The codes are never
    materialized: the rounded value of each element is rebuilt directly from
    its code magnitude and the block's exponent.

    Differentiable with the straight-through estimator: the gradient with
    respect to ``x`` is passed through unchanged (the usual choice for
    quantization-aware training).

    >>> import jax.numpy as jnp, jaxmx
    >>> # Scale 2^0; 5.0 is a tie between 4 and 6 (goes to even), 6.5 saturates.
    >>> jaxmx.fake_quantize(jnp.array([0.3, -1.7, 5.0, 6.5]), "mxfp4", block_size=4)
    Array([ 0.5, -1.5,  4. ,  6. ], dtype=float32)
    """
    x, rbits, amax, spec = _arguments(
        x, format, key, tensor_amax, axis=axis, block_size=block_size, scale_mode=scale_mode,
        rounding=rounding, flush_subnormals=flush_subnormals,
    )  # fmt: skip
    impl = pallas.check_implementation(implementation)
    return _fake_quantize(x, rbits, amax, spec, impl)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _fake_quantize(x, rbits, tensor_amax, spec, implementation):
    return fake_quantize_spec(x, rbits, tensor_amax, spec, implementation)


@_fake_quantize.defjvp
def _fake_quantize_jvp(spec, implementation, primals, tangents):
    x, rbits, tensor_amax = primals
    return _fake_quantize(x, rbits, tensor_amax, spec, implementation), tangents[0]


register_ops(dequantize=dequantize)
