"""Per-block scale search: each block keeps the scale with the least (weighted) squared error."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxmx.formats import DEFAULT_OFFSETS, MXFormat, get_family
from jaxmx.ptq._checks import (
    _check_format,
    _check_offsets,
    _check_scale_mode,
    _spec,
)
from jaxmx.ptq._hessians import _hessian_of
from jaxmx.quantize import check_array, dequantize
from jaxmx.spec import QuantSpec
from jaxmx.tensor import MXTensor


def quantize_search(
    x: jax.typing.ArrayLike,
    format: str | MXFormat,
    *,
    axis: int = -1,
    block_size: int | None = None,
    scale_mode: str = "floor",
    offsets: Iterable[int] = DEFAULT_OFFSETS,
    importance: jax.typing.ArrayLike | None = None,
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
    scales fit E4M3); see :func:`jaxmx.families.nvfp4._kernels.nvfp4_quantize_4over6`.
    ``offsets`` do not apply.

    MX9/MX6/MX4 and MSFP: the shared exponent tries Quark's plus each offset,
    and under each every pair of elements takes the micro bit (finer grid or
    not) with the smaller error instead of Quark's rule; no block's error
    exceeds the direct cast's (:func:`jaxmx.families.microexp._kernels.quantize_search`).

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


def _search_tensor(
    x: jax.Array, spec: QuantSpec, offsets: tuple[int, ...], importance: jax.typing.ArrayLike | None
) -> MXTensor:
    """The family's search, on validated arguments (importance: broadcastable or None)."""
    full = None if importance is None else jnp.broadcast_to(importance, x.shape)
    return get_family(spec.format).search(x, offsets, full, spec)


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


def fake_quantize_search(
    x: jax.typing.ArrayLike,
    format: str | MXFormat,
    *,
    axis: int = -1,
    block_size: int | None = None,
    scale_mode: str = "floor",
    offsets: Iterable[int] = DEFAULT_OFFSETS,
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
    offsets = _check_offsets(offsets)
    values = get_family(fmt).fake_search(x, offsets, spec)
    if values is None:
        values = dequantize(_search_tensor(x, spec, offsets, None))
    return values


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
    offsets: tuple[int, ...] = DEFAULT_OFFSETS
    # Rule for the starting exponent: "floor" (OCP), "rceil", "ceil", "even".
    scale_mode: str = "floor"
    # Optional {path: X^T X}: block errors weighted by the Hessian diagonal
    # (the `importance` of quantize_search); None: plain squared error.
    hessians: Mapping[str, jax.Array] | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "offsets", _check_offsets(self.offsets))
        _check_scale_mode(self.scale_mode)

    def quantize_weight(
        self,
        path: str,
        x: jax.Array,
        fmt: MXFormat,
        *,
        axis: int,
        block_size: int | None,
        packed: bool,
    ) -> MXTensor:
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
