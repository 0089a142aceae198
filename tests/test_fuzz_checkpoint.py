"""Fuzzing jaxmx.load with damaged and inconsistent checkpoints.

Random trees of every registered family (OCP MX, NVFP4 with 1-D blocks and
16x16 tiles, MX9/MX6/MX4 and MSFP, per-tensor FP8; packed and unpacked where
the format packs; tensor scales made under ``jax.vmap``; plain arrays beside
them) are saved with both backends, then damaged. ``load`` must then give
either the saved tree bit for bit or a ``ValueError`` whose message names the
checkpoint: never another value, never another exception.

Two kinds of damage:

* raw: truncated files, flipped bits in the header, the manifest or the
  array data, appended bytes, a deleted orbax file. The checksums of format
  version 2 catch what the structural checks cannot.
* edits: the checkpoint rewritten consistently by a writer that got one
  thing wrong (the manifest re-sealed with a fresh checksum, or written as
  version 1 without checksums): a leaf dropped or added, a dtype or shape
  changed in the manifest or in the backend's own record (safetensors header,
  orbax arrays), an MXTensor field changed so that it contradicts its leaves.
  Only the structural checks stand between these and a wrong tree. Edits
  that leave a self-consistent checkpoint (renaming MXFP6 E2M3 codes to E3M2,
  which hold the same bytes) are out of reach of any loader and not made.

The corpus of quantized tensors is built once (compiles are the cost); the
examples reuse it. ``JAXMX_FUZZ=large`` (see conftest.py) runs ten times the
examples.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import shutil
import struct
import tempfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxmx
from jaxmx.checkpoint._manifest import card as format_card
from tests._checkpoint_files import ST_CODES, ST_DTYPES, orbax_write, st_read, st_write
from tests._checkpoint_files import seal as reseal

BACKENDS = ("orbax", "safetensors")
RAW = ("truncate", "flip_meta", "flip_data", "append", "delete")
EDITS = (
    "v1",
    "leaf_dtype",
    "leaf_shape",
    "drop_leaf",
    "add_leaf",
    "static",
    "stored_dtype",
    "stored_shape",
    "drop_stored",
    "add_stored",
)
DTYPES = [
    "float32",
    "int32",
    "uint32",
    "bfloat16",
    "float16",
    "int16",
    "uint8",
    "int8",
    "bool",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e8m0fnu",
    "float4_e2m1fn",
]
NATIVE = set(ST_CODES)  # dtypes safetensors holds as themselves


def _examples(n: int) -> int:
    """``n`` examples under the default profile (100), scaled with the loaded one."""
    return max(1, n * settings.default.max_examples // 100)


def _fuzz(n: int):
    large = settings.default.max_examples > 100
    phases = settings.default.phases
    return settings(
        max_examples=_examples(n),
        phases=phases if large else tuple(p for p in phases if p.name != "shrink"),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --------------------------------------------------------------------------
# The corpus: every family, packed and not, tiles, vmap; built lazily, once.
# --------------------------------------------------------------------------


def _x(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 48)) * np.exp2(rng.integers(-4, 5, (32, 1)))
    return jnp.asarray(x.astype(np.float32)).astype(dtype)


# The default profile draws from a corpus that holds every family and every
# kind of leaf layout (packed, tiles, vmap tensor scales) once; the large one
# from every registered format, packed and not.
CORE = [
    "mxfp8_e4m3",
    "mxfp6_e3m2",
    "mxfp4_e2m1/packed",
    "mxint8",
    "nvfp4",
    "nvfp4/tiles/packed",
    "mx6/packed",
    "msfp12",
    "tensor_fp8_e4m3",
    "tensor_fp8_e5m2/vmap",
]
PLAIN = ["f32", "bf16", "i32", "bool", "scalar", "u8"]


def _corpus_names() -> list[str]:
    if settings.default.max_examples <= 100:
        return CORE + PLAIN
    names = []
    for name in jaxmx.list_formats():
        names.append(name)
        if jaxmx.get_format(name).packable:
            names.append(f"{name}/packed")
    names += ["nvfp4/tiles", "nvfp4/tiles/packed", "nvfp4/vmap", "tensor_fp8_e5m2/vmap"]
    return names + PLAIN


@functools.cache
def _item(key: str):
    rng = np.random.default_rng(len(key))
    plain = {
        "f32": lambda: jnp.asarray(rng.standard_normal(5).astype(np.float32)),
        "bf16": lambda: jnp.asarray(rng.standard_normal((2, 3))).astype(jnp.bfloat16),
        "i32": lambda: np.arange(-3, 4, dtype=np.int32),
        "bool": lambda: jnp.array([True, False, True]),
        "scalar": lambda: np.asarray(1.5, np.float32),
        "u8": lambda: np.arange(6, dtype=np.uint8).reshape(3, 2),
    }
    if key in plain:
        return plain[key]()
    name, *rest = key.split("/")
    packed = "packed" in rest
    if "tiles" in rest:
        return jaxmx.quantize(_x(), name, block_size=(16, 16), packed=packed)
    if "vmap" in rest:
        xs = _x().reshape(2, 16, 48)
        return jax.vmap(lambda a: jaxmx.quantize(a, name, packed=name == "nvfp4"))(xs)
    i = jaxmx.list_formats().index(name)
    # Half of them along axis 0 (blocks down the columns), half from bfloat16.
    x = _x(jnp.bfloat16 if i % 2 else jnp.float32)
    return jaxmx.quantize(x, name, axis=0 if i % 3 == 0 else -1, packed=packed)


def _tree(rng, keys: list[str]):
    """A random nesting of the corpus items ``keys`` in dicts, lists and tuples."""
    tree: dict = {}
    labels = ["w", "b", "a.b", "c/d", "~e", "kernel", "0"]
    for i, key in enumerate(keys):
        leaf = _item(key)
        shape = rng.integers(3)
        if shape == 1:
            leaf = [leaf, None]
        elif shape == 2:
            leaf = (leaf,)
        node = tree
        for _ in range(rng.integers(2)):
            node = node.setdefault(str(rng.choice(labels)) + "_", {})
        node[f"{rng.choice(labels)}{i}"] = leaf
    return tree


# --------------------------------------------------------------------------
# Comparing trees bit for bit.
# --------------------------------------------------------------------------


def _is_mx(x) -> bool:
    return isinstance(x, jaxmx.MXTensor)


def _bytes(a) -> tuple:
    a = np.asarray(a)
    return a.dtype.name, a.shape, np.ascontiguousarray(a).reshape(-1).view(np.uint8).tobytes()


def _same(saved, loaded) -> str | None:
    """None if ``loaded`` is ``saved`` bit for bit, else what differs."""
    ls, ts = jax.tree.flatten(saved, is_leaf=_is_mx)
    ll, tl = jax.tree.flatten(loaded, is_leaf=_is_mx)
    if ts != tl:
        return f"tree structure {tl} != {ts}"
    for a, b in zip(ls, ll, strict=True):
        if _is_mx(a) != _is_mx(b):
            return f"{type(b).__name__} where a {type(a).__name__} was saved"
        if _is_mx(a):
            for f in ("format", "axis", "block_size", "length", "dtype", "packed", "made_ndim"):
                if getattr(a, f) != getattr(b, f):
                    return f"MXTensor {f} {getattr(b, f)!r} != {getattr(a, f)!r}"
            for f in ("data", "scale", "tensor_scale", "micro"):
                u, v = getattr(a, f), getattr(b, f)
                if (u is None) != (v is None) or (u is not None and _bytes(u) != _bytes(v)):
                    return f"MXTensor {f} differs"
        elif _bytes(a) != _bytes(b):
            return f"array {_bytes(b)[:2]} != {_bytes(a)[:2]} or its bytes differ"
    return None


# --------------------------------------------------------------------------
# Reading and writing checkpoints by hand (no jaxmx code).
# --------------------------------------------------------------------------


def _to_v1(m: dict) -> dict:
    m["jaxmx_checkpoint"] = 1
    m.pop("crc32", None)
    for entry in _entries(m):
        entry.pop("crc32", None)
    return m


def _entries(m: dict) -> list[dict]:
    """Every stored array entry of a manifest."""
    out, stack = [], [m["tree"]]
    while stack:
        n = stack.pop()
        if n["type"] == "array":
            out.append(n)
        elif n["type"] == "mx":
            out += [e for e in n["leaves"].values() if e is not None]
        stack += n.get("children", [])
    return out


def _mx_nodes(m: dict) -> list[dict]:
    out, stack = [], [m["tree"]]
    while stack:
        n = stack.pop()
        out += [n] if n["type"] == "mx" else []
        stack += n.get("children", [])
    return out


def _orbax_read(path: str):
    import orbax.checkpoint as ocp

    with open(os.path.join(path, "jaxmx", "metadata")) as f:
        manifest = json.load(f)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as c:
        got = c.restore(path, args=ocp.args.Composite(arrays=ocp.args.StandardRestore()))
    flat: dict = {}

    def walk(d, prefix):
        for k, v in d.items():
            name = f"{prefix}.{k}" if prefix else k
            walk(v, name) if isinstance(v, dict) else flat.__setitem__(name, np.asarray(v))

    walk(got["arrays"], "")
    return manifest, flat


def _read(path: str, backend: str):
    return st_read(path)[:2] if backend == "safetensors" else _orbax_read(path)


def _write(path: str, backend: str, manifest: dict, arrays: dict) -> None:
    if backend == "safetensors":
        st_write(path, manifest, arrays)
    else:
        orbax_write(path, manifest, arrays)


# --------------------------------------------------------------------------
# Damage.
# --------------------------------------------------------------------------


def _files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    return sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs)


def _flip(rng, file: str, lo: int = 0, hi: int | None = None) -> str:
    with open(file, "rb") as f:
        raw = bytearray(f.read())
    hi = len(raw) if hi is None else hi
    if hi <= lo:
        return "nothing to flip"
    at = int(rng.integers(lo, hi))
    bits = int(rng.integers(1, 256))
    raw[at] ^= bits
    with open(file, "wb") as f:
        f.write(bytes(raw))
    return f"{os.path.basename(file)} byte {at} ^= {bits:#04x}"


def _raw(rng, kind: str, path: str, backend: str) -> str:
    files = _files(path)
    if backend == "safetensors":
        with open(path, "rb") as f:
            meta_end = 8 + struct.unpack("<Q", f.read(8))[0]
        if kind == "flip_meta":
            return _flip(rng, path, 0, meta_end)
        if kind == "flip_data":
            return _flip(rng, path, meta_end)
        file = path
    else:
        manifest = os.path.join(path, "jaxmx", "metadata")
        data = [f for f in files if f"{os.sep}arrays{os.sep}" in f]
        if kind == "flip_meta":
            meta = [f for f in files if f not in data or "METADATA" in f or "_sharding" in f]
            return _flip(rng, manifest if rng.random() < 0.6 else str(rng.choice(meta)))
        if kind == "flip_data":
            return _flip(rng, str(rng.choice(data)))
        file = str(rng.choice(files))
    size = os.path.getsize(file)
    if kind == "truncate":
        cut = int(rng.integers(0, max(size, 1)))
        with open(file, "r+b") as f:
            f.truncate(cut)
        return f"{os.path.basename(file)} truncated {size} -> {cut}"
    if kind == "append":
        with open(file, "ab") as f:
            f.write(rng.bytes(int(rng.integers(1, 64))))
        return f"{os.path.basename(file)} appended to"
    if backend == "safetensors":  # "delete" for a file: empty it
        with open(file, "wb"):
            pass
        return "file emptied"
    os.remove(file)
    return f"{os.path.relpath(file, path)} deleted"


def _other_dtype(rng, name: str) -> str:
    return str(rng.choice([d for d in DTYPES if d != name]))


def _set_dtype(entry: dict, name: str, backend: str) -> None:
    entry["dtype"] = name
    entry.pop("stored_dtype", None)
    if backend == "safetensors" and name not in NATIVE:
        entry["stored_dtype"] = f"uint{8 * np.dtype(getattr(ml_dtypes, name, name)).itemsize}"


def _other_shape(rng, shape: list) -> list:
    options = [shape + [1], [*shape[:-1], shape[-1] + 1] if shape else [2]]
    if len(shape) >= 2:
        options += [shape[::-1] if shape[0] != shape[-1] else [shape[0] + 1, *shape[1:]]]
        options += [[int(np.prod(shape))]]
    if len(shape) >= 1:
        options += [shape[1:] if shape[1:] != shape else [*shape, 2]]
    return [int(v) for v in options[int(rng.integers(len(options)))]]


def _leaf_signature(fmt, packed: bool, leaves: dict) -> bool:
    """Whether leaves of these dtypes could belong to ``fmt`` (a swap no loader sees)."""
    elem = fmt.element
    if packed:
        codes = {"uint8"}
    else:
        codes = {np.dtype(elem.storage_dtype).name}
        if elem.kind == "float" and np.dtype(elem.storage_dtype).itemsize * 8 != elem.bits:
            codes.add("uint8")
    if leaves["data"]["dtype"] not in codes:
        return False
    scale = None if fmt.scale is None else np.dtype(fmt.scale.storage_dtype).name
    got = {k: (None if leaves.get(k) is None else leaves[k]["dtype"]) for k in leaves}
    return (
        got.get("scale") == scale
        and (got.get("tensor_scale") is not None) == bool(fmt.tensor_scale)
        and (got.get("micro") is not None) == (fmt.micro is not None)
        and (not packed or fmt.packable)
    )


def _edit_static(rng, m: dict, node: dict) -> str:
    static = node["static"]
    field = str(rng.choice(["format", "block_size", "length", "packed"]))
    if field == "format":
        current = jaxmx.get_format(static["format"]["format"])
        others = [
            f
            for f in jaxmx.list_formats()
            if not _leaf_signature(jaxmx.get_format(f), static.get("packed", False), node["leaves"])
        ]
        target = str(rng.choice(others))
        card = format_card(jaxmx.get_format(target))
        m["formats"][target] = card
        static["format"] = {"format": target}
        return f"format {current.name} -> {target}"
    if field == "block_size":
        bs, n = static["block_size"], static["length"]
        if bs is None:
            new = 16
        elif isinstance(bs, dict):
            new = {"tuple": [bs["tuple"][0], bs["tuple"][1] // 2]}
        else:  # another number of blocks along the axis than the scales hold
            sizes = [b for b in (1, 2, 8, 16, 64, 128) if -(-n // b) != -(-n // bs)]
            new = int(rng.choice(sizes))
        static["block_size"] = new
        return f"block_size {bs} -> {new}"
    if field == "length":
        static["length"] += int(rng.choice([-1, 1, 7]))
        return "length changed"
    static["packed"] = not static.get("packed", False)
    return f"packed -> {static['packed']}"


def _edit(rng, kind: str, path: str, backend: str) -> str:
    """A consistent rewrite that gets one thing wrong; as version 1 half the time."""
    m, arrays = _read(path, backend)
    v1 = kind == "v1" or rng.random() < 0.5
    entries = _entries(m)
    entry = entries[int(rng.integers(len(entries)))]
    mx = _mx_nodes(m)
    what = kind
    if kind == "leaf_dtype":
        new = _other_dtype(rng, entry["dtype"])
        what = f"manifest dtype of {entry['name']}: {entry['dtype']} -> {new}"
        _set_dtype(entry, new, backend)
    elif kind == "leaf_shape":
        new = _other_shape(rng, entry["shape"])
        what = f"manifest shape of {entry['name']}: {entry['shape']} -> {new}"
        entry["shape"] = new
    elif kind == "drop_leaf" and mx:
        node = mx[int(rng.integers(len(mx)))]
        leaf = str(rng.choice([k for k, e in node["leaves"].items() if e is not None]))
        node["leaves"][leaf] = None
        what = f"manifest leaf {leaf} of an MXTensor dropped"
    elif kind == "add_leaf" and mx:
        node = mx[int(rng.integers(len(mx)))]
        absent = [k for k in ("scale", "tensor_scale", "micro") if node["leaves"].get(k) is None]
        if not absent:
            return _edit(rng, "drop_leaf", path, backend)
        leaf = str(rng.choice(absent))
        data = node["leaves"]["data"]
        name = data["name"].rsplit(".", 1)[0] + "." + leaf
        dtype = {"scale": "float8_e8m0fnu", "tensor_scale": "float32", "micro": "uint8"}[leaf]
        shape = [] if leaf == "tensor_scale" else list(data["shape"])
        a = np.zeros(shape, np.uint8 if dtype != "float32" else np.float32)
        node["leaves"][leaf] = {"name": name, "dtype": dtype, "shape": shape, "crc32": 0}
        _set_dtype(node["leaves"][leaf], dtype, backend)
        if rng.random() < 0.5:  # and the array too, written by the backend
            arrays[name] = a
        what = f"leaf {leaf} added to an MXTensor"
    elif kind == "static" and mx:
        what = _edit_static(rng, m, mx[int(rng.integers(len(mx)))])
    elif kind == "stored_dtype":
        a = arrays[entry["name"]]
        same = [d for d in ST_DTYPES.values() if np.dtype(d).itemsize == a.itemsize]
        new = np.dtype(same[int(rng.integers(len(same)))])
        if new == a.dtype:
            new = np.dtype(np.float32 if a.itemsize != 4 else np.int16)
            arrays[entry["name"]] = np.zeros(a.shape, new)
        else:
            arrays[entry["name"]] = a.view(new)
        what = f"stored dtype of {entry['name']}: {a.dtype} -> {new}"
    elif kind == "stored_shape":
        a = arrays[entry["name"]]
        new = _other_shape(rng, list(a.shape))
        arrays[entry["name"]] = np.resize(a, new)
        what = f"stored shape of {entry['name']}: {list(a.shape)} -> {new}"
    elif kind == "drop_stored":
        arrays.pop(entry["name"])
        if not arrays:  # orbax writes no empty item: another array in its place
            arrays["extra~2leaf"] = np.ones(3, np.float32)
        what = f"stored array {entry['name']} dropped"
    elif kind == "add_stored":
        arrays["extra~2leaf"] = np.ones(3, np.float32)
        what = "an array the manifest does not list added"
    elif kind != "v1":
        return _edit(rng, "leaf_shape", path, backend)  # no MXTensor in this tree
    if v1:
        _to_v1(m)
    else:
        reseal(m)
    if backend == "orbax":
        shutil.rmtree(path)
    _write(path, backend, m, arrays)
    return f"{what}{' (as version 1)' if v1 else ' (re-sealed)'}"


# --------------------------------------------------------------------------
# The property.
# --------------------------------------------------------------------------


def _check_load(path: str, saved, damage: str) -> str:
    try:
        loaded = jaxmx.load(path)
    except ValueError as e:
        assert path in str(e), f"{damage}: the error does not name {path}: {e}"
        if os.path.isdir(path):
            # orbax leaves the coroutines of a failed read to the collector,
            # which reports their exceptions as unraisable: let that happen here.
            gc.collect()
        return "refused"
    except Exception as e:  # the point: nothing but a ValueError
        raise AssertionError(f"{damage}: {type(e).__name__} instead of ValueError: {e}") from e
    diff = _same(saved, loaded)
    assert diff is None, f"{damage}: load gave another tree: {diff}"
    return "identical"


def _property(backend: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    names = _corpus_names()
    keys = [str(k) for k in rng.choice(names, size=int(rng.integers(1, 4)), replace=False)]
    saved = _tree(rng, keys)
    with tempfile.TemporaryDirectory() as tmp:
        suffix = ".safetensors" if backend == "safetensors" else ""
        original = os.path.join(tmp, "saved" + suffix)
        jaxmx.save(original, saved)
        for i in range(4):
            path = os.path.join(tmp, f"damaged{i}{suffix}")
            (shutil.copytree if backend == "orbax" else shutil.copy)(original, path)
            if rng.random() < 0.5:
                damage = _raw(rng, str(rng.choice(RAW)), path, backend)
            else:
                damage = _edit(rng, str(rng.choice(EDITS)), path, backend)
            outcome = _check_load(path, saved, f"{backend} {keys}: {damage}")
            if damage.startswith("v1"):
                assert outcome == "identical", f"{damage}: a version 1 checkpoint was refused"


def test_every_family_is_in_the_default_corpus():
    families = {jaxmx.get_format(k.split("/")[0]).family for k in CORE}
    assert families == set(jaxmx.formats.DESCRIPTIONS)
    assert {"packed", "tiles", "vmap"} <= {part for k in CORE for part in k.split("/")[1:]}


@_fuzz(40)
@given(seed=st.integers(0, 2**32 - 1))
def test_damaged_safetensors_file_loads_bit_identical_or_is_refused(seed):
    _property("safetensors", seed)


@_fuzz(12)
@given(seed=st.integers(0, 2**32 - 1))
def test_damaged_orbax_checkpoint_loads_bit_identical_or_is_refused(seed):
    _property("orbax", seed)
