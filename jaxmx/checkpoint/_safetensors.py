"""The safetensors backend: one file, the manifest in the header's ``__metadata__``.

On load the file is checked before any tensor is read: the header is a JSON
object of well-formed entries; the tensors' byte ranges match their dtype and
shape, tile the data section without gaps or overlaps, and end where the
file ends (a truncated file is reported as such). Each tensor the manifest
lists must be in the header with the same shape and dtype (the dtype it is
stored in, for dtypes held as unsigned bits), and no other tensor may be.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxmx.checkpoint import _manifest as M
from jaxmx.checkpoint import _tree

_ENTRY = {"dtype", "shape", "data_offsets"}


def writer(who: str) -> Callable[..., Any]:
    """safetensors' ``save_file``; an ImportError saying that ``who`` need(s) it, without it."""
    try:
        from safetensors.numpy import save_file
    except ImportError as e:
        raise ImportError(
            f"{who} safetensors: pip install safetensors (or pip install 'jaxmx[serve]')"
        ) from e
    return save_file


def host(a: Any, sharded: str) -> np.ndarray:
    """``a`` as a C-ordered NumPy array to write; the ValueError ``sharded`` for an array
    spread over several processes."""
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
        raise ValueError(sharded)
    return np.asarray(a, order="C")  # (ascontiguousarray makes 0-d arrays 1-d)


def save(path: str, manifest: dict, leaves: dict) -> None:
    save_file = writer("jaxmx checkpoints with backend='safetensors' need")
    tensors = {}
    for name, entry in M.arrays_of(manifest["tree"]):
        a = host(
            leaves[name],
            f"{name!r} is sharded over several processes; write it with backend='orbax'",
        )
        if a.dtype.name not in M.SAFETENSORS_CODES:
            bits = np.dtype(f"uint{8 * a.dtype.itemsize}")
            a = a.view(bits)
            entry["stored_dtype"] = bits.name
        entry["crc32"] = M.crc32(a)
        tensors[name] = a
    save_file(tensors, path, metadata={M.KEY: json.dumps(M.seal(manifest))})


def is_checkpoint(path: str) -> bool:
    """Whether ``path`` is a file whose header carries a jaxmx manifest (for overwrite)."""
    try:
        raw, _ = raw_header(path)
    except (OSError, ValueError):
        return False
    return has_manifest(raw)


def has_manifest(raw: dict) -> bool:
    """Whether a file's parsed :func:`raw_header` carries a jaxmx manifest."""
    meta = raw.get("__metadata__")
    return isinstance(meta, dict) and M.KEY in meta


class Header:
    """A checked safetensors header: tensor entries and where the data starts."""

    def __init__(self, tensors: dict, data_start: int):
        self.tensors = tensors
        self.data_start = data_start


def raw_header(path: str) -> tuple[dict, int]:
    """(the parsed JSON header object, its size) of a safetensors file, or a
    ValueError naming the file."""
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < size <= file_size - 8:
            raise ValueError(
                f"{path} is truncated or not a safetensors file: its first 8 bytes give a "
                f"header of {size} bytes, the file holds {file_size}"
            )
        raw = f.read(size)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(
            f"{path} is not a safetensors file (its header is not JSON: {e})"
        ) from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file: its header is not a JSON object")
    return header, size


def header(path: str, raw: tuple[dict, int] | None = None) -> tuple[dict, dict, int]:
    """(tensor entries, __metadata__, start of the data) of a safetensors file, checked:
    ``__metadata__`` a JSON object (``{}`` where there is none), every entry well formed,
    the entries' bytes tiling the data exactly.

    ``raw``: the file's :func:`raw_header`, where the caller has read it (left as it is).
    """
    raw_entries, size = raw if raw is not None else raw_header(path)
    meta = raw_entries.get("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: its safetensors __metadata__ is not a JSON object")
    entries = {k: v for k, v in raw_entries.items() if k != "__metadata__"}
    data_start = 8 + size
    return _layout(path, entries, os.path.getsize(path) - data_start), meta, data_start


def read(path: str, raw: tuple[dict, int] | None = None) -> tuple[object, Header]:
    """The manifest (as parsed, unchecked) and the checked header of ``path``.

    The manifest is found, and parsed, before the tensor entries are checked.
    ``raw``: the file's :func:`raw_header`, where the caller has read it.
    """
    raw = raw if raw is not None else raw_header(path)
    meta = raw[0].get("__metadata__", None) or {}
    if not isinstance(meta, dict) or M.KEY not in meta:
        keys = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(
            f"{path} is not a jaxmx checkpoint: its safetensors header has no "
            f"__metadata__[{M.KEY!r}] (keys: {keys})"
        )
    if not isinstance(meta[M.KEY], str):
        raise ValueError(f"{path}: its jaxmx manifest is not a JSON string")
    try:
        manifest = json.loads(meta[M.KEY])
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: its jaxmx manifest is not valid JSON ({e})") from None
    tensors, _, data_start = header(path, raw)
    return manifest, Header(tensors, data_start)


def _layout(path: str, header: dict, data_bytes: int) -> dict:
    """Checks every tensor entry and that their bytes tile the data section exactly."""
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != _ENTRY:
            raise ValueError(
                f"{path} is damaged: its header entry for tensor {name!r} is not "
                f"{{dtype, shape, data_offsets}}: {info!r}"
            )
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if code not in M.SAFETENSORS_DTYPES:
            raise ValueError(f"{path} is damaged: tensor {name!r} has unknown dtype {code!r}")
        ints = [*shape, *offsets] if isinstance(shape, list) and isinstance(offsets, list) else []
        if (
            not ints
            or len(offsets) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints)
        ):
            raise ValueError(
                f"{path} is damaged: tensor {name!r} has shape {shape!r} and data_offsets "
                f"{offsets!r}; both must be lists of ints >= 0, two offsets"
            )
        start, end = offsets
        want = math.prod(shape) * np.dtype(M.SAFETENSORS_DTYPES[code]).itemsize
        if end - start != want:
            raise ValueError(
                f"{path} is damaged: tensor {name!r} ({code}{shape}) needs {want} bytes, its "
                f"data_offsets {offsets} span {end - start}"
            )
        if end > data_bytes:
            raise ValueError(
                f"{path} is truncated or damaged: tensor {name!r} ends at byte {end} of the data, "
                f"which holds {data_bytes} bytes"
            )
        spans.append((start, end, name))
    at = 0
    for start, end, name in sorted(spans):
        if start != at:
            what = "overlap the tensor before" if start < at else "start after a gap"
            raise ValueError(
                f"{path} is damaged: the bytes of tensor {name!r} ({start}..{end}) {what} "
                f"(the data before ends at {at})"
            )
        at = end
    if at != data_bytes:
        if at > data_bytes:
            raise ValueError(
                f"{path} is truncated or damaged: its tensors need {at} bytes of data, the file "
                f"holds {data_bytes}"
            )
        raise ValueError(
            f"{path} is damaged: {data_bytes - at} bytes follow the last tensor's data"
        )
    return header


def tensor_bytes(f: Any, path: str, name: str, info: dict, data_start: int) -> bytes:
    """The bytes of the tensor ``name``, of checked header entry ``info``, in the open file
    ``f`` (``path``) whose data starts at ``data_start``."""
    start, end = info["data_offsets"]
    f.seek(data_start + start)
    buf = f.read(end - start)
    if len(buf) != end - start:
        raise ValueError(f"{path} is truncated: tensor {name!r} is cut short")
    return buf


def restore(path: str, header: Header, tree: dict, specs: dict) -> dict:
    listed = dict(M.arrays_of(tree))
    extra = sorted(set(header.tensors) - set(listed))
    if extra:
        raise ValueError(
            f"{path} holds tensors its manifest does not list: {extra[:5]}; the file was "
            "changed after save wrote it"
        )
    out = {}
    with open(path, "rb") as f:
        for name, entry in listed.items():
            info = header.tensors.get(name)
            if info is None:
                raise ValueError(f"{path} lacks the tensor {name!r} its manifest lists")
            stored = entry.get("stored_dtype", entry["dtype"])
            want = f"{M.SAFETENSORS_CODES.get(stored)}{entry['shape']}"
            got = f"{info['dtype']}{info['shape']}"
            if want != got:
                raise ValueError(
                    f"{path}: tensor {name!r} is {got} in the safetensors header but "
                    f"{entry['dtype']}{entry['shape']} (stored as {want}) in the jaxmx manifest"
                )
            buf = tensor_bytes(f, path, name, info, header.data_start)
            crc = entry.get("crc32")
            if crc is not None and M.crc32(buf) != crc:
                raise ValueError(
                    f"{path} is damaged: the bytes of tensor {name!r} do not match their "
                    "checksum (CRC-32) in the manifest"
                )
            a = np.frombuffer(buf, dtype=M.dtype(stored)).reshape(entry["shape"])
            a = a.view(M.dtype(entry["dtype"]))  # safetensors is little-endian, as jax hosts are
            out[name] = jax.device_put(a, _tree.sharding(specs[name][0]))
    return out
