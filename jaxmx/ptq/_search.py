"""Per-block scale search: each block keeps the scale with the least (weighted) squared error."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmx import _codecs, numerics
from jaxmx.blocks import from_blocks, to_blocks
from jaxmx.formats import MXFormat
from jaxmx.ptq._checks import (
    _DEFAULT_OFFSETS,
    _check_format,
    _check_offsets,
    _check_scale_mode,
    _spec,
)
from jaxmx.ptq._hessians import _hessian_of
from jaxmx.quantize import (
    check_array,
    dequantize,
    quantize_blocks,
    quantize_with_exponent,
)
from jaxmx.spec import QuantSpec
from jaxmx.tensor import MXTensor

# --------------------------------------------------------------------------
# Per-block scale search.
# --------------------------------------------------------------------------


def _search_exponents(x, fmt, axis, bs, scale_mode, offsets, importance=None):
    """(best exponent, best rounded values in blocked layout, the blocks)."""
    blk = quantize_blocks(x, fmt, axis, bs, scale_mode, False, None)
    block_axis = blk.mag.ndim + axis
    finite = jnp.where(blk.mag >= jnp.uint32(0x7F800000), jnp.uint32(0), blk.mag)
    ref = numerics.bits_to_f32(finite)
    imp = None if importance is None else to_blocks(importance, axis, bs)
    lo, hi = fmt.scale.min_exponent, fmt.scale.max_exponent
    best_e = best_v = best_err = None
    for d in offsets:  # a handful of candidates: unrolled, each one fused pass
        e = jnp.clip(blk.exponent + d, lo, hi)
        v = numerics.bits_to_f32(numerics.round_magnitude(finite, e, fmt.element))
        sq = jnp.square(v - ref) if imp is None else imp * jnp.square(v - ref)
        err = jnp.sum(sq, axis=block_axis, keepdims=True)
        if best_e is None:
            best_e, best_v, best_err = e, v, err
        else:
            better = err < best_err  # strict: ties keep the earlier (direct) exponent
            best_e = jnp.where(better, e, best_e)
            best_v = jnp.where(better, v, best_v)
            best_err = jnp.where(better, err, best_err)
    return best_e, best_v, blk


def quantize_search(
    x,
    format: str | MXFormat,
    *,
    axis: int = -1,
    block_size: int | None = None,
    scale_mode: str = "floor",
    offsets: Iterable[int] = _DEFAULT_OFFSETS,
    importance=None,
    packed: bool = False,
) -> MXTensor:
    """Quantizes ``x`` choosing each block's scale by its squared error.

    OCP MX formats: each block tries the exponent ``e`` of ``scale_mode`` (OCP floor by
    default) plus each offset (by default ``e + 1``, which undoes floor's
    clipping of a block maximum, and ``e - 1``, ``e - 2``), and keeps the
    exponent whose round-to-nearest result has the least sum of squared
    errors over the block (ties keep ``e``). A smaller exponent clips the
    block maximum but halves the grid step of every other element, which
    wins for blocks with one outlier.
    Because ``e`` itself is a candidate, no block's error exceeds the direct
    cast's. Source: MSE-optimal clipping (Banner et al. 2019,
    arXiv:1810.05723; Sakr et al. 2022, arXiv:2206.06501) over E8M0 scales.

    NVFP4: Four Over Six (Cook et al. 2025, arXiv:2512.02010): each block's
    E4M3 scale maps its maximum to 6 or to 4, whichever gives the smaller
    error, under a tensor scale of ``amax / 1536`` (so that the 4-target
    scales fit E4M3); see :func:`jaxmx._scaled.nvfp4.nvfp4_quantize_4over6`.
    ``offsets`` do not apply.

    MX9/MX6/MX4 and MSFP: the shared exponent tries Quark's plus each offset,
    and under each every pair of elements takes the micro bit (finer grid or
    not) with the smaller error instead of Quark's rule; no block's error
    exceeds the direct cast's (:func:`jaxmx._scaled.microexp.quantize_search`).

    Args:
      x: float32, bfloat16 or float16 array.
      format: a block format (name or MXFormat): OCP MX, NVFP4, MX9/MX6/MX4, MSFP.
      axis: the axis blocks run along (a weight's contraction axis).
      block_size: elements per block; None: the format's.
      scale_mode: the rule for the starting exponent ``e`` (OCP formats;
        the others have their own rule, "floor").
      offsets: exponent offsets to try; must include 0 (not for NVFP4).
      importance: optional non-negative weight of each position along
        ``axis`` (1-D, length ``x.shape[axis]``) in the block error: for a
        matmul weight, the diagonal of its calibration Hessian ``X^T X``
        makes the error that of the layer's outputs (correlations between
        inputs ignored), so weights that meet large activations clip less.
      packed: pack sub-byte codes (as :func:`jaxmx.quantize`).

    Returns:
      An :class:`~jaxmx.MXTensor` like ``jaxmx.quantize(x, format, axis=axis)``'s,
      with other scales where they have less error.

    >>> import jax.numpy as jnp, jaxmx
    >>> x = jnp.array([3.2, 0.75, 0.75, -0.75])
    >>> jaxmx.dequantize(jaxmx.quantize(x, "mxfp4", block_size=4, scale_mode="rceil"))
    Array([ 3.,  1.,  1., -1.], dtype=float32)
    >>> t = jaxmx.ptq.quantize_search(x, "mxfp4", block_size=4, scale_mode="rceil")
    >>> jaxmx.dequantize(t)  # 2^-1: 3.2 clips to 3, the rest is exact
    Array([ 3.  ,  0.75,  0.75, -0.75], dtype=float32)
    """
    fmt = _check_format(format)
    x = check_array(x)
    spec = _spec(fmt, x.ndim, axis, block_size, _check_scale_mode(scale_mode), packed)
    offsets = _check_offsets(offsets)
    if spec.tiles and importance is not None:
        raise ValueError(
            "importance weights the positions along one axis; 2-D tiles block two "
            f"(block_size={spec.block_size}): drop importance or use 1-D blocks"
        )
    importance = _check_importance(importance, x.shape, spec.axis)
    return _search_tensor(x, spec, offsets, importance)


def _search_tensor(x, spec: QuantSpec, offsets, importance) -> MXTensor:
    """The per-family search, on validated arguments (importance: broadcastable or None)."""
    fmt, axis, bs = spec.format, spec.axis, spec.block_size
    if fmt.codec == "ocp":
        e = _search_jit(x, fmt, axis, bs, spec.scale_mode, offsets, importance)
        return quantize_with_exponent(x, e, fmt, axis, bs, spec.packed)
    if fmt.codec == "nvfp4" and offsets != _check_offsets(_DEFAULT_OFFSETS):
        raise ValueError(
            "NVFP4's search chooses each block's target (6 or 4, Four Over Six); exponent "
            f"offsets apply to power-of-two scales only, got offsets={offsets!r}"
        )
    full = None if importance is None else jnp.broadcast_to(importance, x.shape)
    return _codecs.CODECS[fmt.codec].search(x, offsets, full, spec)


def _check_importance(importance, shape, axis):
    if importance is None:
        return None
    imp = np.asarray(importance, np.float64)
    n = shape[axis]
    if imp.shape != (n,) or not np.all(np.isfinite(imp)) or np.any(imp < 0):
        raise ValueError(
            f"importance must be finite, non-negative and of shape ({n},) (the length of "
            f"axis {axis}), got shape {imp.shape}"
        )
    # Relative weights only: normalized so float32 sums neither overflow nor underflow.
    imp = imp / max(float(imp.max()), np.finfo(np.float64).tiny)
    view = [1] * len(shape)
    view[axis] = n
    return jnp.asarray(imp.reshape(view), jnp.float32)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _search_jit(x, fmt, axis, bs, scale_mode, offsets, importance=None):
    if importance is not None:
        importance = jnp.broadcast_to(importance, x.shape)
    return _search_exponents(x, fmt, axis, bs, scale_mode, offsets, importance)[0]


def fake_quantize_search(
    x,
    format: str | MXFormat,
    *,
    axis: int = -1,
    block_size: int | None = None,
    scale_mode: str = "floor",
    offsets: Iterable[int] = _DEFAULT_OFFSETS,
) -> jax.Array:
    """``dequantize(quantize_search(x, ...))`` in one pass, in float32.

    For activations, whose scales must be chosen at run time: the values are
    those of :func:`quantize_search`. A later direct cast of them (a matmul
    that quantizes its operand again) reproduces them exactly with
    ``scale_mode="rceil"``, and with ``"floor"`` when no offset is positive
    (``e + 1`` can hold a block maximum whose significand floor clips).
    NaN/Inf blocks become NaN, as in :func:`jaxmx.fake_quantize`. Not
    differentiable.

    >>> import jax.numpy as jnp, jaxmx
    >>> x = jnp.array([3.2, 0.75, 0.75, -0.75])
    >>> jaxmx.ptq.fake_quantize_search(x, "mxfp4", block_size=4, scale_mode="rceil")
    Array([ 3.  ,  0.75,  0.75, -0.75], dtype=float32)
    """
    fmt = _check_format(format)
    x = check_array(x)
    spec = _spec(fmt, x.ndim, axis, block_size, _check_scale_mode(scale_mode))
    if fmt.codec != "ocp":
        return dequantize(_search_tensor(x, spec, _check_offsets(offsets), None))
    return _fake_search_jit(
        x, fmt, spec.axis, spec.block_size, spec.scale_mode, _check_offsets(offsets)
    )


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _fake_search_jit(x, fmt, axis, bs, scale_mode, offsets):
    _, v, blk = _search_exponents(x, fmt, axis, bs, scale_mode, offsets)
    bits = numerics.f32_to_bits(v) | lax.shift_left(blk.sign, jnp.uint32(31))
    bits = jnp.where(blk.nonfinite, jnp.uint32(0x7FC00000), bits)
    return from_blocks(numerics.bits_to_f32(bits), axis, x.shape[axis])


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScaleSearch:
    """``method=`` of :func:`jaxmx.quantize_params`: per-block scale search.

    >>> import jax.numpy as jnp, jaxmx
    >>> q = jaxmx.quantize_params({"d": {"kernel": jnp.ones((64, 4))}}, "mxfp4",
    ...                           method=jaxmx.ptq.ScaleSearch())
    >>> q["d"]["kernel"].shape
    (64, 4)
    """

    # Exponent offsets tried around the scale rule's exponent (0 must be one).
    offsets: tuple[int, ...] = _DEFAULT_OFFSETS
    # Rule for the starting exponent: "floor" (OCP), "rceil", "ceil", "even".
    scale_mode: str = "floor"
    # Optional {path: X^T X}: block errors weighted by the Hessian diagonal
    # (the `importance` of quantize_search); None: plain squared error.
    hessians: Mapping[str, jax.Array] | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "offsets", _check_offsets(self.offsets))
        _check_scale_mode(self.scale_mode)

    def quantize_weight(self, path, x, fmt, *, axis, block_size, packed) -> MXTensor:
        """Quantizes one weight (weighted by its Hessian diagonal if ``hessians``)."""
        importance = None
        if self.hessians is not None:
            importance = np.diag(np.asarray(_hessian_of(self.hessians, path, "ScaleSearch")))
        return quantize_search(
            x,
            fmt,
            axis=axis,
            block_size=block_size,
            scale_mode=self.scale_mode,
            offsets=self.offsets,
            importance=importance,
            packed=packed,
        )
