"""MXTensor as an array: operations that act on codes and scales, exactly.

Some array operations commute with block quantization: moving whole blocks
around (transposes, reshapes that keep blocks whole, slices and gathers
aligned to blocks, concatenation at block boundaries), flipping signs, and
multiplying by a power of two (which only changes the scales). These run
on the codes and scales directly, never through float values, so

    dequantize(op(t)) == op(dequantize(t))      bit for bit,

and for whole-block moves of a tensor made by :func:`jaxmx.quantize`, also
``op(quantize(x)) == quantize(op(x))``. Everything else raises an error that
says what was asked and what is allowed: nothing here dequantizes and
quantizes again behind the caller's back.

Rules that depend on the data (a code or exponent that has no exact image)
cannot raise under ``jit``; there the affected block gets the NaN scale, so
the result is never a wrong number:

* ``-t`` and ``abs(t)`` of an MXINT block holding the code -2^(bits-1) (never
  written by :func:`jaxmx.quantize`, which is symmetric; only hand-made or
  imported tensors hold it): +2^(bits-1) has no code.
* :func:`ldexp` (and ``t * 2.0**k``) of a nonzero block whose exponent
  leaves the scale's range (E8M0: [-127, 127]). All-zero blocks keep their
  scale; a Python ``k`` that moves every exponent out of range is refused.

MXINT codes are two's complement and have no -0: ``-t`` of a zero MXINT
element is +0, where ``-dequantize(t)`` is -0.0 (equal as numbers).

Packed tensors: operations along other axes move the packed bytes as they
are. Along the block axis, bytes are moved directly where the cut falls on
a byte boundary; elsewhere the codes are unpacked, moved and packed again,
which is exact (packing is lossless).
"""

from __future__ import annotations

import dataclasses
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmx.blocks import pack_group, packed_length, to_blocks
from jaxmx.codes import raw_to_storage, storage_to_raw
from jaxmx.packing import pack, unpack
from jaxmx.spec import CODEC_RULES
from jaxmx.tensor import MXTensor, register_ops

__all__ = [
    "absolute",
    "astype",
    "concatenate",
    "ldexp",
    "moveaxis",
    "multiply",
    "negative",
    "reshape",
    "getitem",
    "stack",
    "swapaxes",
    "take",
    "transpose",
]

_OUT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


# --------------------------------------------------------------------------
# Checks and small helpers.
# --------------------------------------------------------------------------


def _replace(t: MXTensor, **changes) -> MXTensor:
    """``dataclasses.replace`` that keeps ``made_ndim`` the rank of the new leaves.

    The ops here change the rank on purpose (reshape, indexing, stack); the
    recorded rank is what tells vmap/scan-made rank changes apart.
    """
    out = dataclasses.replace(t, **changes)
    if out.made_ndim is not None and out.made_ndim != out.data.ndim:
        out = dataclasses.replace(out, made_ndim=out.data.ndim)
    return out


def _tensor(t, op: str) -> MXTensor:
    if not isinstance(t, MXTensor):
        raise TypeError(f"jaxmx.{op} expects an MXTensor, got {type(t).__name__}")
    if op != "astype":
        _check_layout(t, op)
    return t.canonical()


def _check_layout(t: MXTensor, op: str) -> None:
    if not CODEC_RULES[t.format.codec].array_ops:
        raise TypeError(
            f"jaxmx.{op} acts on the codes and scales of OCP MX tensors; {_where(t)} has "
            f"{t.format.codec} scales (tensor scale, E4M3 or microexponent leaves) for which "
            "no exact rule is implemented. Dequantize first (t.dequantize()) and quantize "
            "the result again if you need it in this format"
        )


def _axis(axis, ndim: int, what: str = "axis") -> int:
    """A non-negative axis index, or a clear error."""
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"{what} must be an int, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"{what} {axis} is out of range for an MXTensor of rank {ndim}; "
            f"allowed: {-ndim}..{ndim - 1}"
        )
    return int(axis) % ndim


def _where(t: MXTensor) -> str:
    return (
        f"{t.format.name} MXTensor of shape {t.shape} (blocks of {t.block_size} along axis "
        f"{t.ndim + t.axis}{', packed' if t.packed else ''})"
    )


def _group(t: MXTensor) -> tuple[int, int]:
    """(codes, bytes) per packing group; (1, 1) for unpacked codes."""
    return pack_group(t.format.element.bits) if t.packed else (1, 1)


def _stored(t: MXTensor, length: int) -> int:
    return packed_length(length, t.format.element.bits) if t.packed else length


def _bytes_at(t: MXTensor, i: int) -> int:
    """Index in ``data`` along the block axis where code ``i`` starts (``i`` on a group)."""
    g, nbytes = _group(t)
    return i // g * nbytes


def _on_group(t: MXTensor, *positions: int) -> bool:
    """Whether every code position is a packing-group boundary (or the end)."""
    g, _ = _group(t)
    return all(p % g == 0 or p == t.length for p in positions)


def _block_aligned(t: MXTensor) -> bool:
    """Whether every block starts on a byte of ``data`` (always when unpacked)."""
    return not t.packed or (t.block_size * t.format.element.bits) % 8 == 0


def _via_unpacked(t: MXTensor, fn) -> MXTensor:
    """``fn`` on the unpacked codes, packed again: exact, since packing is lossless."""
    return pack(fn(unpack(t))) if t.packed else fn(t)


def _scale_bytes(t: MXTensor) -> jax.Array:
    return lax.bitcast_convert_type(t.scale, jnp.uint8)


def _scale_from_bytes(b: jax.Array, t: MXTensor) -> jax.Array:
    return lax.bitcast_convert_type(b.astype(jnp.uint8), t.format.scale.storage_dtype)


def _bits(a: jax.Array) -> jax.Array:
    """The same bytes as unsigned integers.

    Codes are moved as integers: XLA may canonicalize the NaN payloads of a
    float8 array it gathers or selects (an E5M2 -NaN code 0xFE came back as
    0x7F), and codes must come out as they went in.
    """
    dt = np.dtype(a.dtype)
    if jnp.issubdtype(dt, jnp.floating) and jnp.finfo(dt).bits == 8 * dt.itemsize:
        return lax.bitcast_convert_type(a, np.dtype(f"uint{8 * dt.itemsize}"))
    return a


def _move(a: jax.Array, fn) -> jax.Array:
    """``fn`` applied to the bytes of ``a`` (see :func:`_bits`), back in ``a``'s dtype."""
    out = fn(_bits(a))
    return out if out.dtype == a.dtype else lax.bitcast_convert_type(out, a.dtype)


def _static_int(v, what: str) -> int:
    if isinstance(v, jax.core.Tracer):
        raise TypeError(
            f"{what} along the block axis of an MXTensor must be known at trace time (it "
            "decides which blocks are kept); got a traced value"
        )
    return operator.index(v)


# --------------------------------------------------------------------------
# Axis permutations: the block axis moves with the metadata.
# --------------------------------------------------------------------------


def transpose(t: MXTensor, axes=None) -> MXTensor:
    """Permutes the axes of an MXTensor, as :func:`jax.numpy.transpose`.

    Codes and scales are permuted alike; the block axis moves with them and
    ``axis`` follows it. Packed bytes move as they are.

    Args:
      t: the tensor.
      axes: a permutation of ``range(t.ndim)`` (negative entries allowed);
        ``None`` reverses the axes.

    >>> import jax.numpy as jnp, jaxmx
    >>> t = jaxmx.quantize(jnp.ones((3, 64)), "mxfp8", axis=1)
    >>> u = jaxmx.transpose(t)
    >>> u.shape, u.axis, u.scale.shape
    ((64, 3), -2, (2, 3))
    """
    t = _tensor(t, "transpose")
    n = t.ndim
    if axes is None:
        perm = tuple(range(n - 1, -1, -1))
    else:
        if isinstance(axes, (int, np.integer)):
            axes = (axes,)
        perm = tuple(_axis(a, n, "transpose axis") for a in axes)
        if sorted(perm) != list(range(n)):
            raise ValueError(
                f"transpose axes {tuple(axes)} are not a permutation of the {n} axes of {_where(t)}"
            )
    block = perm.index(n + t.axis)
    return _replace(
        t,
        data=_move(t.data, lambda a: jnp.transpose(a, perm)),
        scale=_move(t.scale, lambda a: jnp.transpose(a, perm)),
        axis=block - n,
    )


def swapaxes(t: MXTensor, axis1: int, axis2: int) -> MXTensor:
    """Swaps two axes of an MXTensor, as :func:`jax.numpy.swapaxes`.

    >>> import jax.numpy as jnp, jaxmx
    >>> t = jaxmx.quantize(jnp.ones((2, 3, 64)), "mxfp4")
    >>> jaxmx.swapaxes(t, 0, 2).shape
    (64, 3, 2)
    """
    t = _tensor(t, "swapaxes")
    perm = list(range(t.ndim))
    a, b = _axis(axis1, t.ndim, "axis1"), _axis(axis2, t.ndim, "axis2")
    perm[a], perm[b] = perm[b], perm[a]
    return transpose(t, perm)


def moveaxis(t: MXTensor, source, destination) -> MXTensor:
    """Moves axes of an MXTensor to new positions, as :func:`jax.numpy.moveaxis`.

    >>> import jax.numpy as jnp, jaxmx
    >>> t = jaxmx.quantize(jnp.ones((2, 3, 64)), "mxfp4")
    >>> u = jaxmx.moveaxis(t, -1, 0)
    >>> u.shape, u.axis
    ((64, 2, 3), -3)
    """
    t = _tensor(t, "moveaxis")
    n = t.ndim
    src = [source] if isinstance(source, (int, np.integer)) else list(source)
    dst = [destination] if isinstance(destination, (int, np.integer)) else list(destination)
    if len(src) != len(dst):
        raise ValueError(
            f"moveaxis needs as many sources as destinations, got {source!r} and {destination!r}"
        )
    src = [_axis(a, n, "source") for a in src]
    dst = [_axis(a, n, "destination") for a in dst]
    if len(set(src)) != len(src) or len(set(dst)) != len(dst):
        raise ValueError(f"moveaxis got repeated axes: {source!r} -> {destination!r}")
    rest = [a for a in range(n) if a not in src]
    perm = [None] * n
    for s, d in zip(src, dst, strict=True):
        perm[d] = s
    it = iter(rest)
    perm = [p if p is not None else next(it) for p in perm]
    return transpose(t, perm)


# --------------------------------------------------------------------------
# Reshape: blocks stay whole.
# --------------------------------------------------------------------------


def _new_shape(shape, size: int, t: MXTensor) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    try:
        shape = tuple(operator.index(s) for s in shape)
    except TypeError:
        raise TypeError(f"reshape needs a shape of ints, got {shape!r}") from None
    if shape.count(-1) > 1 or any(s < -1 for s in shape):
        raise ValueError(f"invalid shape {shape} for reshape: sizes >= 0 and at most one -1")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if known == 0 or size % known:
            raise ValueError(f"cannot reshape {_where(t)} ({size} elements) to {shape}")
        shape = tuple(size // known if s == -1 else s for s in shape)
    if math.prod(shape) != size:
        raise ValueError(f"cannot reshape {_where(t)} ({size} elements) to {shape}")
    return shape


def reshape(t: MXTensor, shape) -> MXTensor:
    """Reshapes an MXTensor without touching a value, as :func:`jax.numpy.reshape`.

    Axes before and after the block axis may be merged and split freely, as
    long as the block axis stays one axis with everything after it kept
    after it. The block axis itself may also be split into (outer axes,
    inner axis), or merged with the axes before it, when both the old and
    new block-axis lengths are multiples of ``block_size``: blocks then stay
    whole and in order. Anything else (merging the block axis with a later
    axis, cutting a block in two) would need new scales and raises.

    Args:
      t: the tensor.
      shape: the new shape; one entry may be -1.

    Raises:
      ValueError: the new shape does not keep the blocks whole.

    >>> import jax.numpy as jnp, jaxmx
    >>> t = jaxmx.quantize(jnp.ones((4, 6, 64)), "mxfp4", packed=True)
    >>> u = jaxmx.reshape(t, (24, 2, 32))  # 64 = 2 x 32: blocks stay whole
    >>> u.shape, u.axis, u.scale.shape
    ((24, 2, 32), -1, (24, 2, 1))
    """
    t = _tensor(t, "reshape")
    old = t.shape
    shape = _new_shape(shape, math.prod(old), t)
    b, n, L, bs = t.ndim + t.axis, len(shape), t.length, t.block_size
    inner = math.prod(old[b + 1 :])
    whole = L % bs == 0
    fits = [
        j
        for j in range(n)
        if math.prod(shape[j + 1 :]) == inner
        and (shape[j] == L or (whole and shape[j] > 0 and shape[j] % bs == 0))
    ]
    if not fits:
        raise ValueError(
            f"cannot reshape {_where(t)} to {shape}: the block axis must stay one axis, with the "
            f"axes after it ({old[b + 1 :]}, {inner} elements) kept after it; it may be split or "
            f"merged with the axes before it only at block boundaries (old and new length "
            f"multiples of {bs}). Dequantize first to reshape freely"
        )
    j = next((j for j in fits if shape[j] == L), fits[0])
    new_len = shape[j]
    nb = -(-new_len // bs)

    def move(u: MXTensor) -> MXTensor:
        return _replace(
            u,
            data=u.data.reshape(shape[:j] + (_stored(u, new_len),) + shape[j + 1 :]),
            scale=u.scale.reshape(shape[:j] + (nb,) + shape[j + 1 :]),
            axis=j - n,
            length=new_len,
        )

    g = _group(t)[0]
    if new_len == L or (L % g == 0 and new_len % g == 0):
        return move(t)  # packed bytes split or join on whole groups
    return _via_unpacked(t, move)


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


def take(t: MXTensor, indices, axis: int | None = None, *, mode: str | None = None) -> MXTensor:
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


def concatenate(tensors, axis: int = 0) -> MXTensor:
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


def stack(tensors, axis: int = 0) -> MXTensor:
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


# --------------------------------------------------------------------------
# Code-wise operations: signs, powers of two.
# --------------------------------------------------------------------------


def _byte_pattern(t: MXTensor, code_mask: int) -> np.ndarray:
    """Per byte of packed ``data`` along the block axis: ``code_mask`` at every real code."""
    bits = t.format.element.bits
    g, nbytes = pack_group(bits)

    def group(count: int) -> np.ndarray:
        word = sum(code_mask << (bits * j) for j in range(count))
        return np.frombuffer(word.to_bytes(nbytes, "little"), np.uint8)

    full, rem = divmod(t.length, g)
    parts = [np.tile(group(g), full)] + ([group(rem)] if rem else [])
    pattern = np.concatenate(parts)
    return pattern.reshape(pattern.shape + (1,) * (-t.axis - 1))


def _to_data(mask: jax.Array, t: MXTensor) -> jax.Array:
    """A per-block array (scale-shaped) repeated over each block's entries of ``data``."""
    per = t.block_size * t.format.element.bits // 8 if t.packed else t.block_size
    ax = t.ndim + t.axis
    rep = jnp.repeat(mask, per, axis=ax)
    return lax.slice_in_dim(rep, 0, t.data.shape[ax], axis=ax)


def _per_block_any(flags: jax.Array, t: MXTensor) -> jax.Array:
    """Scale-shaped: whether any entry of ``data`` in the block is flagged."""
    per = t.block_size * t.format.element.bits // 8 if t.packed else t.block_size
    blocked = to_blocks(flags, t.axis, per)
    return jnp.any(blocked, axis=blocked.ndim + t.axis)


def _nan_blocks(t: MXTensor) -> jax.Array:
    return _scale_bytes(t) == jnp.uint8(t.format.scale.nan_code)


def _with_nan_blocks(t: MXTensor, bad: jax.Array, data: jax.Array, sbytes=None) -> MXTensor:
    """Gives the blocks flagged ``bad`` the NaN scale and zero codes (the invariant)."""
    sbytes = _scale_bytes(t) if sbytes is None else sbytes
    sbytes = jnp.where(bad, jnp.uint8(t.format.scale.nan_code), sbytes)
    data = _move(data, lambda a: jnp.where(_to_data(bad, t), jnp.zeros((), a.dtype), a))
    return _replace(t, data=data, scale=_scale_from_bytes(sbytes, t))


def _sign_op(t: MXTensor, op: str) -> MXTensor:
    elem = t.format.element
    if elem.kind == "int":
        return _via_unpacked(t, lambda u: _int_sign_op(u, op))
    if t.packed and not _block_aligned(t) and op == "neg":
        return _via_unpacked(t, lambda u: _sign_op(u, op))
    if t.packed:
        sign = jnp.asarray(_byte_pattern(t, elem.sign_bit))
        if op == "abs":
            return _replace(t, data=t.data & ~sign)
        # NaN blocks keep their (zero) codes.
        flip = jnp.where(_to_data(_nan_blocks(t), t), jnp.uint8(0), sign)
        return _replace(t, data=t.data ^ flip)
    raw = storage_to_raw(t.data, elem)
    sign = raw.dtype.type(elem.sign_bit)
    if op == "abs":
        raw = raw & ~sign
    else:
        raw = raw ^ jnp.where(_to_data(_nan_blocks(t), t), raw.dtype.type(0), sign)
    return _replace(t, data=raw_to_storage(raw, elem))


def _int_sign_op(t: MXTensor, op: str) -> MXTensor:
    elem = t.format.element
    c = t.data.astype(jnp.int32)
    out = (-c if op == "neg" else jnp.abs(c)).astype(t.data.dtype)
    # -(-2^(bits-1)) has no code: that block becomes NaN rather than a wrong number.
    bad = _per_block_any(c == -elem.sign_bit, t)
    return _with_nan_blocks(t, bad, out)


def negative(t: MXTensor) -> MXTensor:
    """``-t``: flips the sign of every code; scales are unchanged.

    Float codes flip their sign bit (FP8, FP6 in bit 5 of a byte, FP4 in bit
    3, packed or not); MXINT codes are negated as integers. Exact, with two
    caveats (see the module docstring): MXINT has no -0, and an MXINT block
    holding the code -2^(bits-1) (never written by :func:`jaxmx.quantize`)
    becomes NaN. NaN blocks stay NaN.

    >>> import jax.numpy as jnp, jaxmx
    >>> t = jaxmx.quantize(jnp.array([1.0, -1.5, 0.0, 6.0]), "mxfp4", block_size=4)
    >>> jaxmx.dequantize(-t)
    Array([-1. ,  1.5, -0. , -6. ], dtype=float32)
    """
    return _sign_op(_tensor(t, "negative"), "neg")


def absolute(t: MXTensor) -> MXTensor:
    """``abs(t)``: clears the sign of every code; scales are unchanged.

    Same rules as :func:`negative` (an MXINT block holding -2^(bits-1)
    becomes NaN). ``abs`` of an FP8 NaN code is NaN, of E5M2 -Inf is +Inf.

    >>> import jax.numpy as jnp, jaxmx
    >>> t = jaxmx.quantize(jnp.array([1.0, -2.5, -0.0, -6.0]), "mxint8", block_size=4)
    >>> jaxmx.dequantize(abs(t))
    Array([1. , 2.5, 0. , 6. ], dtype=float32)
    """
    return _sign_op(_tensor(t, "absolute"), "abs")


def ldexp(t: MXTensor, k) -> MXTensor:
    """``t * 2**k`` exactly: every block's scale exponent moves by ``k``, codes do not.

    Args:
      t: the tensor.
      k: an integer exponent: a Python int, or an integer scalar array (may
        be traced).

    Every value of a block is the block's scale times a code, so adding
    ``k`` to the exponent multiplies each value by exactly 2^k. Where the new
    exponent leaves the scale format's range (E8M0: [-127, 127]), no scale
    can hold the result exactly, so:

    * a Python ``k`` so large that every nonzero block would leave the range
      (|k| > 254 for E8M0) is refused with a ValueError;
    * otherwise it depends on the data: a nonzero block whose exponent would
      leave the range gets the NaN scale (and zero codes), never a clamped,
      wrong value. Blocks whose codes are all zero keep their scale (zero
      times anything is zero), and NaN blocks stay NaN.

    >>> import jax.numpy as jnp, jaxmx
    >>> t = jaxmx.quantize(jnp.array([1.0, -1.5, 0.0, 6.0]), "mxfp4", block_size=4)
    >>> jaxmx.dequantize(jaxmx.ldexp(t, -3))
    Array([ 0.125 , -0.1875,  0.    ,  0.75  ], dtype=float32)
    """
    t = _tensor(t, "ldexp")
    sf = t.format.scale
    span = sf.max_exponent - sf.min_exponent
    if isinstance(k, (bool, np.bool_)):
        raise TypeError(f"ldexp exponent must be an integer, got {k!r}")
    if isinstance(k, (int, np.integer)):
        k = int(k)
        if abs(k) > span:
            raise ValueError(
                f"ldexp by 2^{k} moves every nonzero block of {_where(t)} out of the "
                f"{sf.name} scale range 2^{sf.min_exponent}..2^{sf.max_exponent}; allowed: "
                f"|k| <= {span} (dequantize first for a float result)"
            )
        if k == 0:
            return t
    else:
        k = jnp.asarray(k)
        if k.ndim != 0 or not jnp.issubdtype(k.dtype, jnp.integer):
            raise TypeError(
                f"ldexp exponent must be an integer scalar, got shape {k.shape} dtype {k.dtype}"
            )
    return _via_unpacked(t, lambda u: _ldexp(u, k)) if not _block_aligned(t) else _ldexp(t, k)


def _ldexp(t: MXTensor, k) -> MXTensor:
    elem, sf = t.format.element, t.format.scale
    value_bits = elem.sign_bit - 1 if elem.kind == "float" else (1 << elem.bits) - 1
    if t.packed:
        nonzero = (t.data & jnp.asarray(_byte_pattern(t, value_bits))) != 0
    else:
        nonzero = (storage_to_raw(t.data, elem) & value_bits) != 0
    live = _per_block_any(nonzero, t)
    biased = _scale_bytes(t).astype(jnp.int32)
    nan = biased == sf.nan_code
    e = biased - sf.bias + k
    out = (e < sf.min_exponent) | (e > sf.max_exponent)
    moved = jnp.where(live & ~nan & ~out, e + sf.bias, biased)
    return _with_nan_blocks(t, live & ~nan & out, t.data, moved.astype(jnp.uint8))


def _pow2(c) -> int | None:
    """``k`` with ``c == 2**k`` for a concrete positive power of two, else None."""
    m, e = math.frexp(c)
    return e - 1 if m == 0.5 else None


def multiply(t: MXTensor, c) -> MXTensor:
    """``t * c`` for a concrete ``c = +-2**k``: :func:`ldexp` (and a sign flip for c < 0).

    Any other factor would need new codes, and a traced factor cannot be
    checked, so both raise; use :func:`ldexp` with a traced integer
    exponent, or dequantize first.

    >>> import jax.numpy as jnp, jaxmx
    >>> t = jaxmx.quantize(jnp.array([1.0, -1.5, 0.0, 6.0]), "mxfp4", block_size=4)
    >>> jaxmx.dequantize(t * -0.5)
    Array([-0.5 ,  0.75, -0.  , -3.  ], dtype=float32)
    """
    t = _tensor(t, "multiply")
    if isinstance(c, MXTensor):
        raise TypeError(
            "multiplying two MXTensors element by element does not keep the codes; "
            "dequantize them (or use jaxmx.dot_general/einsum for products that contract)"
        )
    if isinstance(c, (jax.core.Tracer, bool, np.bool_)) or getattr(c, "shape", ()) != ():
        raise TypeError(
            f"an MXTensor can be multiplied only by a concrete scalar power of two (+-2**k); "
            f"got {type(c).__name__}{getattr(c, 'shape', '')}. For a traced power of two use "
            "t.ldexp(k) with an integer k"
        )
    try:
        v = float(c)
    except (TypeError, ValueError):
        raise TypeError(
            f"an MXTensor can be multiplied only by a scalar power of two (+-2**k), got "
            f"{type(c).__name__}{getattr(c, 'shape', '')}; dequantize first"
        ) from None
    k = _pow2(abs(v)) if math.isfinite(v) and v != 0 else None
    if k is None:
        raise ValueError(
            f"multiplying {_where(t)} by {c!r} does not commute with block quantization (the "
            "codes would need rounding); allowed: +-2**k, which moves the scales only. "
            "Dequantize first to multiply by anything else"
        )
    out = ldexp(t, k)
    return negative(out) if v < 0 else out


# --------------------------------------------------------------------------
# dtype.
# --------------------------------------------------------------------------


def astype(t: MXTensor, dtype) -> MXTensor:
    """The same codes and scales, dequantizing to ``dtype`` (``t.dtype``).

    ``t.dtype`` is the float dtype the tensor stands for: what
    :meth:`MXTensor.dequantize` returns and what jaxmx's matmuls take the
    operand as. Changing it touches no code; the rounding to bfloat16 or
    float16, if any, happens when the tensor is dequantized.

    Converting to another MX format is not an ``astype``: it chooses new
    scales and rounds, so it is refused here; write
    ``jaxmx.quantize(t.dequantize(jnp.float32), fmt, ...)`` to requantize,
    with the scale rule and rounding in view.

    Args:
      t: the tensor.
      dtype: float32, bfloat16 or float16.

    >>> import jax.numpy as jnp, jaxmx
    >>> t = jaxmx.quantize(jnp.array([1.0, 2.5]), "mxfp8").astype(jnp.bfloat16)
    >>> t.dtype, t.dequantize()
    (dtype(bfloat16), Array([1, 2.5], dtype=bfloat16))
    """
    t = _tensor(t, "astype")
    if (isinstance(dtype, str) and _is_format_name(dtype)) or not _is_dtype_like(dtype):
        raise TypeError(
            f"MXTensor.astype({dtype!r}): converting to another MX format chooses new scales "
            "and rounds, so astype does not do it; requantize explicitly with "
            "jaxmx.quantize(t.dequantize(jnp.float32), fmt, ...). astype allows float32, "
            "bfloat16 or float16 (the dtype dequantize returns)"
        )
    dt = np.dtype(dtype)
    if not any(dt == d for d in _OUT_DTYPES):
        raise TypeError(
            f"MXTensor.astype({dt}): an MXTensor dequantizes to float32, bfloat16 or "
            "float16 only; dequantize first for other dtypes"
        )
    return _replace(t, dtype=dt)


def _is_format_name(s: str) -> bool:
    from jaxmx.formats import list_formats

    return s.lower() in list_formats(aliases=True)


def _is_dtype_like(d) -> bool:
    from jaxmx.formats import MXFormat

    if isinstance(d, MXFormat) or d is None:
        return False
    try:
        np.dtype(d)
    except TypeError:
        return False
    return True


register_ops(
    transpose=transpose,
    swapaxes=swapaxes,
    reshape=reshape,
    take=take,
    getitem=getitem,
    negative=negative,
    absolute=absolute,
    multiply=multiply,
    ldexp=ldexp,
    astype=astype,
)
