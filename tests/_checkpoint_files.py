"""Reading and writing checkpoint files by hand, for the tests that damage or edit them."""

import json
import pathlib
import struct
import zlib

import ml_dtypes
import numpy as np

from jaxmx.checkpoint._orbax import _nest


def orbax_write(path, manifest: dict, arrays: dict) -> None:
    """Rewrites an orbax checkpoint with orbax itself: its own records agree with the arrays."""
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as c:
        c.save(
            path,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(_nest(arrays)), jaxmx=ocp.args.JsonSave(manifest)
            ),
            force=True,
        )


# safetensors dtype codes, written out here rather than taken from jaxmx.
ST_DTYPES = {
    "BOOL": np.bool_,
    "U8": np.uint8,
    "I8": np.int8,
    "U16": np.uint16,
    "I16": np.int16,
    "U32": np.uint32,
    "I32": np.int32,
    "I64": np.int64,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F32": np.float32,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}
ST_CODES = {np.dtype(v).name: k for k, v in ST_DTYPES.items()}


def seal(manifest: dict) -> dict:
    """An edited manifest with its checksum recomputed, as a writer that made it so would."""
    if "crc32" in manifest:
        body = {"formats": manifest.get("formats"), "tree": manifest.get("tree")}
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
        manifest["crc32"] = zlib.crc32(text.encode())
    return manifest


def st_parts(path):
    """({name: array as stored}, __metadata__ or {}, header without it) of a safetensors file."""
    raw = pathlib.Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        a = np.frombuffer(raw[8 + n + start : 8 + n + end], ST_DTYPES[info["dtype"]])
        tensors[name] = a.reshape(info["shape"])
    return tensors, meta, header


def st_read(path):
    """(manifest, {name: array as stored}, header) of a jaxmx safetensors file."""
    tensors, meta, header = st_parts(path)
    return json.loads(meta["jaxmx"]), tensors, header


def st_write(path, manifest, tensors, edit_header=None, metadata=None):
    """Writes a safetensors file by hand; ``edit_header`` may then change the header.

    ``manifest`` (a dict, or its text) goes in ``__metadata__["jaxmx"]``, after
    what ``metadata`` holds; with neither, the file has no ``__metadata__``.
    """
    header, data, at = {}, b"", 0
    for name, a in tensors.items():
        b = np.ascontiguousarray(a).tobytes()
        header[name] = {
            "dtype": ST_CODES[a.dtype.name],
            "shape": list(a.shape),
            "data_offsets": [at, at + len(b)],
        }
        data, at = data + b, at + len(b)
    if edit_header is not None:
        edit_header(header)
    if manifest is not None or metadata is not None:
        header["__metadata__"] = dict(metadata or {})
    if manifest is not None:
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        header["__metadata__"]["jaxmx"] = text
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    pathlib.Path(path).write_bytes(struct.pack("<Q", len(text)) + text + data)


def orbax_read(path):
    """A jaxmx orbax checkpoint's manifest and its arrays, by dotted name."""
    import orbax.checkpoint as ocp

    manifest = json.loads((pathlib.Path(path) / "jaxmx" / "metadata").read_text())
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as c:
        got = c.restore(path, args=ocp.args.Composite(arrays=ocp.args.StandardRestore()))

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            name = f"{prefix}.{k}" if prefix else k
            out.update(flat(v, name) if isinstance(v, dict) else {name: np.asarray(v)})
        return out

    return manifest, flat(got["arrays"])


def rewrite(path, backend, edit):
    """Reads a checkpoint, lets ``edit(manifest, arrays)`` change it, and writes
    it back consistently (the manifest's checksum resealed)."""
    if backend == "safetensors":
        manifest, arrays, _ = st_read(path)
        edit(manifest, arrays)
        st_write(path, seal(manifest), arrays)
    else:
        manifest, arrays = orbax_read(path)
        edit(manifest, arrays)
        orbax_write(path, seal(manifest), arrays)
