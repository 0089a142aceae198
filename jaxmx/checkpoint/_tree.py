"""Tree <-> manifest, and the targets a tree is restored into."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_dtypes
import numpy as np

from jaxmx import codes
from jaxmx.checkpoint import _manifest as M
from jaxmx.checkpoint import _sparse
from jaxmx.formats import MXFormat
from jaxmx.shards import check_blocks_whole
from jaxmx.sparse_tensor import NMSparseTensor
from jaxmx.tensor import MXTensor, check_leaves


def where(names: tuple) -> str:
    return "tree" + "".join(f"[{k!r}]" for k in names)


def is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))


# --------------------------------------------------------------------------
# Tree -> manifest.
# --------------------------------------------------------------------------


def encode(node, keys: tuple, formats: dict, leaves: dict) -> dict:
    """One node of the tree -> its manifest entry; array leaves go to ``leaves``."""
    if isinstance(node, MXTensor):
        return _encode_mx(node, keys, formats, leaves)
    if isinstance(node, NMSparseTensor):
        _sparse.check_types(node, where(keys))
        values = _encode_mx(node.values, (*keys, "values"), formats, leaves)
        _sparse.check(node, where(keys))  # what load would refuse is not written
        indices = _encode_array(node.indices, (*keys, "indices"), leaves)
        return _sparse.node(node, values, indices)
    if is_array(node):
        return {"type": "array", **_encode_array(node, keys, leaves)}
    if node is None:
        return {"type": "none"}
    kind = container_kind(node)
    if kind in ("dict", "frozendict"):
        out_keys, children = [], []
        for k, v in node.items():
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                raise TypeError(
                    f"{where(keys)} has the key {k!r} of type {type(k).__name__}; "
                    "save takes dict keys that are str or int"
                )
            out_keys.append(k)
            children.append(encode(v, (*keys, k), formats, leaves))
        return {"type": kind, "keys": out_keys, "children": children}
    if kind in ("list", "tuple"):
        children = [encode(v, (*keys, i), formats, leaves) for i, v in enumerate(node)]
        return {"type": kind, "children": children}
    raise TypeError(
        f"{where(keys)} is a {type(node).__module__}.{type(node).__qualname__}; save takes "
        "nested dict, list, tuple and None holding MXTensors, NMSparseTensors and arrays "
        "(jax.Array, np.ndarray); convert other nodes first (e.g. "
        "flax.serialization.to_state_dict, np.asarray for scalars)"
    )


def container_kind(node) -> str | None:
    if type(node) is dict:
        return "dict"
    if type(node) is list:
        return "list"
    if type(node) is tuple:
        return "tuple"
    frozen = frozendict_type()
    if frozen is not None and type(node) is frozen:
        return "frozendict"
    return None


def frozendict_type():
    try:
        from flax.core import FrozenDict
    except ImportError:  # flax is a dependency, but the checkpoint code need not be
        return None
    return FrozenDict


def _name(keys: tuple, taken: dict) -> str:
    name = M.leaf_name(keys)
    if name in taken:
        raise ValueError(
            f"two leaves get the stored name {name!r} (keys that differ only in type, "
            f"e.g. 1 and '1'); the second is {where(keys)}"
        )
    return name


def _encode_array(a, keys: tuple, leaves: dict) -> dict:
    name = _name(keys, leaves)
    leaves[name] = a
    return {"name": name, "dtype": M.dtype_name(a.dtype), "shape": list(a.shape)}


def _encode_mx(t: MXTensor, keys: tuple, formats: dict, leaves: dict) -> dict:
    for f in ("data", "scale", "tensor_scale", "micro"):
        value = getattr(t, f)
        if value is not None and not is_array(value):
            raise TypeError(
                f"{where(keys)} is an MXTensor whose {f} is a {type(value).__name__}; save "
                "takes MXTensors holding arrays"
            )
    try:
        check_leaves(t)  # what load would refuse is not written
    except ValueError as e:
        raise ValueError(f"{where(keys)}: {e}") from None
    shape = list(t.shape)
    static, arrays = {}, {}
    for f in dataclasses.fields(t):
        value = getattr(t, f.name)
        if f.metadata.get("static"):
            static[f.name] = _encode_static(f.name, value, formats, keys)
        elif value is None:
            arrays[f.name] = None
        else:
            arrays[f.name] = _encode_array(value, (*keys, f.name), leaves)
    return {"type": "mx", "shape": shape, "static": static, "leaves": arrays}


def _encode_static(field: str, value, formats: dict, keys: tuple):
    if isinstance(value, MXFormat):
        card = M.card(value)
        if formats.setdefault(value.name, card) != card:
            raise ValueError(
                f"{where(keys)} uses a format named {value.name!r} that differs from another "
                "format of the same name in the tree; give the custom format its own name"
            )
        return {"format": value.name}
    if field == "dtype" or isinstance(value, np.dtype):
        return {"dtype": M.dtype_name(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.bool_, np.integer)):
        return value.item()
    if isinstance(value, tuple) and all(isinstance(v, int) for v in value):
        return {"tuple": list(value)}  # 2-D tile block sizes
    raise TypeError(
        f"{where(keys)}: MXTensor field {field} holds a {type(value).__name__}, which save "
        "does not know how to store"
    )


# --------------------------------------------------------------------------
# Manifest -> tree.
# --------------------------------------------------------------------------


def decode(node: dict, arrays: dict, fmts: dict, keys: tuple = ()) -> Any:
    """The tree a (schema-checked) manifest node describes, from restored arrays.

    Every MXTensor is checked against its format (:func:`jaxmx.tensor.check_leaves`).
    """
    kind = node["type"]
    if kind == "array":
        return arrays[node["name"]]
    if kind == "none":
        return None
    if kind == "mx":
        leaves = {k: (None if e is None else arrays[e["name"]]) for k, e in node["leaves"].items()}
        static = {k: decode_static(v, fmts) for k, v in node["static"].items()}
        try:
            t = MXTensor(**leaves, **static)
            check_leaves(t)
        except ValueError as e:
            raise ValueError(f"the MXTensor at {where(keys)} does not fit its format: {e}") from e
        t = _fit_storage(t)
        if list(t.shape) != node["shape"]:
            raise ValueError(
                f"the MXTensor at {where(keys)} has shape {t.shape}; the manifest says "
                f"{tuple(node['shape'])}"
            )
        return t
    if kind == _sparse.TYPE:
        values = decode(node["values"], arrays, fmts, (*keys, "values"))
        return _sparse.rebuild(node, values, arrays[node["indices"]["name"]], where(keys))
    if kind in ("dict", "frozendict"):
        children = [
            decode(c, arrays, fmts, (*keys, k))
            for k, c in zip(node["keys"], node["children"], strict=True)
        ]
        out = dict(zip(node["keys"], children, strict=True))
        return out if kind == "dict" else frozendict_type()(out)
    children = [decode(c, arrays, fmts, (*keys, i)) for i, c in enumerate(node["children"])]
    return children if kind == "list" else tuple(children)


def decode_static(value, fmts: dict):
    if isinstance(value, dict) and set(value) == {"format"}:
        return fmts[value["format"]]
    if isinstance(value, dict) and set(value) == {"dtype"}:
        return M.dtype(value["dtype"])
    if isinstance(value, dict) and set(value) == {"tuple"}:
        return tuple(value["tuple"])
    return value


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


def target_specs(tree: dict, target, fmts: dict) -> dict:
    """Stored name -> (sharding or None, dtype to restore as)."""
    specs = {name: (None, M.dtype(e["dtype"])) for name, e in M.arrays_of(tree)}
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
                f"target {where(keys)}: checkpoint holds an MXTensor, target a {type(t).__name__}"
            )
        for k, v in node["static"].items():
            want = decode_static(v, fmts)
            got = getattr(t, k, None)
            if k == "dtype":
                got = np.dtype(got)
            if got != want:
                raise ValueError(
                    f"target {where(keys)}: MXTensor {k} is {got!r}, the checkpoint's {want!r}"
                )
        for k in ("data", "scale", "tensor_scale", "micro"):
            entry, leaf = node["leaves"].get(k), getattr(t, k, None)
            if entry is None or leaf is None:
                if entry is not None or leaf is not None:
                    raise ValueError(
                        f"target {where(keys)}: MXTensor {k} is {leaf!r} / stored {entry!r}"
                    )
                continue
            _match_leaf(entry, leaf, (*keys, k), specs, mx=t)
        check_blocks_whole(t, f"target {where(keys)}")  # no block cut in two by its sharding
        return
    if kind == _sparse.TYPE:
        _sparse.match(node, t, f"target {where(keys)}")
        _match(node["values"], t.values, (*keys, "values"), specs, fmts)
        _match_leaf(node["indices"], t.indices, (*keys, "indices"), specs)
        return
    if kind == "array":
        _match_leaf(node, t, keys, specs)
        return
    if kind == "none":
        if t is not None:
            raise ValueError(f"target {where(keys)} is {type(t).__name__}, checkpoint None")
        return
    got = container_kind(t)
    if got != kind:
        raise ValueError(
            f"target {where(keys)} is a {type(t).__name__}, the checkpoint holds a {kind}"
        )
    if kind in ("dict", "frozendict"):
        if set(t.keys()) != set(node["keys"]):
            raise ValueError(
                f"target {where(keys)} has keys {sorted(map(str, t.keys()))}, the checkpoint "
                f"{sorted(map(str, node['keys']))}"
            )
        for k, child in zip(node["keys"], node["children"], strict=True):
            _match(child, t[k], (*keys, k), specs, fmts)
    else:
        if len(t) != len(node["children"]):
            raise ValueError(
                f"target {where(keys)} has {len(t)} entries, the checkpoint {len(node['children'])}"
            )
        for i, child in enumerate(node["children"]):
            _match(child, t[i], (*keys, i), specs, fmts)


def _match_leaf(entry: dict, leaf, keys: tuple, specs: dict, mx=None) -> None:
    if not isinstance(leaf, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
        raise ValueError(
            f"target {where(keys)} is a {type(leaf).__name__}; target leaves are arrays or "
            "jax.ShapeDtypeStruct (MXTensors of them)"
        )
    stored = M.dtype(entry["dtype"])
    dtype = np.dtype(leaf.dtype)
    portable_fp4 = (
        mx is not None
        and keys[-1] == "data"
        and not mx.packed
        and {dtype, stored} == {np.dtype(np.uint8), np.dtype(ml_dtypes.float4_e2m1fn)}
    )
    if tuple(leaf.shape) != tuple(entry["shape"]) or (dtype != stored and not portable_fp4):
        raise ValueError(
            f"target {where(keys)} is {dtype}{list(leaf.shape)}, the checkpoint holds "
            f"{stored}{entry['shape']}"
        )
    specs[entry["name"]] = (getattr(leaf, "sharding", None), stored)


def sharding(s):
    return s if s is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])
