"""The orbax backend: a directory with the items ``arrays`` and ``jaxmx`` (the manifest).

On load, orbax's own record of each array (shape and dtype) must agree with
the manifest before anything is restored (orbax would otherwise cast to the
manifest's dtype), no array may be missing or extra, and an error of orbax or
TensorStore while reading (a damaged or missing chunk) is reported as the
checkpoint's damage. The checksums of the manifest are verified over each
restored array's bytes, where the array is held by this process.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from jaxmx.checkpoint import _manifest as M
from jaxmx.checkpoint import _tree


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


def _handler(ocp):
    return ocp.CompositeCheckpointHandler(
        arrays=ocp.StandardCheckpointHandler(), **{M.KEY: ocp.JsonCheckpointHandler()}
    )


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


def _flatten(nested: Any, prefix: str = "") -> dict:
    if not isinstance(nested, dict):
        return {prefix: nested}
    out = {}
    for k, v in nested.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def is_checkpoint(path: str) -> bool:
    """Whether ``path`` is a directory holding a jaxmx checkpoint (for overwrite)."""
    return os.path.isdir(os.path.join(path, M.KEY))


def save(path: str, manifest: dict, leaves: dict, overwrite: bool) -> None:
    ocp = _orbax()
    for name, entry in M.arrays_of(manifest["tree"]):
        a = leaves[name]
        # Arrays spread over processes would have to be gathered: not checksummed.
        whole = not isinstance(a, jax.Array) or a.is_fully_addressable
        entry["crc32"] = M.crc32(np.asarray(a)) if whole else None
    with ocp.Checkpointer(_handler(ocp)) as ckpt:
        ckpt.save(
            path,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(_nest(leaves)),
                **{M.KEY: ocp.args.JsonSave(M.seal(manifest))},
            ),
            force=bool(overwrite),
        )


def read_manifest(path: str) -> Any:
    """The manifest as stored (unchecked)."""
    if not is_checkpoint(path):
        raise ValueError(
            f"{path} is not a jaxmx checkpoint: it has no {M.KEY!r} item (an orbax checkpoint "
            "written without jaxmx.save restores with orbax itself)"
        )
    ocp = _orbax()
    try:
        with ocp.Checkpointer(_handler(ocp)) as ckpt:
            restored = ckpt.restore(
                path, args=ocp.args.Composite(**{M.KEY: ocp.args.JsonRestore()})
            )
        return restored[M.KEY]
    except Exception as e:  # orbax and TensorStore raise many types; all mean the same here
        raise ValueError(f"{path}: its jaxmx manifest cannot be read: {_first_line(e)}") from e


def restore(path: str, tree: dict, specs: dict) -> dict:
    ocp = _orbax()
    listed = dict(M.arrays_of(tree))
    _check_stored(path, listed, ocp)
    want = {
        name: jax.ShapeDtypeStruct(
            tuple(e["shape"]), specs[name][1], sharding=_tree.sharding(specs[name][0])
        )
        for name, e in listed.items()
    }
    try:
        with ocp.Checkpointer(_handler(ocp)) as ckpt:
            restored = ckpt.restore(
                path, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(_nest(want)))
            )
        arrays = _flatten(restored["arrays"])
    except Exception as e:  # a damaged chunk: TensorStore's DATA_LOSS, orbax's bare Exception
        raise ValueError(
            f"{path} is damaged: orbax could not read its arrays: {_first_line(e)}"
        ) from e
    for name, entry in listed.items():
        a, crc = arrays.get(name), entry.get("crc32")
        if a is None:
            raise ValueError(f"{path} is damaged: orbax restored no array {name!r}")
        if crc is not None and a.is_fully_addressable and M.crc32(np.asarray(a)) != crc:
            raise ValueError(
                f"{path} is damaged: the bytes of array {name!r} do not match their checksum "
                "(CRC-32) in the manifest"
            )
    return arrays


def _check_stored(path: str, listed: dict, ocp: Any) -> None:
    """orbax's record of each array against the manifest, before restoring."""
    try:
        with ocp.Checkpointer(_handler(ocp)) as ckpt:
            meta = ckpt.metadata(path).item_metadata["arrays"]
        stored = _flatten(getattr(meta, "tree", meta))
        if meta is None or "" in stored:
            raise ValueError("orbax found no record of the arrays")
    except Exception as e:
        raise ValueError(
            f"{path} is damaged: orbax's record of its arrays cannot be read: {_first_line(e)}"
        ) from e
    extra = sorted(set(stored) - set(listed))
    if extra:
        raise ValueError(
            f"{path} holds arrays its manifest does not list: {extra[:5]}; the checkpoint "
            "was changed after save wrote it"
        )
    for name, entry in listed.items():
        if name not in stored:
            raise ValueError(f"{path} lacks the array {name!r} its manifest lists")
        shape = getattr(stored[name], "shape", None)
        dtype = getattr(stored[name], "dtype", None)
        if shape is None or dtype is None:
            raise ValueError(f"{path} is damaged: orbax has no shape or dtype for {name!r}")
        if list(shape) != entry["shape"] or np.dtype(dtype).name != entry["dtype"]:
            raise ValueError(
                f"{path}: array {name!r} is {np.dtype(dtype).name}{list(shape)} in orbax's "
                f"record but {entry['dtype']}{entry['shape']} in the jaxmx manifest"
            )


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]
