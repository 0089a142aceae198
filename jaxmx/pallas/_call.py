"""One ``pallas_call`` over rows of blocks, tiled for each Pallas backend.

A kernel body reads ``(rows, block_size)`` tiles of its inputs and writes
tiles of its outputs with the same rows (``block_size`` columns for
per-element outputs, one column for per-block outputs); the grid walks the
row tiles, which are independent ("parallel": a TPU with two cores splits
them). What differs by backend is only the tile height and the compiler
parameters:

* ``mosaic_tpu``: tiles of up to 512 rows, a multiple of 32 (the row tile
  of 8-bit arrays in TPU memory); fewer rows take one tile of all of them,
  which Mosaic allows for any count (a block dimension equal to the
  array's).
* ``triton``: tiles whose sides are powers of two (a Triton requirement),
  up to 256 rows. Pallas's Triton lowering does not mask the loads and
  stores of a block that runs past the end of an array, so the rows are
  padded with zeros to whole tiles before the call and the outputs cut
  after it (a copy, only when the rows are not whole tiles).

Under :func:`jaxmx.pallas.interpret` the same call runs through Pallas's
interpreter: the TPU one with race detection for ``mosaic_tpu``, the
generic one for ``triton``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton
from jax.typing import DTypeLike

# Mosaic's semantics of one independent grid axis (a TPU with two cores splits it).
_PARALLEL: tuple[Literal["parallel"]] = ("parallel",)

# Rows per tile (the largest; fewer when the array has fewer rows).
TILE_ROWS = {"mosaic_tpu": 512, "triton": 256}


def tile_rows(backend: str, rows: int) -> int:
    """Rows per grid step for ``backend`` over an array of ``rows`` rows."""
    if backend == "mosaic_tpu":
        return rows if rows <= TILE_ROWS[backend] else TILE_ROWS[backend]
    return min(TILE_ROWS[backend], 1 << max(rows - 1, 0).bit_length())


def compiler_params(
    backend: str, semantics: tuple[Literal["parallel", "arbitrary"], ...] = ("parallel",)
) -> pltpu.CompilerParams | pltriton.CompilerParams:
    """``backend``'s compiler parameters; ``semantics``: Mosaic's per grid axis
    ("parallel": independent steps; "arbitrary": a reduction carried across them)."""
    if backend == "mosaic_tpu":
        return pltpu.CompilerParams(dimension_semantics=semantics)
    return pltriton.CompilerParams(num_warps=4, num_stages=1)


def interpreter(backend: str) -> pltpu.InterpretParams | bool:
    """``pallas_call``'s ``interpret`` argument for ``backend``: the TPU
    interpreter with its race detector, or the generic one."""
    if backend == "mosaic_tpu":
        return pltpu.InterpretParams(detect_races=True)
    return True


def run(
    body: Callable,
    inputs: Sequence[jax.Array],
    outputs: Sequence[tuple[int, DTypeLike]],
    *,
    backend: str,
    interpret: bool,
    name: str,
) -> list[jax.Array]:
    """``body`` over the row tiles of ``inputs``.

    ``inputs``: ``(rows, block_size)`` arrays, tiled by rows, or small 2-D
    arrays with one row (per-tensor values), which every step reads whole.
    ``outputs``: ``(columns, dtype)`` per output, each ``(rows, columns)``.
    """
    rows = inputs[0].shape[0]
    tb = tile_rows(backend, rows)
    whole_rows = pl.cdiv(rows, tb) * tb
    if backend == "triton" and whole_rows != rows:
        padded = [
            jnp.pad(a, ((0, whole_rows - rows), (0, 0))) if a.shape[0] == rows else a
            for a in inputs
        ]
        out = run(body, padded, outputs, backend=backend, interpret=interpret, name=name)
        return [o[:rows] for o in out]
    index = lambda i: (i, 0)  # noqa: E731
    whole = lambda i: (0, 0)  # noqa: E731

    def spec(a: jax.Array) -> pl.BlockSpec:
        if a.shape[0] == rows:
            return pl.BlockSpec((tb, a.shape[1]), index)
        return pl.BlockSpec(a.shape, whole)

    return call(
        body,
        inputs,
        grid=(pl.cdiv(rows, tb),),
        in_specs=[spec(a) for a in inputs],
        out_specs=[pl.BlockSpec((tb, cols), index) for cols, _ in outputs],
        out_shape=[jax.ShapeDtypeStruct((rows, cols), dtype) for cols, dtype in outputs],
        backend=backend,
        interpret=interpret,
        name=name,
    )


def call(
    body: Callable,
    inputs: Sequence[jax.Array],
    *,
    grid: tuple[int, ...],
    in_specs: Sequence[pl.BlockSpec],
    out_specs: Sequence[pl.BlockSpec],
    out_shape: Sequence[jax.ShapeDtypeStruct],
    backend: str,
    interpret: bool,
    name: str,
) -> list[jax.Array]:
    """One ``pallas_call`` with ``backend``'s compiler parameters (or its interpreter).

    The grid's steps are independent ("parallel"); the caller's block shapes
    must meet the backend's constraints.
    """
    kernel = pl.pallas_call(
        body,
        grid=grid,
        in_specs=list(in_specs),
        out_specs=list(out_specs),
        out_shape=list(out_shape),
        interpret=interpreter(backend) if interpret else False,
        compiler_params=compiler_params(backend, _PARALLEL * len(grid)),
        name=name,
    )
    return list(kernel(*inputs))
