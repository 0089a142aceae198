"""Post-training quantization methods that beat round-to-nearest direct cast.

A direct cast (:func:`jaxmx.quantize`) takes each block's scale from the
block maximum and rounds every element to nearest. Three methods here spend
some offline work to do better, and all of them still produce ordinary
:class:`~jaxmx.MXTensor` weights (same format, codes, scales and layout), so
a model runs from them exactly as from a direct cast. They work on every
block family: OCP MX (E8M0 exponents), NVFP4 (E4M3 block scales under a
tensor scale) and the shared-microexponent formats MX9/MX6/MX4 and MSFP
(an exponent per block, a micro bit per pair); per-tensor FP8 has no
blocks and is refused.

* **Per-block scale search** (:func:`quantize_search`, :class:`ScaleSearch`):
  each block tries the max-based exponent ``e`` and smaller ones (``e - 1``,
  ``e - 2``: the block maximum clips, the rest of the block gets a finer
  grid) and keeps the one with the least squared error. The MSE-optimal
  clipping of Banner et al. 2019 (ACIQ, arXiv:1810.05723) and Sakr et al.
  2022 (OCTAV, arXiv:2206.06501), restricted to the power-of-two scales an
  E8M0 block can hold. For NVFP4 it is Four Over Six (Cook et al. 2025,
  arXiv:2512.02010): each block's maximum maps to 6 or to 4; for the BDR
  formats the exponent offsets plus each pair's micro bit chosen by error.
* **Block-diagonal Hadamard rotation** (:func:`hadamard`, :func:`rotate`,
  :func:`rotate_weights`): ``x @ w = (x H) @ (H^T w)`` with ``H`` an
  orthonormal Hadamard matrix of 16 or 32 along the contraction axis, so the
  rotated operands spread an outlier over its block before quantization.
  QuaRot (Ashkboos et al. 2024, arXiv:2404.00456) and SpinQuant use full
  Hadamards; block-diagonal ones of the MX block size are what NVIDIA's
  NVFP4 pre-training recipe (arXiv:2509.25149, "random Hadamard transforms
  of size 16") and MXFP4 PTQ studies (Egiazarian et al. 2025, "Bridging the
  gap between promise and performance for microscaling FP4 quantization",
  arXiv:2509.23202) apply. The activation side must be rotated inside the
  model at run time (the weights are rotated once, offline).
* **GPTQ for block formats** (:func:`quantize_gptq`, :class:`GPTQ`): Frantar
  et al. 2023 (arXiv:2210.17323), Algorithm 1: quantize the weight one input
  row at a time and push each row's error, weighted by the inverse
  Hessian ``(X^T X + damp I)^-1`` of the layer's calibration inputs, onto
  the rows not yet quantized. Adapted to MX: the block scales are fixed
  first (from the original weights, by a scale rule or the scale search)
  and the rows are then rounded onto those fixed grids, as GPTQ's
  ``static_groups`` option does for grouped integer formats.

:func:`jaxmx.quantize_params` takes :class:`ScaleSearch` and :class:`GPTQ`
as its ``method=``; :func:`collect_hessians` gathers the GPTQ Hessians of a
Flax linen model's Dense layers from calibration batches.

>>> import jax, jax.numpy as jnp, jaxmx
>>> w = jax.random.normal(jax.random.key(0), (64, 8))
>>> direct = jaxmx.quantize(w, "mxfp4", axis=0)
>>> searched = jaxmx.ptq.quantize_search(w, "mxfp4", axis=0)
>>> err = lambda t: float(jnp.sum((jaxmx.dequantize(t) - w) ** 2))
>>> err(searched) <= err(direct)
True
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable, Mapping
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmx import _codecs, _hadamard, numerics
from jaxmx._paths import contraction_axis, path_string
from jaxmx.blocks import from_blocks, to_blocks
from jaxmx.formats import MXFormat, get_format
from jaxmx.quantize import (
    check_array,
    dequantize,
    quantize_blocks,
    quantize_spec,
    quantize_with_exponent,
)
from jaxmx.spec import QuantSpec, check_axis, check_flag
from jaxmx.tensor import MXTensor

__all__ = [
    "GPTQ",
    "PTQMethod",
    "ScaleSearch",
    "collect_hessians",
    "fake_quantize_search",
    "hadamard",
    "quantize_gptq",
    "quantize_search",
    "rotate",
    "rotate_weights",
]

_SCALE_MODES = numerics.SCALE_MODES


@runtime_checkable
class PTQMethod(Protocol):
    """What ``method=`` of :func:`jaxmx.quantize_params` takes: one weight in, one MXTensor out.

    :class:`ScaleSearch` and :class:`GPTQ` implement it; a new post-training
    method is a (frozen, hashable) object with this one method, and
    :func:`jaxmx.quantize_params` calls it for every weight a rule matched.

    >>> import jaxmx
    >>> isinstance(jaxmx.ptq.ScaleSearch(), jaxmx.ptq.PTQMethod)
    True
    """

    def quantize_weight(
        self, path: str, x: jax.Array, fmt: MXFormat, *, axis: int, block_size, packed: bool
    ) -> MXTensor:
        """Quantizes the weight ``x`` found at ``path``.

        Args:
          path: the weight's ``/``-joined tree path (``params/Dense_0/kernel``):
            the key into per-weight data such as Hessians.
          x: the float weight.
          fmt: the format the matched rule gives the weight.
          axis: its contraction axis (negative or non-negative), along
            which blocks run.
          block_size: the rule's block size (None: the format's own).
          packed: whether sub-byte codes are to be packed.

        Returns:
          An :class:`~jaxmx.MXTensor` of ``x`` in ``fmt`` along ``axis``.
        """
        ...


# --------------------------------------------------------------------------
# Checks shared by the methods.
# --------------------------------------------------------------------------


# Families whose block scales the methods choose: OCP MX (E8M0 exponents),
# NVFP4 (E4M3 block scales under a tensor scale) and the shared-microexponent
# formats (an E8M0 exponent and micro bits). Per-tensor FP8 has no blocks.
_FAMILIES = ("ocp", *(name for name, c in _codecs.CODECS.items() if c.search is not None))
_DEFAULT_OFFSETS = (0, 1, -1, -2)


def _check_format(format) -> MXFormat:
    fmt = get_format(format)
    if fmt.codec not in _FAMILIES:
        raise ValueError(
            f"{fmt.name} has one scale per tensor and no blocks to choose scales for; the PTQ "
            "methods take block formats (OCP MX, NVFP4, MX9/MX6/MX4, MSFP)"
        )
    return fmt


def _spec(fmt: MXFormat, ndim: int, axis, block_size, scale_mode, packed=False) -> QuantSpec:
    """The blocking of a method's result; 2-D tiles cover the last two axes whatever ``axis``."""
    tiles = isinstance(block_size, tuple)
    return QuantSpec.make(
        fmt,
        ndim,
        axis=-1 if tiles else axis,
        block_size=block_size,
        scale_mode=scale_mode,
        packed=packed,
    )


def _check_scale_mode(scale_mode) -> str:
    if not isinstance(scale_mode, str) or scale_mode not in _SCALE_MODES:
        raise ValueError(f"unknown scale_mode {scale_mode!r}; allowed: {', '.join(_SCALE_MODES)}")
    return scale_mode


def _check_offsets(offsets) -> tuple[int, ...]:
    try:
        got = tuple(offsets)
    except TypeError:
        got = None
    if (
        not got
        or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) for d in got)
        or 0 not in got
        or len(set(got)) != len(got)
    ):
        raise ValueError(
            "offsets must be distinct ints that include 0 (the scale rule's own exponent), "
            f"e.g. (0, -1, -2); got {offsets!r}"
        )
    # 0 first: ties keep the direct cast's exponent (argmin takes the first).
    return (0, *(int(d) for d in got if d != 0))


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


# --------------------------------------------------------------------------
# Block-diagonal Hadamard rotation.
# --------------------------------------------------------------------------


def hadamard(n: int) -> np.ndarray:
    """The orthonormal Sylvester Hadamard matrix of order ``n`` (a power of two), float32.

    ``H = H_n / sqrt(n)`` with ``H_1 = [1]``, ``H_2k = [[H_k, H_k], [H_k, -H_k]]``:
    symmetric and orthonormal, so ``H @ H = I`` and rotating twice undoes it.

    >>> import jaxmx
    >>> jaxmx.ptq.hadamard(4) * 2
    array([[ 1.,  1.,  1.,  1.],
           [ 1., -1.,  1., -1.],
           [ 1.,  1., -1., -1.],
           [ 1., -1., -1.,  1.]], dtype=float32)
    """
    return _hadamard.hadamard(n)


def rotate(x, *, axis: int = -1, size: int = 32) -> jax.Array:
    """Multiplies ``x`` along ``axis`` by the block-diagonal Hadamard ``diag(H, ..., H)``.

    Each run of ``size`` consecutive entries along ``axis`` (an MX block when
    ``size`` is the block size and the runs are aligned) is replaced by its
    product with :func:`hadamard` ``(size)``. For an activation ``x`` rotated
    along its features and a weight ``w`` rotated along its contraction axis,
    ``rotate(x) @ rotate(w, axis=0) == x @ w`` in exact arithmetic
    (``x H H^T w``; ``H`` is symmetric).

    Computed as a fast Walsh-Hadamard transform (``log2(size)`` butterfly
    stages of sums and differences, then one scaling by ``size**-0.5``), as
    hardware does it: no matmul, so :func:`jaxmx.intercept` sees none to put
    in MX, and each output is within ``log2(size) + 1`` roundings of exact.

    Args:
      x: float array.
      axis: the axis to rotate (an activation's features, a weight's
        contraction axis).
      size: the Hadamard order, a power of two dividing ``x.shape[axis]``.

    >>> import jax.numpy as jnp, jaxmx
    >>> x, w = jnp.arange(8.0)[None], jnp.ones((8, 2))
    >>> jaxmx.ptq.rotate(x, size=4) @ jaxmx.ptq.rotate(w, axis=0, size=4)
    Array([[28., 28.]], dtype=float32)
    """
    hadamard(size)  # validates size
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"rotate takes a float array, got dtype {x.dtype}")
    axis = check_axis(axis, x.ndim)
    n = x.shape[axis]
    if n % size:
        raise ValueError(
            f"axis {axis} has length {n}, not a multiple of the Hadamard size {size}; "
            "allowed: sizes (powers of two) that divide it"
        )
    return _rotate(x, axis, size)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _rotate(x, axis, size):
    return _hadamard.rotate(x, axis, size)


def rotate_weights(params, *, size: int = 32, include: str = r"kernel$", axes=None):
    """Rotates every matmul weight of ``params`` along its contraction axis.

    Pair it with a model that rotates each of those matmuls' activations by
    :func:`rotate` (the same ``size``), so that every product is unchanged.

    Args:
      params: a pytree of arrays (linen variables, a dict).
      size: the Hadamard order (16 or 32: the MX block size).
      include: regular expression searched in each leaf's path (``"/"``
        joined); matching leaves whose contraction axis is known
        (:func:`jaxmx.params.contraction_axis`, or ``axes``) are rotated.
        The default, ``kernel$``, leaves embedding tables alone (a lookup's
        output is not a matmul's).
      axes: ``(path, array) -> axis or None``, consulted before the naming
        convention.

    Returns:
      The same tree with matching weights rotated.

    >>> import jax.numpy as jnp, jaxmx
    >>> p = {"d": {"kernel": jnp.eye(4), "bias": jnp.zeros(4)}}
    >>> r = jaxmx.ptq.rotate_weights(p, size=4)
    >>> r["d"]["kernel"][0]
    Array([0.5, 0.5, 0.5, 0.5], dtype=float32)
    """
    pattern = re.compile(include)

    def one(path, x):
        p = path_string(path)
        if not pattern.search(p) or not hasattr(x, "dtype"):
            return x
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        axis = axes(p, x) if axes is not None else None
        axis = contraction_axis(p, x) if axis is None else axis
        return x if axis is None else rotate(x, axis=axis, size=size)

    return jax.tree_util.tree_map_with_path(one, params)


# --------------------------------------------------------------------------
# GPTQ with fixed block scales.
# --------------------------------------------------------------------------


def _to_grid(w, e, elem):
    """``w`` rounded to nearest even on the grid ``2^e * elem``, saturated (float32)."""
    bits = numerics.f32_to_bits(w)
    mag = bits & jnp.uint32(0x7FFFFFFF)
    out = numerics.round_magnitude(mag, e, elem) | (bits & jnp.uint32(0x80000000))
    return numerics.bits_to_f32(out)


# Each family's fixed grid, per entry: (rounding of values onto it, given the
# per-entry parameter; the parameter of every entry of a fixed-scale tensor).


def _ocp_round(w, e, fmt: MXFormat):
    return _to_grid(w, e, fmt.element)


def _nvfp4_round(w, dec, fmt: MXFormat):
    # E2M1(round(w / dec)) * dec; a zero block scale holds zeros only.
    safe = jnp.where(dec > 0, dec, 1.0)
    return jnp.where(dec > 0, _to_grid(w / safe, 0, fmt.element) * safe, 0.0)


def _microexp_round(w, step, fmt: MXFormat):
    # Sign-magnitude integers times 2^step, half to even, saturating.
    top = float((1 << (fmt.element.bits - 1)) - 1)
    return jnp.ldexp(jnp.clip(jnp.round(jnp.ldexp(w, -step)), -top, top), step)


def _expand(per_block, t: MXTensor, group: int | None = None):
    """A per-block (or, with ``group``, per-group) array repeated onto every entry of ``t``."""
    if isinstance(t.block_size, tuple):
        r, c = t.block_size
        return jnp.repeat(jnp.repeat(per_block, r, axis=-2), c, axis=-1)
    n = t.shape[t.axis]
    return lax.slice_in_dim(
        jnp.repeat(per_block, group or t.block_size, axis=t.axis), 0, n, axis=t.axis
    )


def _nvfp4_params(t: MXTensor):
    s8 = t.scale.astype(jnp.float32)  # exact: every E4M3 value is a float32
    return _expand(s8, t) * t.tensor_scale


def _microexp_params(t: MXTensor):
    block_exp = lax.bitcast_convert_type(t.scale, jnp.uint8).astype(jnp.int32) - 127
    step = _expand(block_exp, t) - (t.format.element.bits - 2)
    if t.micro is not None:
        step = step - _expand(t.micro.astype(jnp.int32), t, t.format.micro.group)
    return step


_ROUND = {"ocp": _ocp_round, "nvfp4": _nvfp4_round, "microexp": _microexp_round}
_PARAMS = {"nvfp4": _nvfp4_params, "microexp": _microexp_params}


@functools.partial(jax.jit, static_argnums=(3, 4))
def _gptq_rows(w, u, e, fmt, chunk):
    """GPTQ's lazy-batch loop (Frantar et al. 2023, Algorithm 1) over rows of ``w``.

    ``w``: (n, R) float32, rows in quantization order (the contraction axis);
    ``u``: (n, n) upper Cholesky factor of the inverse Hessian; ``e``: (n, R)
    the fixed grid parameter of each entry (its family's, see ``_ROUND``).
    ``n`` is a multiple of ``chunk``. Returns the quantized values, shaped like ``w``.
    """
    to_grid = _ROUND[fmt.codec]
    n = w.shape[0]
    rows = jnp.arange(n)

    def one_chunk(c, carry):
        w, q = carry
        i0 = c * chunk
        wc = lax.dynamic_slice_in_dim(w, i0, chunk, 0)
        uc = lax.dynamic_slice(u, (i0, i0), (chunk, chunk))
        ec = lax.dynamic_slice_in_dim(e, i0, chunk, 0)

        def one_row(r, st):
            wc, qc, errs = st
            qr = to_grid(wc[r], ec[r], fmt)
            err = (wc[r] - qr) / uc[r, r]
            # uc is upper triangular: only rows after r move.
            wc = wc - uc[r][:, None] * err[None, :]
            return wc, qc.at[r].set(qr), errs.at[r].set(err)

        zeros = jnp.zeros_like(wc)
        _, qc, errs = lax.fori_loop(0, chunk, one_row, (wc, zeros, zeros))
        # The rows after this chunk get its errors in one product.
        ur = lax.dynamic_slice_in_dim(u, i0, chunk, 0) * (rows >= i0 + chunk)[None, :]
        w = w - jnp.matmul(ur.T, errs, precision=lax.Precision.HIGHEST)
        return w, lax.dynamic_update_slice_in_dim(q, qc, i0, 0)

    _, q = lax.fori_loop(0, n // chunk, one_chunk, (w, jnp.zeros_like(w)))
    return q


def _inverse_hessian_factor(hessian: np.ndarray, damp: float):
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1`` and the dead inputs."""
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) == 0  # inputs never seen in calibration: weight is irrelevant
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * np.mean(np.diag(h))
    try:
        hinv = np.linalg.inv(np.linalg.cholesky(h))
    except np.linalg.LinAlgError:
        raise ValueError(
            "the damped Hessian is not positive definite (non-finite or not X^T X); "
            f"raise damp (now {damp}) or check the calibration inputs"
        ) from None
    hinv = hinv.T @ hinv  # H^-1 = L^-T L^-1
    return np.linalg.cholesky(hinv).T, dead


def quantize_gptq(
    w,
    format: str | MXFormat,
    hessian,
    *,
    axis: int = 0,
    block_size: int | None = None,
    scale_mode: str = "floor",
    search: ScaleSearch | None = None,
    damp: float = 0.01,
    act_order: bool = False,
    packed: bool = False,
) -> MXTensor:
    """GPTQ with MX block scales fixed from the original weights.

    1. Block exponents come from ``w`` itself: by ``scale_mode`` (as a
       direct cast), or by ``search`` (:class:`ScaleSearch`; its block
       errors weighted by ``diag(hessian)``).
    2. ``H = hessian + damp * mean(diag(hessian)) * I`` (inputs whose
       Hessian diagonal is 0 were never active: their weights become 0).
    3. Rows along ``axis`` (the contraction axis) are rounded in order onto
       their block's fixed grid; each row's error, divided by the diagonal of
       the upper Cholesky factor ``U`` of ``H^-1``, is subtracted from the
       later rows with weights ``U[i, i+1:]`` (Frantar et al. 2023,
       arXiv:2210.17323, Algorithm 1, lazy batches of up to 128 rows).

    This minimizes ``||X w - X w_q||^2`` greedily for the calibration inputs
    ``X`` with ``hessian = X^T X``; a direct cast ignores ``X``.

    Args:
      w: float weight; ``axis`` its contraction axis.
      format: MX format with power-of-two scales.
      hessian: ``(n, n)`` with ``n = w.shape[axis]``: ``sum X^T X`` over the
        calibration rows ``X`` (``(tokens, n)``) fed to this weight.
      axis: contraction axis of ``w``.
      block_size: elements per block; None: the format's.
      scale_mode: rule for the fixed exponents (ignored with ``search``).
      search: take the fixed exponents from a per-block scale search.
      damp: dampening, a fraction of the Hessian's mean diagonal (GPTQ: 1%).
      act_order: quantize rows in order of decreasing Hessian diagonal (the
        inputs with the most energy first; GPTQ's ``act_order``/``desc_act``),
        which the fixed block scales allow (GPTQ's ``static_groups``).
      packed: pack sub-byte codes.

    Returns:
      An :class:`~jaxmx.MXTensor` of ``w``'s shape blocked along ``axis``.

    >>> import jax, jax.numpy as jnp, jaxmx
    >>> x = jax.random.normal(jax.random.key(0), (256, 64))
    >>> w = jax.random.normal(jax.random.key(1), (64, 16))
    >>> t = jaxmx.ptq.quantize_gptq(w, "mxfp4", x.T @ x)
    >>> d = jaxmx.quantize(w, "mxfp4", axis=0)
    >>> out_err = lambda t: float(jnp.linalg.norm(x @ w - x @ jaxmx.dequantize(t)))
    >>> out_err(t) < out_err(d)
    True
    """
    fmt = _check_format(format)
    w = check_array(w, "w").astype(jnp.float32)
    axis = check_axis(axis, w.ndim)  # the rows: the contraction axis
    spec = _spec(fmt, w.ndim, axis, block_size, _check_scale_mode(scale_mode), packed)
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 <= damp < 1:
        raise ValueError(f"damp must be a float in [0, 1) (GPTQ uses 0.01), got {damp!r}")
    act_order = check_flag(act_order, "act_order")
    if search is not None and not isinstance(search, ScaleSearch):
        raise TypeError(f"search must be a ScaleSearch or None, got {type(search).__name__}")
    n = w.shape[axis]
    hessian = np.asarray(hessian)
    if hessian.shape != (n, n):
        raise ValueError(
            f"hessian must have shape ({n}, {n}) (w.shape[axis] squared) for w of shape "
            f"{tuple(w.shape)} along axis {axis}, got {hessian.shape}"
        )
    if not np.all(np.isfinite(hessian)):
        raise ValueError("hessian holds NaN or Inf")
    if not bool(jnp.all(jnp.isfinite(w))):
        raise ValueError("w holds NaN or Inf; GPTQ needs finite weights")

    # 1. Fixed scales from w (a direct cast's, or a search's), and each
    #    entry's grid parameter: OCP, the exponents in the kept-dims blocked
    #    layout; the others, the parameters their _ROUND reads off `like`.
    mode = _check_scale_mode(scale_mode if search is None else search.scale_mode)
    imp = None
    if search is not None and not spec.tiles:
        imp = _check_importance(np.diag(hessian), w.shape, spec.axis)
    if fmt.codec == "ocp":
        bs = spec.block_size
        if search is not None:
            e = _search_jit(w, fmt, spec.axis, bs, mode, search.offsets, imp)
        else:
            e = quantize_blocks(w, fmt, spec.axis, bs, mode, False, None).exponent
        e_blocks = jnp.broadcast_to(e, to_blocks(w, spec.axis, bs).shape)
        params = from_blocks(e_blocks, spec.axis, w.shape[spec.axis])
    else:
        unpacked = dataclasses.replace(spec, packed=False, scale_mode=mode)
        if search is not None:
            like = _search_tensor(w, unpacked, search.offsets, imp)
        else:
            like = quantize_spec(w, None, None, unpacked)
        params = _PARAMS[fmt.codec](like)
    rows_e = jnp.moveaxis(params, axis, 0).reshape(n, -1)
    rows_w = jnp.moveaxis(w, axis, 0).reshape(n, -1)

    # 2. Inverse Hessian factor (rows permuted by act_order); dead inputs quantize to 0.
    order = np.argsort(-np.diag(hessian), kind="stable") if act_order else np.arange(n)
    u, dead = _inverse_hessian_factor(hessian[np.ix_(order, order)], float(damp))
    rows_w = jnp.where(jnp.asarray(dead)[:, None], 0.0, rows_w[order])
    rows_e = rows_e[order]

    # 3. Rows in lazy batches (padded with identity rows that quantize to 0).
    chunk = min(128, -(-n // 16) * 16)
    pad = -n % chunk
    u = np.pad(u, ((0, pad), (0, pad)))
    u[n:, n:] = np.eye(pad)
    rows_w = jnp.pad(rows_w, ((0, pad), (0, 0)))
    rows_e = jnp.pad(rows_e, ((0, pad), (0, 0)))
    q = _gptq_rows(rows_w, jnp.asarray(u, jnp.float32), rows_e, fmt, chunk)[:n]
    q = q[np.argsort(order)]
    moved = jnp.moveaxis(w, axis, 0).shape
    q = jnp.moveaxis(q.reshape(moved), 0, axis)

    # 4. The codes of q on the fixed scales (q is on them: no value moves).
    if fmt.codec == "ocp":
        return quantize_with_exponent(q, e, fmt, spec.axis, spec.block_size, spec.packed)
    return _codecs.CODECS[fmt.codec].onto(q, like, spec)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class GPTQ:
    """``method=`` of :func:`jaxmx.quantize_params`: GPTQ with fixed block scales.

    Weights without a Hessian are an error (a silent direct cast would hide
    a calibration that missed layers).

    >>> import jax, jax.numpy as jnp, jaxmx
    >>> x = jax.random.normal(jax.random.key(0), (128, 64))
    >>> params = {"d": {"kernel": jnp.ones((64, 4))}}
    >>> q = jaxmx.quantize_params(params, "mxfp4",
    ...                           method=jaxmx.ptq.GPTQ(hessians={"d/kernel": x.T @ x}))
    >>> q["d"]["kernel"].shape
    (64, 4)
    """

    # Leaf path (as quantize_params names it, "params/layer/kernel") -> X^T X.
    hessians: Mapping[str, jax.Array]
    # Dampening as a fraction of the mean Hessian diagonal.
    damp: float = 0.01
    # Rule for the fixed block exponents.
    scale_mode: str = "floor"
    # Or fixed exponents from a per-block scale search.
    search: ScaleSearch | None = None
    # Rows in order of decreasing Hessian diagonal (GPTQ's act_order).
    act_order: bool = False

    def __post_init__(self):
        if not isinstance(self.hessians, Mapping):
            raise TypeError(
                f"hessians must be a dict {{path: X^T X}}, got {type(self.hessians).__name__}"
            )
        _check_scale_mode(self.scale_mode)

    def quantize_weight(self, path, x, fmt, *, axis, block_size, packed) -> MXTensor:
        """Quantizes the weight at ``path`` with its Hessian."""
        return quantize_gptq(
            x,
            fmt,
            _hessian_of(self.hessians, path, "GPTQ"),
            axis=axis,
            block_size=block_size,
            scale_mode=self.scale_mode,
            search=self.search,
            damp=self.damp,
            act_order=self.act_order,
            packed=packed,
        )


def _hessian_of(hessians, path, who):
    if path not in hessians:
        some = ", ".join(sorted(hessians)[:4]) or "none"
        raise ValueError(
            f"{who} has no Hessian for {path!r}; it has {len(hessians)} ({some}, ...). "
            "Collect it (collect_hessians) or keep this weight out of the rules"
        )
    return hessians[path]


def collect_hessians(model, variables, batches, *, method: str = "__call__") -> dict:
    """``X^T X`` of the inputs of every ``nn.Dense`` (and ``nn.Embed.attend``) of a linen model.

    Runs ``model.apply(variables, *batch)`` for each batch (unjitted) under
    ``flax.linen.intercept_methods`` and accumulates, for each Dense call,
    the Gram matrix of its input rows (float32 products, float64 sums). Keys are the kernels'
    paths as :func:`jaxmx.quantize_params` names them
    (``"params/layers_0/mlp/up_proj/kernel"``; ``".../embedding"`` for the
    input of an embedding table used as a tied output head, contracted
    along its features, axis 1).

    Args:
      model: a ``flax.linen`` Module.
      variables: its variables, ``{"params": ...}``.
      batches: an iterable of argument tuples (or single arrays) for
        ``model.apply``.
      method: the model method to run.

    Returns:
      ``{path: np.ndarray (in, in)}``.

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxmx
    >>> model = nn.Dense(4)
    >>> v = model.init(jax.random.key(0), jnp.ones((1, 8)))
    >>> h = jaxmx.ptq.collect_hessians(model, v, [jnp.ones((3, 8))])
    >>> h["params/kernel"][0, :2]
    array([3., 3.])
    """
    from flax import linen as nn

    sums: dict[str, np.ndarray] = {}
    last: list = [None, None]  # (input, its Gram matrix): q/k/v share one input

    def record(next_fun, args, kwargs, context):
        module, name = context.module, context.method_name
        leaf = None
        if isinstance(module, nn.Dense) and name == "__call__":
            leaf = "kernel"
        elif isinstance(module, nn.Embed) and name == "attend":
            leaf = "embedding"  # a tied output head: the table along its features
        if leaf is not None:
            x = args[0]
            if last[0] is not x:
                rows = jnp.reshape(x, (-1, x.shape[-1])).astype(jnp.float32)
                gram = jnp.matmul(rows.T, rows, precision=lax.Precision.HIGHEST)
                last[:] = [x, np.asarray(gram, np.float64)]
            key = "/".join(("params", *module.path, leaf))
            sums[key] = sums.get(key, 0.0) + last[1]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        for batch in batches:
            batch = batch if isinstance(batch, tuple) else (batch,)
            model.apply(variables, *batch, method=method)
    if not sums:
        raise ValueError("no nn.Dense or nn.Embed.attend ran in the model: nothing to collect")
    return sums
