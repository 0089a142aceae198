"""Quantizing a weight N:M-sparse into an :class:`~jaxmx.NMSparseTensor`.

:func:`jaxmx.intercept` serves one as it is stored, densifying it where an
operation reads it (``jaxmx._intercept.run``).

The stored layout (kept values in blocks of kept values, packed positions)
is described in :mod:`jaxmx.sparse_tensor` and docs/sparsity.md.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmx.bitstream import pack_codes
from jaxmx.formats import MXFormat, get_family, get_format
from jaxmx.quantize import quantize
from jaxmx.sparse_tensor import NMSparseTensor, index_bits
from jaxmx.sparsity import NMSparsity, score_mask

__all__ = ["check_sparse_format", "quantize_sparse"]


def quantize_sparse(
    x: jax.typing.ArrayLike,
    format: str | MXFormat,
    sparsity: NMSparsity,
    *,
    axis: int = -1,
    block_size: int | None = None,
    packed: bool = True,
) -> NMSparseTensor:
    """Makes ``x`` N:M sparse along ``axis`` and stores the kept values quantized.

    In each group of ``m`` consecutive elements along ``axis`` the ``n`` of
    largest magnitude are kept (:func:`jaxmx.sparsify`'s choice, ties to the
    lower index); they are quantized to ``format`` in blocks of
    ``block_size`` **kept** values along ``axis`` and stored with their
    positions (:class:`~jaxmx.NMSparseTensor`).

    Args:
      x: a float array (a weight; ``axis`` is the axis a matmul contracts).
      format: the format of the kept values: one whose blocks may be any
        length (OCP MX, NVFP4 with 1-D blocks) or a per-tensor one.
      sparsity: a :class:`~jaxmx.NMSparsity` with ``score="magnitude"``
        (the others rank by the matmul's other operand, which a stored
        weight does not have).
      axis: the sparse axis; its length must be a multiple of ``m``.
      block_size: kept values per block, by default the format's (32 for
        OCP MX, 16 for NVFP4); a multiple of ``n``, so that a block holds
        whole groups.
      packed: pack sub-byte codes (two FP4 codes per byte).

    Returns:
      An :class:`~jaxmx.NMSparseTensor` whose :meth:`~jaxmx.NMSparseTensor.densify`
      is bit for bit ``jaxmx.quantize(jaxmx.sparsify(x, sparsity, axis),
      format, axis=axis, block_size=block_size * m // n)``.

    >>> import jax, jaxmx
    >>> w = jax.random.normal(jax.random.key(0), (256, 64))
    >>> t = jaxmx.quantize_sparse(w, "mxfp4", jaxmx.NMSparsity(2, 4), axis=0)
    >>> t.bits_per_element  # 2 (codes) + 0.125 (scales) + 1 (indices)
    3.125
    """
    if not isinstance(sparsity, NMSparsity):
        raise TypeError(f"sparsity must be a jaxmx.NMSparsity, got {sparsity!r}")
    if sparsity.score != "magnitude":
        raise ValueError(
            f"quantize_sparse: sparsity {sparsity.describe()} ranks by the matmul's other "
            "operand, which a stored weight does not have; use score='magnitude' (or sparsify "
            "the weight first with jaxmx.sparsify(..., other=...) and store that)"
        )
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x has dtype {x.dtype}; quantize_sparse takes a float array")
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis must be an int, got {axis!r}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis={axis} is out of range for an array of rank {x.ndim}")
    axis = int(axis) % x.ndim - x.ndim
    fmt = get_format(format)
    bs = check_sparse_format(fmt, sparsity, block_size, x.shape[axis], axis)
    n, m = sparsity.n, sparsity.m
    mask = score_mask(x, sparsity, axis)
    xg = jnp.moveaxis(x, axis, -1)
    groups = x.shape[axis] // m
    xg = xg.reshape(*xg.shape[:-1], groups, m)
    mg = jnp.moveaxis(mask, axis, -1).reshape(xg.shape)
    # The kept positions of each group in ascending order: a stable sort of
    # "dropped" (kept first) leaves the n kept ones first, in index order.
    pos = jnp.argsort(~mg, axis=-1, stable=True)[..., :n]
    kept = jnp.take_along_axis(xg, pos, axis=-1).reshape(*xg.shape[:-2], groups * n)
    kept = jnp.moveaxis(kept, -1, axis)
    pos = jnp.moveaxis(pos.reshape(*pos.shape[:-2], groups * n), -1, axis)
    values = quantize(kept, fmt, axis=axis, block_size=bs, packed=packed and fmt.element.bits < 8)
    indices = pack_codes(pos.astype(jnp.uint8), index_bits(m), axis)
    return NMSparseTensor(values, indices, n, m, int(x.shape[axis]))


def check_sparse_format(
    fmt: MXFormat, sparsity: NMSparsity, block_size: Any, length: int, axis: int
) -> int | None:
    """The block size (kept values) of an N:M-sparse ``fmt`` weight, checked.

    Raises ValueError for a format whose blocks are fixed (MX9/MX6/MX4: their
    microexponent pairs would straddle groups), 2-D tiles, a block that is
    not a multiple of ``n`` and a ``length`` that ``m`` does not divide.
    """
    n, m = sparsity.n, sparsity.m
    what = f"{n}:{m} sparse {fmt.name}"
    if length % m:
        raise ValueError(
            f"{what}: the sparse axis {axis} has length {length}, not a multiple of m={m}; "
            f"use an m that divides {length}, or leave this weight dense"
        )
    kind = get_family(fmt).rules.block_sizes
    if kind == "tensor":
        return None
    if kind not in ("any", "tiles"):
        raise ValueError(
            f"{what}: {fmt.name}'s blocks are fixed at {fmt.block_size} elements of the dense "
            "tensor, so they cannot count kept values; use an OCP MX format, NVFP4 or a "
            "per-tensor one for N:M-sparse storage"
        )
    bs = fmt.block_size if block_size is None else block_size
    if isinstance(bs, tuple) or isinstance(bs, bool) or not isinstance(bs, (int, np.integer)):
        raise ValueError(
            f"{what}: block_size {bs!r}; sparse storage takes 1-D blocks (an int: kept values "
            "per block along the sparse axis), not 2-D tiles"
        )
    if bs < 1 or bs % n:
        raise ValueError(
            f"{what}: a block of {bs} kept values is not a multiple of n={n}, so a group's kept "
            f"values would straddle two blocks; use a block size that n divides "
            f"(e.g. {n * max(1, bs // n)})"
        )
    return int(bs)
