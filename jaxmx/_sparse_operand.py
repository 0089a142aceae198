"""N:M sparsity of a quantized matmul's operands (``DotConfig.lhs_sparsity``,
``rhs_sparsity``): the checks made when a matmul is called, and the masking
its forward pass applies before quantizing.

Private to jaxmx's ops; the arithmetic (scores, masks) is :mod:`jaxmx.sparsity`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxmx._operand import operand_spec
from jaxmx.config import DotConfig
from jaxmx.quantize import dequantize
from jaxmx.sparsity import apply_mask, score_mask
from jaxmx.tensor import MXTensor

__all__ = ["check_sparsity", "sparsify_operands"]


def check_sparsity(
    config: DotConfig,
    lhs: Any,
    rhs: Any,
    lc: tuple[int, ...],
    rc: tuple[int, ...],
    op: str,
) -> None:
    """Checks ``config.lhs_sparsity`` / ``rhs_sparsity`` against the operands.

    N:M groups run along the last contracting axis, whose length ``m`` must
    divide, and each group must lie inside one block of the operand's
    format: the block along that axis (OCP MX 32, NVFP4 16, MX9/6/4 16, a
    2-D tile's extent) must be a multiple of ``m``; per-tensor formats and
    high precision have no blocks to cross. An operand given as an
    :class:`~jaxmx.MXTensor` is already quantized and cannot be sparsified.
    """
    for side, x, contracting in (("lhs", lhs, lc), ("rhs", rhs, rc)):
        sp = getattr(config, f"{side}_sparsity")
        if sp is None:
            continue
        what = f"jaxmx.{op}: {side}_sparsity={sp.n}:{sp.m}"
        if isinstance(x, MXTensor):
            raise ValueError(
                f"{what}, but {side} is an MXTensor (already quantized); sparsify the "
                "array before quantizing it (jaxmx.sparsify), or set "
                f"{side}_sparsity=None"
            )
        if not contracting:
            raise ValueError(
                f"{what}, but this matmul contracts no axis of {side} (an outer product): "
                f"there are no groups to sparsify; set {side}_sparsity=None"
            )
        axis = contracting[-1]
        length = x.shape[axis]
        if length % sp.m:
            raise ValueError(
                f"{what} groups {sp.m} elements along {side}'s contraction axis {axis}, whose "
                f"length {length} is not a multiple of {sp.m}; use an m that divides {length}"
            )
        fmt = config.role(side)
        if fmt is None:
            continue
        block = operand_spec(x.ndim, fmt, axis, config, config.rounding, role=side).block_size
        if isinstance(block, tuple):  # 2-D tiles over the last two axes
            block = block[0] if axis == x.ndim - 2 else block[1]
        if block is not None and block % sp.m:
            raise ValueError(
                f"{what}: {fmt.name} blocks {side} by {block} along the contraction axis, not a "
                f"multiple of m={sp.m}, so a group would straddle two blocks; use an m that "
                f"divides {block} (e.g. 2:4, 4:8, 8:16) or a format whose blocks it divides"
            )


def sparsify_operands(
    lhs: Any, rhs: Any, config: DotConfig, d: Any
) -> tuple[Any, Any, tuple[jax.Array | None, jax.Array | None]]:
    """Both operands with their N:M sparsity applied (``config.lhs_sparsity``,
    ``rhs_sparsity``), and the masks the backward pass applies to their
    gradients (None where an operand is dense or its gradient is not masked).

    Each mask is chosen from the operands as given (a score that reads the
    other operand reads it dense, before its own sparsity). ``d``: the
    matmul's dimension numbers with ``lc, rc, lb, rb`` fields.
    """
    cfg = config
    if cfg.lhs_sparsity is None and cfg.rhs_sparsity is None:
        return lhs, rhs, (None, None)

    def dense(x):
        return dequantize(x, jnp.float32) if isinstance(x, MXTensor) else x

    out: list[Any] = [lhs, rhs]
    masks: list[jax.Array | None] = [None, None]
    # Groups run along the last contracting axis; a score's factor is per
    # index of the axes the operands share (contracting and batch).
    sides = (
        (cfg.lhs_sparsity, lhs, rhs, d.lc, d.lc + d.lb, d.rc + d.rb, d.rb),
        (cfg.rhs_sparsity, rhs, lhs, d.rc, d.rc + d.rb, d.lc + d.lb, d.lb),
    )
    for i, (sp, x, other, contracting, own, others, batch) in enumerate(sides):
        if sp is None:
            continue
        other = dense(other) if sp.needs_other else None
        pairs = tuple(zip(own, others, strict=True))
        mask = score_mask(x, sp, contracting[-1], other, pairs, batch)
        out[i] = apply_mask(x, mask)
        masks[i] = mask if sp.backward == "masked" else None
    return out[0], out[1], (masks[0], masks[1])
