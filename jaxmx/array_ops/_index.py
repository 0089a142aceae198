"""Indexing, take, concatenate and stack of MXTensors, on whole blocks or exact packed bytes."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmx._bitmove import bits as _bits
from jaxmx._bitmove import move as _move
from jaxmx.array_ops._layout import (
    _axis,
    _block_aligned,
    _bytes_at,
    _check_layout,
    _group,
    _on_group,
    _replace,
    _scale_bytes,
    _scale_from_bytes,
    _static_int,
    _stored,
    _tensor,
    _via_unpacked,
    _where,
)
from jaxmx.packing import pack, unpack
from jaxmx.tensor import MXTensor

# --------------------------------------------------------------------------
# Indexing, take, concatenate, stack.
# --------------------------------------------------------------------------


def _is_array_index(e) -> bool:
    return isinstance(e, (jax.Array, np.ndarray, list))


def _expand_index(t: MXTensor, idx) -> list:
    if not isinstance(idx, tuple):
        idx = (idx,)
    entries = []
    for e in idx:
        if isinstance(e, MXTensor):
            raise TypeError("an MXTensor cannot index an MXTensor")
        if e is None or e is Ellipsis or isinstance(e, slice):
            entries.append(e)
        elif isinstance(e, (bool, np.bool_)):
            raise TypeError(f"boolean index {e!r} is not supported on an MXTensor")
        elif isinstance(e, (int, np.integer)):
            entries.append(int(e))
        elif _is_array_index(e) or hasattr(e, "__jax_array__"):
            a = e if isinstance(e, jax.Array) else np.asarray(e)
            if not jnp.issubdtype(a.dtype, jnp.integer):
                raise TypeError(
                    f"MXTensor index arrays must hold integers, got dtype {a.dtype} (boolean "
                    "masks: use jnp.nonzero first, outside jit)"
                )
            entries.append(a)
        else:
            raise TypeError(
                f"unsupported MXTensor index {e!r}; allowed: ints, slices, None, Ellipsis and "
                "integer arrays"
            )
    if sum(e is Ellipsis for e in entries) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    used = sum(e is not None and e is not Ellipsis for e in entries)
    if used > t.ndim:
        raise IndexError(f"too many indices for {_where(t)}: {used} given, rank {t.ndim}")
    fill = [slice(None)] * (t.ndim - used)
    k = next((i for i, e in enumerate(entries) if e is Ellipsis), None)
    return entries + fill if k is None else entries[:k] + fill + entries[k + 1 :]


def _is_array_like(e) -> bool:
    return isinstance(e, (jax.Array, np.ndarray))


def _slice_block_axis(t: MXTensor, start: int, stop: int) -> MXTensor:
    """Codes ``start:stop`` along the block axis; both are block boundaries (or the end)."""
    bs, ax = t.block_size, t.axis

    def cut(u: MXTensor) -> MXTensor:
        lo = _bytes_at(u, start)
        hi = _stored(u, stop) if stop == u.length else _bytes_at(u, stop)
        return _replace(
            u,
            data=_move(u.data, lambda a: lax.slice_in_dim(a, lo, hi, axis=u.ndim + ax)),
            scale=_move(
                u.scale,
                lambda a: lax.slice_in_dim(a, start // bs, -(-stop // bs), axis=u.ndim + ax),
            ),
            length=stop - start,
        )

    return cut(t) if _on_group(t, start, stop) else _via_unpacked(t, cut)


def getitem(t: MXTensor, idx) -> MXTensor:
    """``t[idx]``: basic and integer-array indexing that keeps blocks whole.

    Any index (ints, slices with any step, ``None``, ``...``, integer
    arrays, as in :mod:`jax.numpy`) works on the axes other than the block
    axis, where codes and scales are indexed alike. On the block axis only a
    slice with step 1 whose start and stop lie on block boundaries (the stop
    may also be the end of the axis) is allowed: a cut inside a block, a
    step, or a single element would need new scales. For a gather of whole
    blocks along the block axis, see :func:`take`.

    Raises:
      IndexError: an index the block axis cannot take, or too many indices.
      TypeError: an unsupported index type (booleans, floats, MXTensors).

    >>> import jax.numpy as jnp, jaxmx
    >>> t = jaxmx.quantize(jnp.ones((8, 96)), "mxfp4")
    >>> t[2:5, 32:].shape, t[jnp.array([0, 3])].shape
    ((3, 64), (2, 96))
    """
    t = _tensor(t, "getitem")
    entries = _expand_index(t, idx)
    b = t.ndim + t.axis
    consumed = -1
    pos = None
    for i, e in enumerate(entries):
        if e is not None:
            consumed += 1
            if consumed == b:
                pos = i
                break
    blk = entries[pos]
    if not isinstance(blk, slice):
        raise IndexError(
            f"index {blk!r} along the block axis of {_where(t)} would cut blocks apart; allowed "
            f"there: slices with step 1 starting and ending on block boundaries (multiples of "
            f"{t.block_size}, or the end); for whole blocks by index use jaxmx.take"
        )
    start, stop, step = (
        None if v is None else _static_int(v, "a slice") for v in (blk.start, blk.stop, blk.step)
    )
    start, stop, step = slice(start, stop, step).indices(t.length)
    bs = t.block_size
    if step != 1 or stop <= start or start % bs or (stop % bs and stop != t.length):
        raise IndexError(
            f"slice {blk} (start {start}, stop {stop}, step {step}) along the block axis of "
            f"{_where(t)} does not keep blocks whole; allowed: a non-empty slice with step 1 "
            f"whose start and stop are multiples of {bs} (the stop may be the end, {t.length})"
        )
    if (start, stop) != (0, t.length):
        t = _slice_block_axis(t, start, stop)
    rest = tuple(slice(None) if i == pos else e for i, e in enumerate(entries))
    data, scale = _move(t.data, lambda a: a[rest]), _move(t.scale, lambda a: a[rest])
    # Where the block axis went: index a shape whose block axis has a size no
    # other result axis can have.
    marker = 1 + max([*t.data.shape, *(d for e in rest if _is_array_like(e) for d in e.shape)])
    shape = list(t.data.shape)
    shape[b] = marker
    arrays = [e for e in rest if _is_array_like(e)]

    def probe(a, *arrs):
        it = iter(arrs)
        return a[tuple(next(it) if _is_array_like(e) else e for e in rest)]

    out = jax.eval_shape(
        probe,
        jax.ShapeDtypeStruct(tuple(shape), jnp.int8),
        *(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays),
    ).shape
    new_axis = out.index(marker) - len(out)
    return _replace(t, data=data, scale=scale, axis=new_axis)


_TAKE_MODES = (None, "fill", "clip", "wrap", "promise_in_bounds")


def take(
    t: MXTensor, indices: jax.typing.ArrayLike, axis: int | None = None, *, mode: str | None = None
) -> MXTensor:
    """Gathers slices of an MXTensor by index, as :func:`jax.numpy.take`.

    Along any axis but the block axis, ``indices`` may be any integer array,
    traced or not: this is an embedding lookup from an MX table
    (``take(table, ids, axis=0)`` with blocks along the last axis). Out of
    range indices follow ``mode`` as in jnp; with ``"fill"`` (the default,
    as in jnp) the filled rows decode to NaN (NaN scale, zero codes), which
    is what jnp gives for a float table.

    Along the block axis, ``indices`` must be a concrete 1-D array that
    selects whole blocks: runs ``k*bs, k*bs+1, ..., k*bs+bs-1`` (the last,
    partial block of the axis may appear only at the end).

    Args:
      t: the tensor.
      indices: integer indices.
      axis: the axis to gather along; ``None`` only for a 1-D tensor.
      mode: ``None``/``"fill"``, ``"clip"``, ``"wrap"`` or
        ``"promise_in_bounds"`` (as jnp).

    >>> import jax.numpy as jnp, jaxmx
    >>> table = jaxmx.quantize(jnp.arange(10 * 64.0).reshape(10, 64), "mxfp8")
    >>> rows = jaxmx.take(table, jnp.array([[3, 1], [0, 9]]), axis=0)
    >>> rows.shape, rows.scale.shape
    ((2, 2, 64), (2, 2, 2))
    """
    t = _tensor(t, "take")
    if mode not in _TAKE_MODES:
        raise ValueError(f"unknown take mode {mode!r}; allowed: {_TAKE_MODES}")
    if axis is None:
        if t.ndim != 1:
            raise ValueError(
                f"take with axis=None flattens the array, which would merge blocks of {_where(t)}; "
                "give the axis to gather along"
            )
        axis = 0
    ax = _axis(axis, t.ndim)
    if ax == t.ndim + t.axis:
        return _take_blocks(t, indices, ax)
    idx = indices if isinstance(indices, jax.Array) else jnp.asarray(indices)
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise TypeError(f"take indices must be integers, got dtype {idx.dtype}")
    m = "fill" if mode is None else mode
    data = _move(t.data, lambda a: jnp.take(a, idx, axis=ax, mode=m, fill_value=0))
    sbytes = jnp.take(_scale_bytes(t), idx, axis=ax, mode=m, fill_value=t.format.scale.nan_code)
    block = t.ndim + t.axis
    block = block + idx.ndim - 1 if block > ax else block
    return _replace(t, data=data, scale=_scale_from_bytes(sbytes, t), axis=block - data.ndim)


def _take_blocks(t: MXTensor, indices, ax: int) -> MXTensor:
    if isinstance(indices, jax.core.Tracer):
        raise TypeError(
            f"take along the block axis of {_where(t)} needs concrete indices (it checks that "
            "they select whole blocks); got a traced array. Gather along another axis, or "
            "dequantize first"
        )
    idx = np.asarray(indices)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer) or idx.size == 0:
        raise ValueError(
            f"take along the block axis needs a non-empty 1-D integer array, got shape "
            f"{idx.shape} dtype {idx.dtype}"
        )
    L, bs = t.length, t.block_size
    if ((idx < -L) | (idx >= L)).any():
        raise IndexError(f"take indices out of range for block axis of length {L}: {idx}")
    idx = np.where(idx < 0, idx + L, idx)
    blocks, p = [], 0
    while p < idx.size:
        k, size = idx[p] // bs, min(bs, L - idx[p] // bs * bs)
        run = idx[p : p + size]
        if (
            idx[p] % bs
            or run.size != size
            or (run != np.arange(k * bs, k * bs + size)).any()
            or (size < bs and p + size != idx.size)
        ):
            raise ValueError(
                f"take indices along the block axis of {_where(t)} must select whole blocks "
                f"(runs k*{bs} .. k*{bs}+{bs - 1}, the last partial block only at the end); "
                f"position {p} starts {idx[p : p + 4].tolist()}..."
            )
        blocks.append(int(k))
        p += size
    nb_last = t.num_blocks - 1

    def gather(u: MXTensor) -> MXTensor:
        if u.packed:
            per = u.block_size * u.format.element.bits // 8
            full = _stored(u, u.length)
            pieces = [np.arange(k * per, full if k == nb_last else (k + 1) * per) for k in blocks]
            where = np.concatenate(pieces)
        else:
            where = idx
        return _replace(
            u,
            data=_move(u.data, lambda a: jnp.take(a, jnp.asarray(where), axis=ax)),
            scale=_move(u.scale, lambda a: jnp.take(a, jnp.asarray(blocks), axis=ax)),
            length=int(idx.size),
        )

    return gather(t) if _block_aligned(t) else _via_unpacked(t, gather)


def concatenate(tensors: Sequence[MXTensor], axis: int = 0) -> MXTensor:
    """Joins MXTensors along an axis, as :func:`jax.numpy.concatenate`.

    All tensors must share format, block size, packing and block axis. Along
    another axis they must agree on the block-axis length; along the block
    axis every tensor but the last must hold whole blocks (a length that is
    a multiple of ``block_size``), so the blocks of the result are theirs.
    The result's ``dtype`` is the promotion of theirs, as in jnp.

    >>> import jax.numpy as jnp, jaxmx
    >>> a = jaxmx.quantize(jnp.ones((2, 64)), "mxfp4")
    >>> b = jaxmx.quantize(jnp.ones((2, 40)), "mxfp4")
    >>> jaxmx.concatenate([a, b], axis=1).shape, jaxmx.concatenate([a, a]).shape
    ((2, 104), (4, 64))
    """
    if isinstance(tensors, MXTensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError(
            f"concatenate expects a list or tuple of MXTensors, got {type(tensors).__name__}"
        )
    if not tensors:
        raise ValueError("concatenate needs at least one MXTensor")
    for i, u in enumerate(tensors):
        if not isinstance(u, MXTensor):
            raise TypeError(
                f"concatenate: item {i} is a {type(u).__name__}, not an MXTensor; quantize it "
                "first, with the others' format, block size and axis"
            )
    for u in tensors:
        _check_layout(u, "concatenate")
    ts = [u.canonical() for u in tensors]
    t0 = ts[0]
    for i, u in enumerate(ts[1:], 1):
        mine = (u.format, u.block_size, u.packed, u.ndim, u.axis)
        want = (t0.format, t0.block_size, t0.packed, t0.ndim, t0.axis)
        if mine != want:
            raise ValueError(
                f"concatenate: item {i} is a {_where(u)}, item 0 a {_where(t0)}; all must share "
                "format, block size, packing, rank and block axis"
            )
    ax = _axis(axis, t0.ndim)
    dtype = np.dtype(jnp.result_type(*(u.dtype for u in ts)))
    if ax != t0.ndim + t0.axis:
        lengths = {u.length for u in ts}
        if len(lengths) != 1:
            raise ValueError(
                f"concatenate along axis {ax}: block-axis lengths differ ({sorted(lengths)})"
            )
        return _replace(
            t0,
            data=_join([u.data for u in ts], ax),
            scale=_join([u.scale for u in ts], ax),
            dtype=dtype,
        )
    for i, u in enumerate(ts[:-1]):
        if u.length % u.block_size:
            raise ValueError(
                f"concatenate along the block axis: item {i} has length {u.length}, which ends "
                f"inside a block of {u.block_size}; allowed: every item but the last a multiple "
                f"of {u.block_size}"
            )

    def join(us) -> MXTensor:
        return _replace(
            us[0],
            data=_join([u.data for u in us], ax),
            scale=_join([u.scale for u in us], ax),
            length=sum(u.length for u in us),
            dtype=dtype,
        )

    g = _group(t0)[0]
    if all(u.length % g == 0 for u in ts[:-1]):
        return join(ts)
    return pack(join([unpack(u) for u in ts]))


def _join(arrays, axis: int) -> jax.Array:
    out = jnp.concatenate([_bits(a) for a in arrays], axis=axis)
    dt = arrays[0].dtype
    return out if out.dtype == dt else lax.bitcast_convert_type(out, dt)


def _expand_dims(t: MXTensor, axis: int) -> MXTensor:
    ax = _axis(axis, t.ndim + 1)
    block = t.ndim + t.axis
    block = block + 1 if ax <= block else block
    return _replace(
        t,
        data=jnp.expand_dims(t.data, ax),
        scale=jnp.expand_dims(t.scale, ax),
        axis=block - (t.ndim + 1),
    )


def stack(tensors: Sequence[MXTensor], axis: int = 0) -> MXTensor:
    """Stacks MXTensors along a new axis, as :func:`jax.numpy.stack`.

    The tensors must share shape, format, block size, packing and block axis.

    >>> import jax.numpy as jnp, jaxmx
    >>> a = jaxmx.quantize(jnp.ones((2, 64)), "mxfp4")
    >>> s = jaxmx.stack([a, a, a], axis=1)
    >>> s.shape, s.axis
    ((2, 3, 64), -1)
    """
    if isinstance(tensors, MXTensor) or not isinstance(tensors, (list, tuple)) or not tensors:
        raise TypeError("stack expects a non-empty list or tuple of MXTensors")
    for i, u in enumerate(tensors):
        if not isinstance(u, MXTensor):
            raise TypeError(f"stack: item {i} is a {type(u).__name__}, not an MXTensor")
        _check_layout(u, "stack")
    shapes = {u.shape for u in tensors}
    if len(shapes) != 1:
        raise ValueError(f"stack needs MXTensors of one shape, got {sorted(shapes)}")
    ts = [_expand_dims(u.canonical(), axis) for u in tensors]
    return concatenate(ts, axis=_axis(axis, ts[0].ndim))
