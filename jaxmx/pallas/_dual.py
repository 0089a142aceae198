"""Both quantized copies of a matrix from one read: blocks along its rows and along its columns.

A quantized matmul's training step needs each operand twice: for
``y = x @ w``, ``x`` with blocks along K (the forward) and along M (the
weight gradient), ``w`` along K (the forward) and along N (the input
gradient). :func:`quantize_rows_and_columns` writes both copies from one
pass over ``x``: each grid step reads a tile of whole blocks in both
directions and writes the codes and scales of both copies.

The layout (outside the kernel: a zero padding of each axis to whole
blocks, then a free reshape): ``(..., M, K)`` becomes ``(Mb, bs, Kb, bs)``
(leading axes folded into ``Mb``), so a block along a row is the last axis
of the tile and a block along a column is its second axis (``bs`` tile
rows apart). A tile is ``(g, bs, tk, bs)``: ``g`` groups of ``bs`` rows and
``tk`` blocks of each row. Both reductions keep their axis (length 1) and
nothing is reshaped inside the kernel, so the body is the families'
``quantize_tile`` (:mod:`jaxmx.pallas._ocp`, :mod:`jaxmx.pallas._nvfp4`)
called once per direction on the same values. The tile's last two
dimensions are ``(tk, bs)``:

* ``mosaic_tpu``: ``tk`` is all ``Kb`` or a multiple of 32 (the row tile
  of 8-bit arrays in TPU memory), ``bs`` is the array's whole last axis;
  a partial tile at the end of an axis is Mosaic's to mask.
* ``triton``: every side a power of two; the tiled arrays are padded to
  whole tiles first (Pallas's Triton lowering does not mask loads and
  stores past an array's end).

The tile holds ``bs * bs`` elements per block column, so the kernel takes
block sizes up to :data:`MAX_BLOCK`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.typing import DTypeLike

from jaxmx import codes, platforms
from jaxmx.families._arguments import check_array, check_rounding, check_tensor_amax, random_bits
from jaxmx.formats import MXFormat, get_family
from jaxmx.pallas import _bits, _call, _dispatch, _nvfp4
from jaxmx.pallas._choice import dispatch
from jaxmx.spec import QuantSpec
from jaxmx.tensor import MXTensor

# The largest block the fused kernel takes: a TPU tile of 32 row blocks of
# 64 x 64 elements is 128K elements (512 KiB of float32), double-buffered
# with its random bits and codes well inside a TPU core's scoped VMEM.
MAX_BLOCK = 64

# Elements per tile (the most; fewer when the matrix is smaller).
TILE_ELEMENTS = {"mosaic_tpu": 1 << 16, "triton": 1 << 13}


def quantize_rows_and_columns(
    x: jax.typing.ArrayLike,
    format: str | MXFormat,
    *,
    block_size: int | None = None,
    scale_mode: str = "floor",
    rounding: str = "nearest_even",
    flush_subnormals: bool = False,
    key: jax.Array | None = None,
    packed: bool = False,
    tensor_amax: jax.typing.ArrayLike | None = None,
    implementation: str | None = None,
) -> tuple[MXTensor, MXTensor]:
    """Quantizes a matrix twice, with blocks along its rows and along its columns.

    The two copies a quantized matmul's training step needs of each operand
    (the forward's, with blocks along the contraction axis, and the
    backward's, along the other), written from one read of ``x`` by the
    Pallas kernel. They are, bit for bit (codes, scales, tensor scale and
    every field), ``jaxmx.quantize(x, format, axis=-1, ...)`` and
    ``jaxmx.quantize(x, format, axis=-2, ...)`` with the same options;
    stochastic rounding draws the same bits as those two calls (one draw
    from ``key`` over ``x.shape``, used by both).

    Args:
      x: float32, bfloat16 or float16 array of rank >= 2: the last two axes
        are the matrix, leading axes a batch of matrices.
      format, block_size, scale_mode, rounding, flush_subnormals, key,
        packed, tensor_amax: as for :func:`jaxmx.quantize`. NVFP4's tensor
        scale (from ``tensor_amax``, else ``max |x|``) is shared by both
        copies; its 2-D tiles (``block_size=(16, 16)``) are refused, since
        one :func:`jaxmx.quantize` call gives them.
      implementation: ``"xla"``: two calls of the XLA path (every format).
        ``"pallas"``: the fused kernel, for the formats
        ``jaxmx.quantize(..., implementation="pallas")`` takes, with block
        sizes that are powers of two from 2 to 64. ``None`` (default):
        ``"xla"``, until the kernel has run on hardware.

    Returns:
      ``(row_wise, column_wise)``: :class:`~jaxmx.MXTensor` s with blocks along
      the last axis and along the second-to-last.

    Raises:
      ValueError: what :func:`jaxmx.quantize` refuses; rank below 2; 2-D
        tiles; with ``implementation="pallas"``, what the kernel does not take.
      TypeError: integer, complex or float64 input.

    >>> import jax.numpy as jnp, jaxmx
    >>> x = jnp.linspace(-3.0, 3.0, 64 * 96).reshape(64, 96)
    >>> with jaxmx.pallas.interpret("triton"):
    ...     rows, cols = jaxmx.pallas.quantize_rows_and_columns(
    ...         x, "mxfp8", implementation="pallas")
    >>> rows.scale.shape, cols.scale.shape
    ((64, 3), (2, 96))
    >>> ref = jaxmx.quantize(x, "mxfp8", axis=-2)
    >>> bool((cols.data == ref.data).all() and (cols.scale == ref.scale).all())
    True
    """
    x = check_array(x)
    if x.ndim < 2:
        raise ValueError(
            f"quantize_rows_and_columns takes a matrix (rank >= 2: the last two axes, leading "
            f"axes a batch); got rank {x.ndim}. For one axis, use jaxmx.quantize"
        )
    options: dict[str, Any] = dict(
        block_size=block_size,
        scale_mode=scale_mode,
        rounding=rounding,
        flush_subnormals=flush_subnormals,
        packed=packed,
    )
    rows = QuantSpec.make(format, x.ndim, axis=-1, **options)
    if rows.tiles:
        raise ValueError(
            f"quantize_rows_and_columns makes blocks along each of the last two axes; "
            f"block_size={rows.block_size!r} asks for 2-D tiles, which cover both at once: "
            "one jaxmx.quantize call gives them"
        )
    cols = dataclasses.replace(rows, axis=-2)
    check_rounding(rows.rounding, key)
    amax = check_tensor_amax(tensor_amax, rows)
    rbits = random_bits(key, x.shape) if rows.random_bits else None
    impl = _dispatch.check_implementation(implementation)
    return _nodiff(x, rbits, amax, (rows, cols), impl)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _nodiff(
    x: jax.Array,
    rbits: jax.Array | None,
    tensor_amax: jax.Array | None,
    specs: tuple[QuantSpec, QuantSpec],
    implementation: str,
) -> tuple[MXTensor, MXTensor]:
    return rows_and_columns(x, rbits, rbits, tensor_amax, specs, implementation)


@_nodiff.defjvp
def _nodiff_jvp(
    specs: tuple[QuantSpec, QuantSpec], implementation: str, primals: Any, tangents: Any
) -> Any:
    raise TypeError(
        "jaxmx.pallas.quantize_rows_and_columns is not differentiable (its codes are "
        "integers); use jaxmx.fake_quantize for a straight-through gradient, or wrap the "
        "input in jax.lax.stop_gradient if no gradient should flow"
    )


def rows_and_columns(
    x: jax.Array,
    rbits_rows: jax.Array | None,
    rbits_cols: jax.Array | None,
    tensor_amax: jax.Array | None,
    specs: tuple[QuantSpec, QuantSpec],
    implementation: str,
) -> tuple[MXTensor, MXTensor]:
    """Both copies, with validated arguments (for jaxmx's ops).

    ``specs``: blocks along axis -1 and along axis -2, of one family and one
    block size (their formats, roundings and other options may differ);
    each copy draws on its own random bits (they may be the same array).
    """
    rows, cols = specs
    if implementation != "pallas":
        family = get_family(rows.format)
        return (
            family.quantize(x, rbits_rows, tensor_amax, rows),
            get_family(cols.format).quantize(x, rbits_cols, tensor_amax, cols),
        )
    _check(x, rows, cols)
    if x.size == 0 or not all(_dispatch.whole_blocks(s, x.shape) for s in specs):
        # Nothing to quantize, or partial blocks that the family refuses
        # (NVFP4): the family says so.
        return rows_and_columns(x, rbits_rows, rbits_cols, tensor_amax, specs, "xla")
    # Only a copy that rounds stochastically reads random bits; one array
    # that both read is passed to the kernel once.
    r_rows = rbits_rows if rows.random_bits else None
    r_cols = rbits_cols if cols.random_bits else None
    if (rows.random_bits and r_rows is None) or (cols.random_bits and r_cols is None):
        raise ValueError("stochastic rounding needs random bits for each copy that uses it")
    return _fused(
        x,
        r_rows,
        None if r_cols is r_rows else r_cols,
        tensor_amax,
        specs,
        _dispatch.INTERPRET.get(),
        platforms.forced(),
    )


def pair_reason(x: jax.Array, rows: QuantSpec, cols: QuantSpec) -> str | None:
    """Why the fused kernel cannot make these two copies of ``x`` (an error message), or None."""
    try:
        _check(x, rows, cols)
    except ValueError as err:
        return str(err)
    return None


def _check(x: jax.Array, rows: QuantSpec, cols: QuantSpec) -> None:
    for spec in (rows, cols):
        _dispatch.check(spec, x)
    if (rows.axis, cols.axis) != (-1, -2) or rows.format.family != cols.format.family:
        raise ValueError(
            "the fused kernel makes copies of one family with blocks along axes -1 and -2; "
            f"got {rows.format.name} along {rows.axis} and {cols.format.name} along {cols.axis}"
        )
    bs = _dispatch.block_size(rows)
    if bs != cols.block_size or bs > MAX_BLOCK:
        raise ValueError(
            f"implementation='pallas': quantize_rows_and_columns' kernel takes one block size "
            f"for both copies, a power of two from 2 to {MAX_BLOCK} (a tile holds "
            f"block_size x block_size elements per block of a row); got block_size="
            f"{rows.block_size!r} and {cols.block_size!r}; implementation='xla' takes it"
        )


def _to_tiles(a: jax.Array, bs: int) -> jax.Array:
    """``(..., M, K)`` -> ``(Mb, bs, Kb, bs)``, each axis zero-padded to whole blocks."""
    *_, m, k = a.shape
    pad = [(0, 0)] * (a.ndim - 2) + [(0, -m % bs), (0, -k % bs)]
    if any(p for _, p in pad):
        a = jnp.pad(a, pad)
    return a.reshape(-1, bs, a.shape[-1] // bs, bs)


def _from_tiles(a: jax.Array, shape: tuple[int, ...], rows: int, cols: int) -> jax.Array:
    """``(Mb, r, Kb, c)`` -> ``(..., Mb * r, Kb * c)`` cut to ``rows`` x ``cols``."""
    lead = shape[:-2]
    a = a.reshape(*lead, -1, a.shape[1], a.shape[2], a.shape[3])
    a = a.reshape(*lead, a.shape[-4] * a.shape[-3], a.shape[-2] * a.shape[-1])
    return a[..., :rows, :cols]


def tiles(backend: str, mb: int, kb: int, bs: int) -> tuple[int, int]:
    """``(g, tk)``: groups of ``bs`` rows and blocks of each row per tile on ``backend``."""
    budget = TILE_ELEMENTS[backend]
    if backend == "mosaic_tpu":
        tk = kb if kb <= 32 else min(kb, max(32, budget // (bs * bs) // 32 * 32))
        return max(1, min(mb, budget // (bs * tk * bs))), tk
    tk = min(_pow2_ceil(kb), _pow2_floor(max(1, budget // (bs * bs))))
    return min(_pow2_ceil(mb), _pow2_floor(max(1, budget // (bs * tk * bs)))), tk


def _pow2_ceil(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def _body(
    specs: tuple[QuantSpec, QuantSpec],
    dtype: DTypeLike,
    n_tensor: int,
    n_rbits: int,
    x_ref: jax.Ref,
    *refs: jax.Ref,
) -> None:
    """Reads a tile of x once; writes both copies' codes and scales."""
    rows, cols = specs
    kernels = _dispatch.KERNELS[rows.format.family]
    tensor = [r[...] for r in refs[:n_tensor]]
    rbits = [r[...] for r in refs[n_tensor : n_tensor + n_rbits]]
    # One array when both copies read the same bits, else each copy's own.
    r_rows = rbits[0] if rows.random_bits else None
    r_cols = rbits[-1] if cols.random_bits else None
    rc_ref, rs_ref, cc_ref, cs_ref = refs[n_tensor + n_rbits :]
    bits = _bits.f32_bits(x_ref[...], dtype)
    rc_ref[...], rs_ref[...] = kernels.quantize_tile(rows, bits, tensor, r_rows, -1)
    cc_ref[...], cs_ref[...] = kernels.quantize_tile(cols, bits, tensor, r_cols, 1)


def _run(
    specs: tuple[QuantSpec, QuantSpec],
    dtype: DTypeLike,
    n_tensor: int,
    backend: str,
    interpret: bool,
    *ins: jax.Array,
) -> list[jax.Array]:
    """The kernel on ``backend`` over tiled ``ins``: x, per-tensor values, random bits."""
    mb, bs, kb, _ = ins[0].shape
    g, tk = tiles(backend, mb, kb, bs)
    if backend == "triton":  # whole tiles: no load or store runs past an array's end
        pad = [(0, -mb % g), (0, 0), (0, -kb % tk), (0, 0)]
        per_tensor = range(1, 1 + n_tensor)
        ins = tuple(a if i in per_tensor else jnp.pad(a, pad) for i, a in enumerate(ins))
    n_mb, n_kb = ins[0].shape[0], ins[0].shape[2]
    index = lambda i, j: (i, 0, j, 0)  # noqa: E731
    whole = lambda i, j: (0, 0, 0, 0)  # noqa: E731
    code = codes.raw_dtype(specs[0].format.element.bits)
    shapes = [
        ((n_mb, bs, n_kb, bs), code, (g, bs, tk, bs)),  # row-wise codes
        ((n_mb, bs, n_kb, 1), jnp.uint8, (g, bs, tk, 1)),  # row-wise scales
        ((n_mb, bs, n_kb, bs), code, (g, bs, tk, bs)),  # column-wise codes
        ((n_mb, 1, n_kb, bs), jnp.uint8, (g, 1, tk, bs)),  # column-wise scales
    ]
    n_rbits = len(ins) - 1 - n_tensor
    tiled = [pl.BlockSpec((g, bs, tk, bs), index)]
    outs = _call.call(
        functools.partial(_body, specs, dtype, n_tensor, n_rbits),
        ins,
        grid=(pl.cdiv(n_mb, g), pl.cdiv(n_kb, tk)),
        in_specs=tiled + [pl.BlockSpec((1, 1, 1, 1), whole)] * n_tensor + tiled * n_rbits,
        out_specs=[pl.BlockSpec(block, index) for _, _, block in shapes],
        out_shape=[jax.ShapeDtypeStruct(shape, dt) for shape, dt, _ in shapes],
        backend=backend,
        interpret=interpret,
        name="mx_quantize_rows_and_columns",
    )
    return [o[:mb, :, :kb] for o in outs]


# The forced platform is a static argument: it decides the codes' storage
# dtype (jaxmx.codes.storage_dtype), so it must be part of the jit cache key.


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _fused(
    x: jax.Array,
    rbits_rows: jax.Array | None,
    rbits_cols: jax.Array | None,
    tensor_amax: jax.Array | None,
    specs: tuple[QuantSpec, QuantSpec],
    interpret_as: str | None,
    forced: platforms.Platform | None,
) -> tuple[MXTensor, MXTensor]:
    rows, cols = specs
    bs = _dispatch.block_size(rows)
    *_, m, k = x.shape
    ins = [_to_tiles(_bits.to_carrier(x), bs)]
    tensor: Sequence[jax.Array] = ()
    if rows.format.tensor_scale:
        tensor = [t.reshape(1, 1, 1, 1) for t in _nvfp4.tensor_scales(x, tensor_amax)]
    ins.extend(tensor)
    ins.extend(_to_tiles(r, bs) for r in (rbits_rows, rbits_cols) if r is not None)
    mb, kb = ins[0].shape[0], ins[0].shape[2]
    code = codes.raw_dtype(rows.format.element.bits)
    like = [
        jax.ShapeDtypeStruct((mb, bs, kb, bs), code),
        jax.ShapeDtypeStruct((mb, bs, kb, 1), jnp.uint8),
        jax.ShapeDtypeStruct((mb, bs, kb, bs), code),
        jax.ShapeDtypeStruct((mb, 1, kb, bs), jnp.uint8),
    ]
    run = functools.partial(_run, specs, x.dtype, len(tensor))
    rc, rs, cc, cs = dispatch(run, ins, like, interpret_as)
    tensor_scale = tensor[1].reshape(()) if tensor else None
    nb_m, nb_k = -(-m // bs), -(-k // bs)
    return (
        _dispatch.make(rows, x, _from_tiles(rc, x.shape, m, k), _from_tiles(rs, x.shape, m, nb_k),
                       tensor_scale),
        _dispatch.make(cols, x, _from_tiles(cc, x.shape, m, k), _from_tiles(cs, x.shape, nb_m, k),
                       tensor_scale),
    )  # fmt: skip
