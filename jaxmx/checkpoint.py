"""Save and load trees of MXTensors and arrays: orbax directories, safetensors files.

A checkpoint holds every array leaf of a tree (the ``data`` and ``scale`` of
each MXTensor are two of them) and one JSON *manifest* that says how to put
the tree back together:

* the containers (dicts, lists, tuples, ``None``), so :func:`load` without a
  target rebuilds the tree and returns MXTensors, not ``{data, scale}`` dicts;
* for each MXTensor its static metadata (format, axis, block size, length,
  dtype, packing) and its shape, and its array leaves **by field name**
  (``{"data": ..., "scale": ...}``), so a further leaf such as a per-tensor
  scale is one more named entry, not a new position;
* for each format used, its full card (element and scale format records),
  so a custom format that is not registered in the loading process is
  rebuilt, and one whose name is registered with different fields is refused;
* for each array its dtype, kept exactly (E8M0 scales stay ``float8_e8m0fnu``).

Two backends:

* ``"orbax"`` (the default): a directory written by orbax's
  ``CompositeCheckpointHandler``, item ``arrays`` (the leaves as a nested
  dict, sharded arrays written shard by shard) and item ``jaxmx`` (the
  manifest). :func:`load` restores with the shardings of a target.
* ``"safetensors"``: one file (chosen when the path ends in ``.safetensors``).
  Tensors are named by their tree path joined with dots
  (``params.Dense_0.kernel.data``); dtypes safetensors readers have long known
  (float32/16, bfloat16, FP8 E4M3/E5M2, integers) are written as such;
  others, E8M0 scales and unpacked FP4 codes among them, are written as their
  raw bits in an unsigned integer of the same width (``U8``), the true dtype
  recorded in the manifest. The manifest is the JSON string
  ``__metadata__["jaxmx"]`` of the header.

Layout of the manifest (version 1)::

    {"jaxmx_checkpoint": 1,
     "formats": {"mxfp4_e2m1": {"class": "MXFormat", "fields": {...}}},
     "tree": {"type": "dict", "keys": ["params"], "children": [
         {"type": "mx", "shape": [4096, 4096],
          "static": {"format": {"format": "mxfp4_e2m1"}, "axis": -2, "block_size": 32,
                     "length": 4096, "dtype": {"dtype": "float32"}, "packed": true},
          "leaves": {"data": {"name": "params.w.data", "dtype": "uint8",
                              "shape": [2048, 4096]},
                     "scale": {"name": "params.w.scale", "dtype": "float8_e8m0fnu",
                               "shape": [128, 4096]}}}]}}

Array nodes are ``{"type": "array", "name", "dtype", "shape"}``; safetensors
adds ``"stored_dtype"`` where the bits are held in another dtype.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import struct
from typing import Any, Literal

import jax
import ml_dtypes
import numpy as np

from jaxmx import codes
from jaxmx import formats as _formats
from jaxmx.formats import ElementFormat, MicroExponent, MXFormat, ScaleFormat
from jaxmx.tensor import MXTensor

__all__ = ["SaveInfo", "save", "load"]

_VERSION = 1
_KEY = "jaxmx"  # orbax item name and safetensors metadata key of the manifest
_BACKENDS = ("orbax", "safetensors")
# Records a format card may contain (never an arbitrary import from a file).
_CARD_CLASSES = {c.__name__: c for c in (MXFormat, ElementFormat, ScaleFormat, MicroExponent)}
# dtypes written to safetensors as themselves. float8_e8m0fnu (F8_E8M0) is
# left out on purpose: only recent safetensors and torch (>= 2.7) read it, and
# its bits as U8 open everywhere.
_SAFETENSORS_CODES = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "uint16": "U16",
    "int16": "I16",
    "uint32": "U32",
    "int32": "I32",
    "uint64": "U64",
    "int64": "I64",
    "float16": "F16",
    "bfloat16": "BF16",
    "float32": "F32",
    "float64": "F64",
    "complex64": "C64",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}
_SAFETENSORS_DTYPES = {v: k for k, v in _SAFETENSORS_CODES.items()} | {"F8_E8M0": "float8_e8m0fnu"}


@dataclasses.dataclass(frozen=True)
class SaveInfo:
    """What :func:`save` wrote.

    ``disk_bytes`` is what the checkpoint takes on disk (every file, headers
    and metadata included); ``array_bytes`` is what its arrays hold in memory
    (an MXTensor counts its codes and scales, as :attr:`MXTensor.nbytes`).
    """

    # The file or directory written.
    path: str
    # "orbax" or "safetensors".
    backend: str
    # Bytes of every file written.
    disk_bytes: int
    # Bytes of the array leaves (codes, scales, plain arrays).
    array_bytes: int
    # Plain array leaves (not counting the leaves of MXTensors).
    num_arrays: int
    # MXTensor leaves.
    num_mx_tensors: int


# --------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------


def save(
    path: str | os.PathLike,
    tree: Any,
    *,
    backend: Literal["orbax", "safetensors"] | None = None,
    overwrite: bool = False,
) -> SaveInfo:
    """Saves a tree of MXTensors and arrays, bit for bit, with all metadata.

    Args:
      path: a directory (orbax) or a file ending in ``.safetensors``.
      tree: nested dicts (string or int keys), lists, tuples and ``None``,
        holding :class:`~jaxmx.MXTensor` and array (``jax.Array``,
        ``np.ndarray``) leaves: a Flax linen params tree, a dict of
        quantized weights, ...
      backend: ``"orbax"`` or ``"safetensors"``; ``None`` picks safetensors
        for a path ending in ``.safetensors`` and orbax otherwise.
      overwrite: replace an existing checkpoint at ``path``; without it an
        existing path is an error.

    Returns:
      A :class:`SaveInfo`: the path, the backend, ``disk_bytes`` (bytes on
      disk) and ``array_bytes`` (bytes the arrays hold in memory).

    Raises:
      TypeError: a container or leaf of a type that cannot be saved.
      ValueError: an unknown backend, or two leaves whose names collide.
      FileExistsError: ``path`` exists and ``overwrite`` is False.
      ImportError: the backend's package is not installed.

    Example:

    >>> import tempfile, jax.numpy as jnp, jaxmx
    >>> w = jaxmx.quantize(jnp.ones((64, 32)), "mxfp4", axis=0, packed=True)
    >>> path = tempfile.mkdtemp() + "/w.safetensors"
    >>> info = jaxmx.save(path, {"w": w, "b": jnp.zeros(32)})
    >>> info.backend, info.array_bytes
    ('safetensors', 1216)
    >>> jaxmx.load(path)["w"]
    MXTensor(mxfp4_e2m1, shape=(64, 32), dtype=float32, axis=-2, block_size=32, packed, nbytes=1088)
    """
    path = _path(path)
    backend = _backend(path, backend)
    if not isinstance(overwrite, (bool, np.bool_)):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    formats: dict[str, dict] = {}
    leaves: dict[str, Any] = {}
    structure = _encode(tree, (), formats, leaves)
    if not leaves:
        raise ValueError("the tree holds no arrays or MXTensors; there is nothing to save")
    manifest = {"jaxmx_checkpoint": _VERSION, "formats": formats, "tree": structure}
    if backend == "orbax":
        _save_orbax(path, manifest, leaves, overwrite)
    else:
        _save_safetensors(path, manifest, leaves, overwrite)
    nodes = list(_nodes(structure))
    return SaveInfo(
        path=path,
        backend=backend,
        disk_bytes=_disk_bytes(path),
        array_bytes=sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in leaves.values()),
        num_arrays=sum(n["type"] == "array" for n in nodes),
        num_mx_tensors=sum(n["type"] == "mx" for n in nodes),
    )


def load(
    path: str | os.PathLike,
    *,
    target: Any = None,
    backend: Literal["orbax", "safetensors"] | None = None,
) -> Any:
    """Loads a tree written by :func:`save`.

    Without a target the tree is rebuilt from the checkpoint: the same
    containers, MXTensors with their format, axis, block size, length, dtype
    and packing, and arrays as ``jax.Array`` on the default device. A custom
    format that is not registered here is rebuilt from its stored card (and
    is not registered); one whose name is registered with other fields is an
    error, never silently replaced.

    Args:
      path: the directory or ``.safetensors`` file :func:`save` wrote.
      target: optional tree of the same structure whose leaves are arrays or
        ``jax.ShapeDtypeStruct`` (MXTensors of them, e.g. from
        ``jax.eval_shape``); each leaf is restored with the target leaf's
        sharding. Every shape, dtype and MXTensor metadata must match the
        checkpoint; a mismatch is an error, not a conversion.
      backend: ``"orbax"`` or ``"safetensors"``; ``None``: safetensors for a
        file, orbax for a directory.

    Returns:
      The tree, with ``jax.Array`` leaves.

    Raises:
      FileNotFoundError: nothing at ``path``.
      ValueError: ``path`` is not a jaxmx checkpoint; a stored format
        conflicts with a registered one; ``target`` does not match.

    Example:

    >>> import tempfile, jax.numpy as jnp, jaxmx
    >>> w = jaxmx.quantize(jnp.linspace(-1, 1, 96).reshape(3, 32), "mxfp8")
    >>> path = tempfile.mkdtemp() + "/ckpt"
    >>> _ = jaxmx.save(path, {"w": w})
    >>> bool((jaxmx.dequantize(jaxmx.load(path)["w"]) == jaxmx.dequantize(w)).all())
    True
    """
    path = _path(path)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if backend is None:
        backend = "orbax" if os.path.isdir(path) else "safetensors"
    elif backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: orbax, safetensors")
    if backend == "orbax":
        if not os.path.isdir(path):
            raise ValueError(f"{path} is a file, not an orbax checkpoint directory")
        manifest = _read_orbax_manifest(path)
    else:
        if not os.path.isfile(path):
            raise ValueError(f"{path} is not a file, so not a safetensors checkpoint")
        manifest, header, offset = _read_safetensors_header(path)
    _check_manifest(manifest, path)
    fmts = {name: _rebuild_format(name, card) for name, card in manifest["formats"].items()}
    specs = _target_specs(manifest["tree"], target, fmts)
    if backend == "orbax":
        arrays = _restore_orbax(path, manifest["tree"], specs)
    else:
        arrays = _restore_safetensors(path, header, offset, manifest["tree"], specs)
    return _decode(manifest["tree"], arrays, fmts)


# --------------------------------------------------------------------------
# Tree <-> manifest.
# --------------------------------------------------------------------------


def _escape(key) -> str:
    # Orbax joins nested keys with "." (and silently merges "a.b" with a/b),
    # so no stored name component may hold one.
    return str(key).replace("~", "~0").replace("/", "~1").replace(".", "~2")


def _where(names: tuple) -> str:
    return "tree" + "".join(f"[{k!r}]" for k in names)


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))


def _encode(node, keys: tuple, formats: dict, leaves: dict) -> dict:
    """One node of the tree -> its manifest entry; array leaves go to ``leaves``."""
    if isinstance(node, MXTensor):
        return _encode_mx(node, keys, formats, leaves)
    if _is_array(node):
        name = _name(keys, leaves)
        leaves[name] = node
        return {
            "type": "array",
            "name": name,
            "dtype": _dtype_name(node.dtype),
            "shape": list(node.shape),
        }
    if node is None:
        return {"type": "none"}
    kind = _container_kind(node)
    if kind in ("dict", "frozendict"):
        out_keys, children = [], []
        for k, v in node.items():
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                raise TypeError(
                    f"{_where(keys)} has the key {k!r} of type {type(k).__name__}; "
                    "save takes dict keys that are str or int"
                )
            out_keys.append(k)
            children.append(_encode(v, (*keys, k), formats, leaves))
        return {"type": kind, "keys": out_keys, "children": children}
    if kind in ("list", "tuple"):
        children = [_encode(v, (*keys, i), formats, leaves) for i, v in enumerate(node)]
        return {"type": kind, "children": children}
    raise TypeError(
        f"{_where(keys)} is a {type(node).__module__}.{type(node).__qualname__}; save takes "
        "nested dict, list, tuple and None holding MXTensors and arrays (jax.Array, "
        "np.ndarray); convert other nodes first (e.g. flax.serialization.to_state_dict, "
        "np.asarray for scalars)"
    )


def _container_kind(node) -> str | None:
    if type(node) is dict:
        return "dict"
    if type(node) is list:
        return "list"
    if type(node) is tuple:
        return "tuple"
    frozen = _frozendict_type()
    if frozen is not None and type(node) is frozen:
        return "frozendict"
    return None


def _frozendict_type():
    try:
        from flax.core import FrozenDict
    except ImportError:  # flax is a dependency, but the checkpoint code need not be
        return None
    return FrozenDict


def _name(keys: tuple, taken: dict) -> str:
    name = ".".join(_escape(k) for k in keys) if keys else "_"
    if name in taken:
        raise ValueError(
            f"two leaves get the stored name {name!r} (keys that differ only in type, "
            f"e.g. 1 and '1'); the second is {_where(keys)}"
        )
    return name


def _encode_mx(t: MXTensor, keys: tuple, formats: dict, leaves: dict) -> dict:
    shape = list(t.shape)  # also checks that the leaves fit the metadata
    static, arrays = {}, {}
    for f in dataclasses.fields(t):
        value = getattr(t, f.name)
        if f.metadata.get("static"):
            static[f.name] = _encode_static(f.name, value, formats, keys)
        elif value is None:
            arrays[f.name] = None
        else:
            if not _is_array(value):
                raise TypeError(
                    f"{_where(keys)} is an MXTensor whose {f.name} is a "
                    f"{type(value).__name__}; save takes MXTensors holding arrays"
                )
            name = _name((*keys, f.name), leaves)
            leaves[name] = value
            arrays[f.name] = {
                "name": name,
                "dtype": _dtype_name(value.dtype),
                "shape": list(value.shape),
            }
    return {"type": "mx", "shape": shape, "static": static, "leaves": arrays}


def _encode_static(field: str, value, formats: dict, keys: tuple):
    if isinstance(value, MXFormat):
        card = _card(value)
        if formats.setdefault(value.name, card) != card:
            raise ValueError(
                f"{_where(keys)} uses a format named {value.name!r} that differs from another "
                "format of the same name in the tree; give the custom format its own name"
            )
        return {"format": value.name}
    if field == "dtype" or isinstance(value, np.dtype):
        return {"dtype": _dtype_name(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.bool_, np.integer)):
        return value.item()
    if isinstance(value, tuple) and all(isinstance(v, int) for v in value):
        return {"tuple": list(value)}  # 2-D tile block sizes
    raise TypeError(
        f"{_where(keys)}: MXTensor field {field} holds a {type(value).__name__}, which save "
        "does not know how to store"
    )


def _decode_static(value, fmts: dict):
    if isinstance(value, dict) and set(value) == {"format"}:
        return fmts[value["format"]]
    if isinstance(value, dict) and set(value) == {"dtype"}:
        return _dtype(value["dtype"])
    if isinstance(value, dict) and set(value) == {"tuple"}:
        return tuple(value["tuple"])
    return value


def _card(obj) -> dict:
    """A format record as JSON: every field, nested records included."""
    fields = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            v = _card(v)
        elif isinstance(v, np.dtype):
            v = {"dtype": _dtype_name(v)}
        fields[f.name] = v
    return {"class": type(obj).__name__, "fields": fields}


def _from_card(card: dict):
    cls = _CARD_CLASSES.get(card.get("class"))
    if cls is None:
        raise ValueError(
            f"format card of class {card.get('class')!r}; known: {', '.join(_CARD_CLASSES)}"
        )
    fields = {}
    for k, v in card["fields"].items():
        if isinstance(v, dict) and "class" in v:
            v = _from_card(v)
        elif isinstance(v, dict) and set(v) == {"dtype"}:
            v = _dtype(v["dtype"])
        fields[k] = v
    return cls(**fields)


def _rebuild_format(name: str, card: dict) -> MXFormat:
    try:
        fmt = _from_card(card)
    except (TypeError, ValueError) as e:
        raise ValueError(f"the checkpoint's format {name!r} cannot be rebuilt: {e}") from e
    if name in _formats.list_formats(aliases=True):
        registered = _formats.get_format(name)
        if registered != fmt:
            diff = _first_difference(_card(registered), card)
            raise ValueError(
                f"the checkpoint's format {name!r} differs from the format registered under "
                f"that name ({diff}); load it in a process where {name!r} is not registered, "
                "or register the checkpoint's format under another name and save again"
            )
        return registered
    return fmt


def _first_difference(a: dict, b: dict) -> str:
    fa, fb = dict(_flat_card(a)), dict(_flat_card(b))
    for k in sorted(set(fa) | set(fb)):
        if fa.get(k) != fb.get(k):
            return f"{k}: registered {fa.get(k)!r}, checkpoint {fb.get(k)!r}"
    return "same fields, different records"


def _flat_card(card: dict, prefix: str = ""):
    for k, v in card["fields"].items():
        if isinstance(v, dict) and "class" in v:
            yield from _flat_card(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _nodes(node):
    yield node
    for child in node.get("children", ()):
        yield from _nodes(child)


def _arrays_of(node):
    """(name, entry) of every stored array under ``node``, in tree order."""
    for n in _nodes(node):
        if n["type"] == "array":
            yield n["name"], n
        elif n["type"] == "mx":
            for entry in n["leaves"].values():
                if entry is not None:
                    yield entry["name"], entry


def _decode(node, arrays: dict, fmts: dict):
    kind = node["type"]
    if kind == "array":
        return arrays[node["name"]]
    if kind == "none":
        return None
    if kind == "mx":
        leaves = {k: (None if e is None else arrays[e["name"]]) for k, e in node["leaves"].items()}
        static = {k: _decode_static(v, fmts) for k, v in node["static"].items()}
        known = {f.name for f in dataclasses.fields(MXTensor)}
        unknown = sorted((set(leaves) | set(static)) - known)
        if unknown:
            raise ValueError(
                f"the checkpoint's MXTensor has fields {unknown} that this jaxmx's MXTensor "
                "does not have; load it with the jaxmx version that wrote it"
            )
        t = _fit_storage(MXTensor(**leaves, **static))
        if list(t.shape) != node["shape"]:
            raise ValueError(f"restored MXTensor has shape {t.shape}, stored {node['shape']}")
        return t
    children = [_decode(c, arrays, fmts) for c in node["children"]]
    if kind == "dict":
        return dict(zip(node["keys"], children, strict=True))
    if kind == "frozendict":
        return _frozendict_type()(dict(zip(node["keys"], children, strict=True)))
    if kind == "list":
        return children
    if kind == "tuple":
        return tuple(children)
    raise ValueError(f"unknown node type {kind!r} in the checkpoint")


def _fit_storage(t: MXTensor) -> MXTensor:
    """Unpacked FP4 codes in the dtype this backend holds them in.

    The same 4-bit code is a ``float4_e2m1fn`` on GPU and a uint8 on CPU
    (:func:`jaxmx.codes.storage_dtype`); a checkpoint written on one loads on
    the other with the codes unchanged.
    """
    elem = t.format.element
    want = codes.storage_dtype(elem)
    if t.packed or t.data.dtype == want or elem.bits != 4 or elem.kind != "float":
        return t
    if {np.dtype(t.data.dtype), want} != {np.dtype(np.uint8), np.dtype(ml_dtypes.float4_e2m1fn)}:
        return t
    return dataclasses.replace(
        t, data=codes.raw_to_storage(codes.storage_to_raw(t.data, elem), elem)
    )


# --------------------------------------------------------------------------
# Targets: shapes, dtypes and shardings to restore into.
# --------------------------------------------------------------------------


def _target_specs(tree: dict, target, fmts: dict) -> dict:
    """Stored name -> (sharding or None, dtype to restore as)."""
    specs = {name: (None, _dtype(e["dtype"])) for name, e in _arrays_of(tree)}
    for name, (_, dtype) in specs.items():
        if jax.dtypes.canonicalize_dtype(dtype) != dtype:
            raise ValueError(
                f"{name!r} is stored as {dtype}, which JAX holds only with "
                "jax.config.update('jax_enable_x64', True)"
            )
    if target is not None:
        _match(tree, target, (), specs, fmts)
    return specs


def _match(node: dict, t, keys: tuple, specs: dict, fmts: dict) -> None:
    kind = node["type"]
    if kind == "mx":
        if not isinstance(t, MXTensor):
            raise ValueError(
                f"target {_where(keys)}: checkpoint holds an MXTensor, target a {type(t).__name__}"
            )
        for k, v in node["static"].items():
            want = _decode_static(v, fmts)
            got = getattr(t, k, None)
            if k == "dtype":
                got = np.dtype(got)
            if got != want:
                raise ValueError(
                    f"target {_where(keys)}: MXTensor {k} is {got!r}, the checkpoint's {want!r}"
                )
        for k, entry in node["leaves"].items():
            leaf = getattr(t, k, None)
            if entry is None or leaf is None:
                if entry is not leaf:
                    raise ValueError(
                        f"target {_where(keys)}: MXTensor {k} is {leaf!r} / stored {entry!r}"
                    )
                continue
            _match_leaf(entry, leaf, (*keys, k), specs, fmts, mx=t)
        return
    if kind == "array":
        _match_leaf(node, t, keys, specs, fmts)
        return
    if kind == "none":
        if t is not None:
            raise ValueError(f"target {_where(keys)} is {type(t).__name__}, checkpoint None")
        return
    got = _container_kind(t)
    if got != kind:
        raise ValueError(
            f"target {_where(keys)} is a {type(t).__name__}, the checkpoint holds a {kind}"
        )
    if kind in ("dict", "frozendict"):
        if set(t.keys()) != set(node["keys"]):
            raise ValueError(
                f"target {_where(keys)} has keys {sorted(map(str, t.keys()))}, the checkpoint "
                f"{sorted(map(str, node['keys']))}"
            )
        for k, child in zip(node["keys"], node["children"], strict=True):
            _match(child, t[k], (*keys, k), specs, fmts)
    else:
        if len(t) != len(node["children"]):
            raise ValueError(
                f"target {_where(keys)} has {len(t)} entries, the checkpoint "
                f"{len(node['children'])}"
            )
        for i, child in enumerate(node["children"]):
            _match(child, t[i], (*keys, i), specs, fmts)


def _match_leaf(entry: dict, leaf, keys: tuple, specs: dict, fmts: dict, mx=None) -> None:
    if not isinstance(leaf, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
        raise ValueError(
            f"target {_where(keys)} is a {type(leaf).__name__}; target leaves are arrays or "
            "jax.ShapeDtypeStruct (MXTensors of them)"
        )
    stored = _dtype(entry["dtype"])
    dtype = np.dtype(leaf.dtype)
    portable_fp4 = (
        mx is not None
        and keys[-1] == "data"
        and not mx.packed
        and {dtype, stored} == {np.dtype(np.uint8), np.dtype(ml_dtypes.float4_e2m1fn)}
    )
    if tuple(leaf.shape) != tuple(entry["shape"]) or (dtype != stored and not portable_fp4):
        raise ValueError(
            f"target {_where(keys)} is {dtype}{list(leaf.shape)}, the checkpoint holds "
            f"{stored}{entry['shape']}"
        )
    specs[entry["name"]] = (getattr(leaf, "sharding", None), stored)


def _sharding(sharding):
    return sharding if sharding is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])


# --------------------------------------------------------------------------
# orbax.
# --------------------------------------------------------------------------


def _orbax():
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise ImportError(
            "jaxmx checkpoints with backend='orbax' need orbax-checkpoint: "
            "pip install orbax-checkpoint (or pip install 'jaxmx[serve]'), or save to a "
            "path ending in .safetensors"
        ) from e
    return ocp


def _nest(flat: dict) -> dict:
    """{"a.b": x} -> {"a": {"b": x}}: orbax stores nested dicts as dotted names."""
    out: dict = {}
    for name, value in flat.items():
        *parents, last = name.split(".")
        d = out
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = value
    return out


def _flatten(nested: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in nested.items():
        name = f"{prefix}.{k}" if prefix else k
        out.update(_flatten(v, name) if isinstance(v, dict) else {name: v})
    return out


def _save_orbax(path: str, manifest: dict, leaves: dict, overwrite: bool) -> None:
    ocp = _orbax()
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
        ckpt.save(
            path,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(_nest(leaves)),
                **{_KEY: ocp.args.JsonSave(manifest)},
            ),
            force=bool(overwrite),
        )


def _read_orbax_manifest(path: str) -> dict:
    if not os.path.isdir(os.path.join(path, _KEY)):
        raise ValueError(
            f"{path} is not a jaxmx checkpoint: it has no {_KEY!r} item (an orbax checkpoint "
            "written without jaxmx.save restores with orbax itself)"
        )
    ocp = _orbax()
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
        return ckpt.restore(path, args=ocp.args.Composite(**{_KEY: ocp.args.JsonRestore()}))[_KEY]


def _restore_orbax(path: str, tree: dict, specs: dict) -> dict:
    ocp = _orbax()
    want = {
        name: jax.ShapeDtypeStruct(
            tuple(e["shape"]), specs[name][1], sharding=_sharding(specs[name][0])
        )
        for name, e in _arrays_of(tree)
    }
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
        restored = ckpt.restore(
            path, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(_nest(want)))
        )
    return _flatten(restored["arrays"])


# --------------------------------------------------------------------------
# safetensors.
# --------------------------------------------------------------------------


def _save_safetensors(path: str, manifest: dict, leaves: dict, overwrite: bool) -> None:
    try:
        from safetensors.numpy import save_file
    except ImportError as e:
        raise ImportError(
            "jaxmx checkpoints with backend='safetensors' need safetensors: "
            "pip install safetensors (or pip install 'jaxmx[serve]')"
        ) from e
    tensors = {}
    for name, entry in _arrays_of(manifest["tree"]):
        a = leaves[name]
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            raise ValueError(
                f"{name!r} is sharded over several processes; write it with backend='orbax'"
            )
        a = np.asarray(a, order="C")  # (ascontiguousarray makes 0-d arrays 1-d)
        if a.dtype.name not in _SAFETENSORS_CODES:
            bits = np.dtype(f"uint{8 * a.dtype.itemsize}")
            a = a.view(bits)
            entry["stored_dtype"] = bits.name
        tensors[name] = a
    if overwrite and os.path.isdir(path):
        raise FileExistsError(f"{path} is a directory; overwrite replaces files only")
    save_file(tensors, path, metadata={_KEY: json.dumps(manifest)})


def _read_safetensors_header(path: str) -> tuple[dict, dict, int]:
    with open(path, "rb") as f:
        head = f.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < size <= os.path.getsize(path) - 8:
            raise ValueError(f"{path} is not a jaxmx checkpoint: not a safetensors file")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a jaxmx checkpoint: not a safetensors file") from e
    meta = header.pop("__metadata__", None) or {}
    if _KEY not in meta:
        raise ValueError(
            f"{path} is not a jaxmx checkpoint: its safetensors header has no "
            f"__metadata__[{_KEY!r}] (keys: {sorted(meta)})"
        )
    return json.loads(meta[_KEY]), header, 8 + size


def _restore_safetensors(path: str, header: dict, offset: int, tree: dict, specs: dict) -> dict:
    out = {}
    with open(path, "rb") as f:
        for name, entry in _arrays_of(tree):
            info = header.get(name)
            if info is None:
                raise ValueError(f"{path} lacks the tensor {name!r} its manifest lists")
            held = np.dtype(_dtype(_SAFETENSORS_DTYPES.get(info["dtype"], info["dtype"])))
            start, end = info["data_offsets"]
            count = math.prod(info["shape"])
            if count * held.itemsize != end - start:
                raise ValueError(f"{path}: tensor {name!r} has a corrupt header entry {info}")
            f.seek(offset + start)
            a = np.fromfile(
                f, dtype=held, count=count
            )  # safetensors is little-endian, as jax hosts are
            a = a.reshape(info["shape"]).view(_dtype(entry["dtype"]))
            sharding, _ = specs[name]
            out[name] = jax.device_put(a, _sharding(sharding))
    return out


# --------------------------------------------------------------------------
# Small helpers.
# --------------------------------------------------------------------------


def _path(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    return os.path.abspath(os.fspath(path))


def _backend(path: str, backend) -> str:
    if backend is None:
        return "safetensors" if path.endswith(".safetensors") else "orbax"
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: orbax, safetensors")
    return backend


def _check_manifest(manifest, path: str) -> None:
    if not isinstance(manifest, dict) or "jaxmx_checkpoint" not in manifest:
        raise ValueError(f"{path} is not a jaxmx checkpoint: its {_KEY!r} entry has no version")
    if manifest["jaxmx_checkpoint"] != _VERSION:
        raise ValueError(
            f"{path} is a jaxmx checkpoint of version {manifest['jaxmx_checkpoint']!r}; this "
            f"jaxmx reads version {_VERSION}"
        )


def _dtype_name(dtype) -> str:
    return np.dtype(dtype).name


def _dtype(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:
        pass
    t = getattr(ml_dtypes, name, None)
    if not isinstance(t, type):
        raise ValueError(f"unknown dtype {name!r} in the checkpoint")
    return np.dtype(t)


def _disk_bytes(path: str) -> int:
    p = pathlib.Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
