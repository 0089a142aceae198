"""NMSparseTensor leaves in a checkpoint: their manifest node, checked and rebuilt.

An :class:`~jaxmx.NMSparseTensor` is stored as its kept values (an ``mx`` node
of its own, leaves named ``<path>.values.data``, ``<path>.values.scale``, ...)
and its packed positions (the array ``<path>.indices``), with its static
fields::

    {"type": "nm_sparse", "shape": [128, 64], "axis": -2,
     "static": {"n": 2, "m": 4, "length": 128},
     "values": {"type": "mx", "shape": [64, 64], "static": {...}, "leaves": {...}},
     "indices": {"name": "w.indices", "dtype": "uint8", "shape": [16, 64], "crc32": 1}}

``shape`` (the dense shape) and ``axis`` (the sparse axis, negative) follow
from the rest; they are stored so that load checks the rest against them.
:func:`problem` and :func:`array_problem` check a node's fields against each
other before any array is read: ``0 < n < m``, ``length`` a multiple of
``m`` and the dense shape's length along ``axis``, the values' shape
(``length * n // m`` kept along ``axis``) and the indices' (uint8,
``ceil(log2 m)``-bit positions packed along ``axis``); :func:`rebuild` then
checks the positions themselves (:func:`check_positions`). This module knows
nothing of the rest of the manifest (:mod:`jaxmx.checkpoint._manifest` walks
the values and indices entries).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from jaxmx.blocks import packed_length
from jaxmx.sparse_tensor import NMSparseTensor, check_sparse_leaves, index_bits
from jaxmx.tensor import MXTensor

TYPE = "nm_sparse"
FIELDS = {"type", "shape", "axis", "static", "values", "indices"}
# n, m, length: every static field of NMSparseTensor, stored by name.
STATIC = tuple(f.name for f in dataclasses.fields(NMSparseTensor) if f.metadata.get("static"))


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _along(shape: list, axis: int, size: int) -> list:
    out = list(shape)
    out[axis] = size
    return out


# --------------------------------------------------------------------------
# Save.
# --------------------------------------------------------------------------


def check_types(t: NMSparseTensor, where: str) -> None:
    """``t`` holds an MXTensor of values and an array of indices (TypeError if not)."""
    if not isinstance(t.values, MXTensor):
        raise TypeError(
            f"{where} is an NMSparseTensor whose values are a {type(t.values).__name__}; "
            "save takes NMSparseTensors holding an MXTensor of the kept values"
        )
    if not isinstance(t.indices, (jax.Array, np.ndarray)):
        raise TypeError(
            f"{where} is an NMSparseTensor whose indices are a {type(t.indices).__name__}; "
            "save takes NMSparseTensors holding arrays"
        )


def check(t: NMSparseTensor, where: str) -> None:
    """What load would refuse is not written: indices that fit n, m, length and
    the values (which the caller has checked as an MXTensor), valid positions."""
    try:
        check_sparse_leaves(t)
        check_positions(t)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def node(t: NMSparseTensor, values: dict, indices: dict) -> dict:
    """The manifest node of ``t``, given those of its values and its indices."""
    return {
        "type": TYPE,
        "shape": list(t.shape),
        "axis": int(t.sparse_axis()),
        "static": {k: int(getattr(t, k)) for k in STATIC},
        "values": values,
        "indices": indices,
    }


# --------------------------------------------------------------------------
# Load.
# --------------------------------------------------------------------------


def problem(node: dict) -> tuple[str, str] | None:
    """(field under the node, what is wrong) for the first static field of an
    ``nm_sparse`` node (its keys checked) that is malformed or disagrees with the
    others, or a ``values`` that is not an mx node; None if all is well."""
    shape, axis, static = node["shape"], node["axis"], node["static"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape) or not shape:
        return "shape", f"must be a non-empty list of sizes, got {shape!r}"
    if not _is_int(axis) or not -len(shape) <= axis < 0:
        return "axis", f"must be an axis of the shape {shape}, -{len(shape)} .. -1, got {axis!r}"
    if not isinstance(static, dict) or set(static) != set(STATIC):
        got = sorted(map(str, static)) if isinstance(static, dict) else type(static).__name__
        return "static", f"must hold exactly {list(STATIC)}, got {got}"
    for k in STATIC:
        if not _is_int(static[k]) or static[k] < 0:
            return f"static.{k}", f"must be an int >= 0, got {static[k]!r}"
    n, m, length = static["n"], static["m"], static["length"]
    if not 0 < n < m:
        return "static", f"needs 0 < n < m, got n={n}, m={m}"
    if length % m or shape[axis] != length:
        return "static.length", (
            f"is {length}; the dense shape {shape} is {shape[axis]} long along axis {axis}, "
            f"and the length must be that and a multiple of m={m}"
        )
    values = node["values"]
    if not isinstance(values, dict) or values.get("type") != "mx":
        kind = values.get("type") if isinstance(values, dict) else type(values).__name__
        return "values", f"must be an mx node (the kept values), got {kind!r}"
    return None


def array_problem(node: dict) -> tuple[str, str] | None:
    """As :func:`problem`, for the shapes and dtypes of the values and indices
    (their entries checked), against n, m, length and axis (checked by it)."""
    shape, axis, static = node["shape"], node["axis"], node["static"]
    n, m, length = static["n"], static["m"], static["length"]
    kept, bits = length * n // m, index_bits(m)
    values, indices = node["values"], node["indices"]
    want = _along(shape, axis, kept)
    if values["shape"] != want:
        return "values.shape", (
            f"is {values['shape']}; {n}:{m} of {length} along axis {axis} keeps {kept}: "
            f"expected {want}"
        )
    if indices["dtype"] != "uint8":
        return "indices.dtype", f"is {indices['dtype']!r}; packed positions are uint8"
    want = _along(shape, axis, packed_length(kept, bits))
    if indices["shape"] != want:
        return "indices.shape", (
            f"is {indices['shape']}; {n}:{m} of {length} along axis {axis} keeps {kept} "
            f"positions of {bits} bits, {want[axis]} bytes packed: expected {want}"
        )
    return None


def rebuild(node: dict, values: MXTensor, indices: jax.Array, where: str) -> NMSparseTensor:
    """The NMSparseTensor of a (checked) node from its decoded values and indices."""
    what = f"the NMSparseTensor at {where}"
    try:
        t = NMSparseTensor(values, indices, **node["static"])
        check_sparse_leaves(t)
        axis = t.sparse_axis()
    except ValueError as e:
        raise ValueError(f"{what} does not fit its n, m and length: {e}") from e
    if axis != node["axis"] or list(t.shape) != node["shape"]:
        raise ValueError(
            f"{what}: its values are blocked along axis {axis} (dense shape {t.shape}); the "
            f"manifest says axis {node['axis']}, shape {tuple(node['shape'])}"
        )
    try:
        check_positions(t)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from e
    return t


def check_positions(t: NMSparseTensor) -> None:
    """Every group holds ``n`` distinct positions below ``m``, ascending (as
    :func:`jaxmx.quantize_sparse` writes them); ValueError naming the first
    group that does not. Skipped for indices spread over several processes."""
    if isinstance(t.indices, jax.Array) and not t.indices.is_fully_addressable:
        return
    pos = np.moveaxis(np.asarray(t.positions()), t.sparse_axis(), -1)
    pos = pos.reshape(*pos.shape[:-1], t.length // t.m, t.n)
    bad = (pos >= t.m).any(axis=-1) | (np.diff(pos.astype(np.int32), axis=-1) <= 0).any(axis=-1)
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"its indices hold the positions {pos[at].tolist()} in group {at[-1]} of "
            f"{t.length // t.m} (other axes at {at[:-1]}, sparse axis {t.sparse_axis()} moved "
            f"last); each group of {t.m} needs {t.n} distinct ascending positions in "
            f"0 .. {t.m - 1}"
        )


def match(node: dict, t: Any, where: str) -> None:
    """A target leaf against an ``nm_sparse`` node: an NMSparseTensor of the same
    n, m and length (its values and indices are matched by the caller)."""
    if not isinstance(t, NMSparseTensor):
        raise ValueError(
            f"{where}: checkpoint holds an NMSparseTensor, target a {type(t).__name__}"
        )
    for k, want in node["static"].items():
        if getattr(t, k) != want:
            raise ValueError(
                f"{where}: NMSparseTensor {k} is {getattr(t, k)!r}, the checkpoint's {want!r}"
            )
