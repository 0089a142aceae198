"""What ``DotConfig(implementation="pallas")`` changes in the quantized matmul.

* :func:`both_copies`: an operand's forward and backward MX copies from one
  read (:func:`jaxmx.pallas.quantize_rows_and_columns`), for
  ``dot_general``'s forward pass to keep the backward copy as its residual
  (:class:`Copy`) instead of the high-precision operand;
* :func:`weight_only`: whether a forward matmul is the weight-only kernel's
  (:func:`jaxmx.pallas.weight_only_matmul`): a high-precision activation
  ``(..., K)`` times a 2-D MXTensor weight ``(K, N)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from jaxmx import pallas
from jaxmx._operand import operand_spec, random_bits
from jaxmx.config import DotConfig
from jaxmx.formats import MXFormat
from jaxmx.tensor import MXTensor

__all__ = ["Copy", "both_copies", "weight_only"]


class Copy(NamedTuple):
    """A residual that is an operand's backward MX copy, used by the backward
    matmul as it is (not decoded and quantized again)."""

    t: MXTensor


def both_copies(
    x: Any,
    fmt: MXFormat | None,
    contracting: tuple[int, ...],
    rounding: str,
    role: str,
    cfg: DotConfig,
    key: jax.Array | None,
    bwd_axes: tuple[int, ...],
    bwd_role: str,
) -> tuple[MXTensor, MXTensor] | None:
    """``(forward copy, backward copy)`` of operand ``x`` from one fused kernel, or
    ``None`` where the usual path (each copy by its own kernel) applies.

    The kernel takes matrices (leading axes: a batch) whose forward and
    backward blocks run along the last two axes, of one family and block
    size; other layouts, formats or options it does not take, a gathered
    weight (``fsdp``) and a rotated activation (``wgrad_hadamard``) keep the
    usual path. Each copy draws the random bits its own quantization would.
    """
    bwd_fmt = cfg.role(bwd_role)
    if cfg.implementation != "pallas" or isinstance(x, MXTensor) or fmt is None:
        return None
    if bwd_fmt is None or len(contracting) != 1 or not bwd_axes or x.ndim < 2:
        return None
    if cfg.fsdp is not None or (bwd_role == "lhs_bwd" and cfg.wgrad_hadamard is not None):
        return None
    fwd_axis, bwd_axis = contracting[0], bwd_axes[-1]
    if {fwd_axis, bwd_axis} != {x.ndim - 1, x.ndim - 2}:
        return None
    fwd = operand_spec(x.ndim, fmt, fwd_axis, cfg, rounding, role=role)
    bwd = operand_spec(x.ndim, bwd_fmt, bwd_axis, cfg, cfg.rounding, role=bwd_role)
    last_is_fwd = fwd_axis == x.ndim - 1
    rows, cols = (fwd, bwd) if last_is_fwd else (bwd, fwd)
    if pallas.pair_reason(x, rows, cols) is not None:
        return None
    fwd_bits, bwd_bits = random_bits(x, fwd, key, role), random_bits(x, bwd, key, bwd_role)
    row_bits, col_bits = (fwd_bits, bwd_bits) if last_is_fwd else (bwd_bits, fwd_bits)
    t_rows, t_cols = pallas.rows_and_columns(x, row_bits, col_bits, None, (rows, cols), "pallas")
    return (t_rows, t_cols) if last_is_fwd else (t_cols, t_rows)


def weight_only(x: Any, w: Any, dims: Any, cfg: DotConfig) -> bool:
    """Whether ``x . w`` (dimension numbers ``dims``) is what the Pallas weight-only
    kernel computes, asked for: ``x`` a float array ``(..., K)``, ``w`` a 2-D
    MXTensor ``(K, N)``, under ``implementation="pallas"``."""
    if cfg.implementation != "pallas" or isinstance(x, MXTensor):
        return False
    if not isinstance(w, MXTensor) or w.ndim != 2:
        return False
    (lc, rc), (lb, rb) = dims
    return (tuple(lc), tuple(rc), tuple(lb), tuple(rb)) == ((x.ndim - 1,), (0,), (), ())
