"""The manifest: its schema, checked field by field on load, its checksums, format cards.

Every check raises ``ValueError`` naming the checkpoint and the field, as a
path into the manifest (``tree.children[0].leaves.scale.dtype``), so a damaged
or hand-edited checkpoint is reported where it is wrong, not as a
``KeyError`` from deep inside the loader.

Checksums (version 2): each stored array entry has ``"crc32"``, the CRC-32
(``zlib.crc32``) of the array's bytes as stored (C order, little-endian);
the manifest has ``"crc32"`` over its own ``formats`` and ``tree`` written
canonically (sorted keys, no spaces), so a changed field of the manifest is
caught too. Version 1 manifests (no checksums) are still read.
"""

from __future__ import annotations

import dataclasses
import json
import zlib

import jax
import ml_dtypes
import numpy as np

from jaxmx import formats as _formats
from jaxmx.checkpoint import _sparse
from jaxmx.formats import ElementFormat, MicroExponent, MXFormat, ScaleFormat
from jaxmx.tensor import MXTensor

VERSION = 2
READS = (1, 2)
KEY = "jaxmx"  # orbax item name and safetensors metadata key of the manifest
# Records a format card may contain (never an arbitrary import from a file).
CARD_CLASSES = {c.__name__: c for c in (MXFormat, ElementFormat, ScaleFormat, MicroExponent)}
# dtypes written to safetensors as themselves. float8_e8m0fnu (F8_E8M0) is
# left out on purpose: only recent safetensors and torch (>= 2.7) read it, and
# its bits as U8 open everywhere.
SAFETENSORS_CODES = {
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
SAFETENSORS_DTYPES = {v: k for k, v in SAFETENSORS_CODES.items()} | {"F8_E8M0": "float8_e8m0fnu"}

_MX_FIELDS = {f.name: f for f in dataclasses.fields(MXTensor)}
_STATIC = {n for n, f in _MX_FIELDS.items() if f.metadata.get("static")}
_LEAVES = set(_MX_FIELDS) - _STATIC
_NO_DEFAULT = dataclasses.MISSING
_REQUIRED_STATIC = {n for n in _STATIC if _MX_FIELDS[n].default is _NO_DEFAULT}
_REQUIRED_LEAVES = {n for n in _LEAVES if _MX_FIELDS[n].default is _NO_DEFAULT}
_CONTAINERS = ("dict", "frozendict", "list", "tuple")


class ManifestError(ValueError):
    """A field of the manifest that is missing, of the wrong type, or inconsistent."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


# --------------------------------------------------------------------------
# dtypes, names, walking the tree.
# --------------------------------------------------------------------------


def dtype_name(dtype) -> str:
    return np.dtype(dtype).name


def dtype(name) -> np.dtype:
    """The array dtype a manifest names: numpy's bool, int, uint, float and complex,
    and ml_dtypes', by canonical name (``"float32"``, not ``"<f4"``). ValueError if none."""
    if not isinstance(name, str):
        raise ValueError(f"a dtype name is a string, got {_kind(name)}")
    try:
        d = np.dtype(name)
    except TypeError:
        d = None
    if d is None or d.kind not in "biufc":
        t = getattr(ml_dtypes, name, None)
        d = np.dtype(t) if isinstance(t, type) and issubclass(t, np.generic) else None
    if d is None or d.name != name:
        raise ValueError(f"unknown dtype {name!r} (array dtypes are named as numpy names them)")
    return d


def escape(key) -> str:
    # Orbax joins nested keys with "." (and silently merges "a.b" with a/b),
    # so no stored name component may hold one.
    return str(key).replace("~", "~0").replace("/", "~1").replace(".", "~2")


def leaf_name(keys: tuple) -> str:
    """The stored name of the array at ``keys`` (its tree path, dotted)."""
    return ".".join(escape(k) for k in keys) if keys else "_"


def nodes(node):
    yield node
    for child in node.get("children", ()):
        yield from nodes(child)


def arrays_of(node):
    """(name, entry) of every stored array under ``node``, in tree order."""
    for n in nodes(node):
        if n["type"] == "array":
            yield n["name"], n
        elif n["type"] == "mx":
            for entry in n["leaves"].values():
                if entry is not None:
                    yield entry["name"], entry
        elif n["type"] == _sparse.TYPE:
            yield from arrays_of(n["values"])
            yield n["indices"]["name"], n["indices"]


# --------------------------------------------------------------------------
# Checksums.
# --------------------------------------------------------------------------


def crc32(a) -> int:
    """CRC-32 of an array's bytes: C order, as the host (little-endian) holds them."""
    if isinstance(a, (bytes, bytearray, memoryview)):
        return zlib.crc32(a)
    a = np.asarray(a, order="C")
    return zlib.crc32(a.reshape(-1).view(np.uint8))


def _canonical(manifest: dict) -> bytes:
    body = {"formats": manifest.get("formats"), "tree": manifest.get("tree")}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def seal(manifest: dict) -> dict:
    """The manifest as written: its JSON round trip, with its own checksum."""
    manifest = json.loads(json.dumps(manifest))
    manifest["crc32"] = zlib.crc32(_canonical(manifest))
    return manifest


# --------------------------------------------------------------------------
# The schema.
# --------------------------------------------------------------------------


def check(manifest, backend: str) -> int:
    """Checks a manifest read from disk; returns its version. Raises ManifestError."""
    if not isinstance(manifest, dict) or "jaxmx_checkpoint" not in manifest:
        raise ManifestError("jaxmx_checkpoint", "missing: this is not a jaxmx manifest")
    version = manifest["jaxmx_checkpoint"]
    if not _is_int(version) or version not in READS:
        raise ManifestError(
            "jaxmx_checkpoint",
            f"version {version!r}; this jaxmx reads versions {', '.join(map(str, READS))}",
        )
    sealed = version >= 2
    _fields(
        manifest, "", {"jaxmx_checkpoint", "formats", "tree"} | ({"crc32"} if sealed else set())
    )
    if sealed:
        _crc(manifest["crc32"], "crc32", nullable=False)
        if zlib.crc32(_canonical(manifest)) != manifest["crc32"]:
            raise ManifestError(
                "crc32",
                "the manifest does not match its checksum: it was changed or damaged after "
                "save wrote it",
            )
    ctx = _Context(version, backend, manifest["formats"])
    _check_formats(manifest["formats"])
    _check_node(manifest["tree"], "tree", (), ctx)
    return version


@dataclasses.dataclass
class _Context:
    version: int
    backend: str
    formats: dict
    names: set = dataclasses.field(default_factory=set)


def _kind(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a bool"}.get(
        type(v), "null" if v is None else type(v).__name__
    )


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _at(field: str, key) -> str:
    return f"{field}.{key}" if field else str(key)


def _fields(obj, field: str, required: set, optional: frozenset | set = frozenset()) -> dict:
    if not isinstance(obj, dict):
        raise ManifestError(field or "manifest", f"must be an object, got {_kind(obj)}")
    for k in sorted(required - obj.keys()):
        raise ManifestError(_at(field, k), "missing")
    for k in sorted(obj.keys() - required - optional, key=str):
        raise ManifestError(_at(field, k), "is not a field of this node")
    return obj


def _int(v, field: str, least: int | None = None) -> int:
    if not _is_int(v) or (least is not None and v < least):
        more = f" >= {least}" if least is not None else ""
        raise ManifestError(field, f"must be an int{more}, got {v!r}")
    return v


def _shape(v, field: str) -> None:
    if not isinstance(v, list):
        raise ManifestError(field, f"must be a list of sizes, got {_kind(v)}")
    for i, n in enumerate(v):
        _int(n, f"{field}[{i}]", 0)


def _dtype(v, field: str) -> np.dtype:
    try:
        return dtype(v)
    except ValueError as e:
        raise ManifestError(field, str(e)) from None


def _crc(v, field: str, nullable: bool) -> None:
    if v is None and nullable:
        return
    if not _is_int(v) or not 0 <= v < 2**32:
        raise ManifestError(field, f"must be a CRC-32 (an int in 0 .. 2**32 - 1), got {v!r}")


def _check_formats(fmts) -> None:
    if not isinstance(fmts, dict):
        raise ManifestError("formats", f"must be an object, got {_kind(fmts)}")
    for name, card in fmts.items():
        field = f"formats[{name!r}]"
        _check_card(card, field, "MXFormat")
        if card["fields"].get("name") != name:
            raise ManifestError(
                f"{field}.fields.name", f"is {card['fields'].get('name')!r}, not {name!r}"
            )


def _check_card(card, field: str, cls: str | None = None) -> None:
    _fields(card, field, {"class", "fields"})
    if card["class"] not in CARD_CLASSES or (cls is not None and card["class"] != cls):
        allowed = cls or ", ".join(CARD_CLASSES)
        raise ManifestError(f"{field}.class", f"is {card['class']!r}; allowed: {allowed}")
    fields = card["fields"]
    if card["class"] == "MXFormat" and isinstance(fields, dict) and "codec" in fields:
        # Written before MXFormat.codec was renamed family (after the checksum
        # check, which covers the card as stored).
        if "family" in fields:
            raise ManifestError(
                f"{field}.fields", "has both codec and family (codec is its old name)"
            )
        fields["family"] = fields.pop("codec")
    known = {f.name for f in dataclasses.fields(CARD_CLASSES[card["class"]])}
    _fields(fields, f"{field}.fields", set(), known)
    for k, v in card["fields"].items():
        at = f"{field}.fields.{k}"
        if isinstance(v, dict) and "class" in v:
            _check_card(v, at)
        elif isinstance(v, dict):
            _fields(v, at, {"dtype"})
            _dtype(v["dtype"], f"{at}.dtype")
        elif v is not None and not isinstance(v, (str, int, float)):
            raise ManifestError(at, f"must be a value, a dtype or a record, got {_kind(v)}")


def _check_node(node, field: str, keys: tuple, ctx: _Context) -> None:
    if not isinstance(node, dict) or "type" not in node:
        raise ManifestError(field, f"must be a node (an object with a type), got {_kind(node)}")
    kind = node["type"]
    if kind in ("dict", "frozendict"):
        _fields(node, field, {"type", "keys", "children"})
        names, children = node["keys"], _children(node, field)
        if not isinstance(names, list):
            raise ManifestError(f"{field}.keys", f"must be a list, got {_kind(names)}")
        if len(names) != len(children):
            raise ManifestError(
                f"{field}.keys", f"has {len(names)} keys for {len(children)} children"
            )
        seen = set()
        for i, k in enumerate(names):
            if not isinstance(k, (str, int)) or isinstance(k, bool) or (type(k), k) in seen:
                raise ManifestError(f"{field}.keys[{i}]", f"{k!r} is not a new str or int key")
            seen.add((type(k), k))
        for i, (k, child) in enumerate(zip(names, children, strict=True)):
            _check_node(child, f"{field}.children[{i}]", (*keys, k), ctx)
    elif kind in ("list", "tuple"):
        _fields(node, field, {"type", "children"})
        for i, child in enumerate(_children(node, field)):
            _check_node(child, f"{field}.children[{i}]", (*keys, i), ctx)
    elif kind == "none":
        _fields(node, field, {"type"})
    elif kind == "array":
        _check_entry(node, field, keys, ctx, array=True)
    elif kind == "mx":
        _check_mx(node, field, keys, ctx)
    elif kind == _sparse.TYPE:  # static fields, then each array, then the arrays' shapes
        _fields(node, field, _sparse.FIELDS)
        if (bad := _sparse.problem(node)) is None:
            _check_mx(node["values"], f"{field}.values", (*keys, "values"), ctx)
            _check_entry(node["indices"], f"{field}.indices", (*keys, "indices"), ctx)
            bad = _sparse.array_problem(node)
        if bad is not None:
            raise ManifestError(f"{field}.{bad[0]}", bad[1])
    else:
        allowed = ", ".join((*_CONTAINERS, "none", "array", "mx", _sparse.TYPE))
        raise ManifestError(f"{field}.type", f"is {kind!r}; allowed: {allowed}")


def _children(node: dict, field: str) -> list:
    if not isinstance(node["children"], list):
        raise ManifestError(f"{field}.children", f"must be a list, got {_kind(node['children'])}")
    return node["children"]


def _check_entry(entry, field: str, keys: tuple, ctx: _Context, array: bool = False) -> None:
    required = {"name", "dtype", "shape"} | ({"type"} if array else set())
    if ctx.version >= 2:
        required.add("crc32")
    _fields(entry, field, required, {"stored_dtype"})
    want = leaf_name(keys)
    if entry["name"] != want:
        raise ManifestError(
            f"{field}.name", f"is {entry['name']!r}; the array at this place is named {want!r}"
        )
    if want in ctx.names:
        raise ManifestError(f"{field}.name", f"{want!r} names two arrays")
    ctx.names.add(want)
    held = _dtype(entry["dtype"], f"{field}.dtype")
    _shape(entry["shape"], f"{field}.shape")
    if ctx.version >= 2:
        _crc(entry["crc32"], f"{field}.crc32", nullable=ctx.backend == "orbax")
    # safetensors holds the dtypes its readers do not know as unsigned bits.
    native = ctx.backend == "orbax" or held.name in SAFETENSORS_CODES
    bits = np.dtype(f"uint{8 * held.itemsize}") if held.itemsize in (1, 2, 4, 8) else None
    if native and "stored_dtype" in entry:
        raise ManifestError(f"{field}.stored_dtype", f"{held.name} is stored as itself")
    if not native and (bits is None or entry.get("stored_dtype") != bits.name):
        raise ManifestError(
            f"{field}.stored_dtype",
            f"is {entry.get('stored_dtype')!r}; {held.name} is held in "
            f"{bits.name if bits is not None else 'no unsigned dtype'}",
        )


def _mx_part(part, at: str, known: set, what: str) -> None:
    """An MXTensor's ``static`` or ``leaves`` object names only what MXTensor has."""
    if not isinstance(part, dict):
        raise ManifestError(at, f"must be an object, got {_kind(part)}")
    for k in sorted(part.keys() - known):
        raise ManifestError(
            f"{at}.{k}",
            f"is a {what} this jaxmx's MXTensor does not have; load the checkpoint with the "
            "jaxmx version that wrote it",
        )


def _check_mx(node: dict, field: str, keys: tuple, ctx: _Context) -> None:
    _fields(node, field, {"type", "shape", "static", "leaves"})
    _shape(node["shape"], f"{field}.shape")
    static, at = node["static"], f"{field}.static"
    _mx_part(static, at, _STATIC, "field")
    _fields(static, at, _REQUIRED_STATIC, _STATIC)
    for k, v in static.items():
        _check_static(k, v, f"{at}.{k}", ctx)
    leaves, at = node["leaves"], f"{field}.leaves"
    _mx_part(leaves, at, _LEAVES, "leaf")
    _fields(leaves, at, _REQUIRED_LEAVES, _LEAVES)
    if leaves["data"] is None:
        raise ManifestError(f"{at}.data", "must be an array entry, got null")
    for k, entry in leaves.items():
        if entry is not None:
            _check_entry(entry, f"{at}.{k}", (*keys, k), ctx)


def _check_static(name: str, v, field: str, ctx: _Context) -> None:
    if name == "format":
        _fields(v, field, {"format"})
        if not isinstance(v["format"], str) or v["format"] not in ctx.formats:
            raise ManifestError(f"{field}.format", f"{v['format']!r} is not among the formats")
    elif name == "dtype":
        _fields(v, field, {"dtype"})
        if not jax.dtypes.issubdtype(_dtype(v["dtype"], f"{field}.dtype"), np.floating):
            raise ManifestError(f"{field}.dtype", f"{v['dtype']!r} is not a float dtype")
    elif name == "block_size":
        if isinstance(v, dict):
            _fields(v, field, {"tuple"})
            pair = v["tuple"]
            if not isinstance(pair, list) or len(pair) != 2:
                raise ManifestError(f"{field}.tuple", f"must be a pair of ints, got {pair!r}")
            for i, b in enumerate(pair):
                _int(b, f"{field}.tuple[{i}]", 1)
        elif v is not None:
            _int(v, field, 1)
    elif name in ("axis", "length", "made_ndim"):
        if v is not None or name != "made_ndim":
            _int(v, field, None if name == "axis" else 0)
    elif name == "packed":
        if not isinstance(v, bool):
            raise ManifestError(field, f"must be true or false, got {v!r}")
    elif isinstance(v, (dict, list)):  # a static field this check does not know yet
        raise ManifestError(field, f"must be a value, got {_kind(v)}")


# --------------------------------------------------------------------------
# Format cards.
# --------------------------------------------------------------------------


def card(obj) -> dict:
    """A format record as JSON: every field, nested records included."""
    fields = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            v = card(v)
        elif isinstance(v, np.dtype):
            v = {"dtype": dtype_name(v)}
        fields[f.name] = v
    return {"class": type(obj).__name__, "fields": fields}


def _from_card(c: dict):
    fields = {}
    for k, v in c["fields"].items():
        if isinstance(v, dict) and "class" in v:
            v = _from_card(v)
        elif isinstance(v, dict):
            v = dtype(v["dtype"])
        fields[k] = v
    return CARD_CLASSES[c["class"]](**fields)


def rebuild_format(name: str, c: dict) -> MXFormat:
    """The format a (schema-checked) card describes; the registered one if the name is taken."""
    field = f"formats[{name!r}]"
    try:
        fmt = _from_card(c)
    except (TypeError, ValueError, ArithmeticError, AttributeError, KeyError) as e:
        raise ManifestError(field, f"the format cannot be rebuilt: {e}") from e
    if name in _formats.list_formats(aliases=True):
        registered = _formats.get_format(name)
        if registered != fmt:
            diff = _first_difference(card(registered), c)
            raise ManifestError(
                field,
                f"the checkpoint's format {name!r} differs from the format registered under "
                f"that name ({diff}); load it in a process where {name!r} is not registered, "
                "or register the checkpoint's format under another name and save again",
            )
        return registered
    return fmt


def _first_difference(a: dict, b: dict) -> str:
    fa, fb = dict(_flat_card(a)), dict(_flat_card(b))
    for k in sorted(set(fa) | set(fb)):
        if fa.get(k) != fb.get(k):
            return f"{k}: registered {fa.get(k)!r}, checkpoint {fb.get(k)!r}"
    return "same fields, different records"


def _flat_card(c: dict, prefix: str = ""):
    for k, v in c["fields"].items():
        if isinstance(v, dict) and "class" in v:
            yield from _flat_card(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v
