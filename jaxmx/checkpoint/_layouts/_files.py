"""Files of the ecosystem layouts: safetensors tensors by name, config.json, trees by dotted name.

Reading checks each file's header as the jaxmx safetensors backend does
(entries well formed, byte ranges tiling the data exactly) before any tensor
is read. A directory is read as a Hugging Face model directory: every
``*.safetensors`` file directly in it (one file or shards), ``config.json``
and ``hf_quant_config.json`` when present.

Writing puts every tensor in one safetensors file. Its ``__metadata__``
holds ``"format": "pt"`` (what Hugging Face writes) and, under
``"jaxmx.layout"``, what the layout itself has no field for: the layout's
name and, per MXTensor, the dtype it stands for and whether its codes were
packed, so that a save-then-load gives the same MXTensors back. Readers of
the layout ignore it; a file without it loads with the defaults (float32,
packed).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from jaxmx.checkpoint import _manifest as M
from jaxmx.checkpoint import _safetensors, _tree
from jaxmx.tensor import MXTensor

HINT_KEY = "jaxmx.layout"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MODELOPT_CONFIG_FILE = "hf_quant_config.json"
# What save writes into a directory; overwrite=True replaces only a directory
# holding nothing else.
WRITTEN = (WEIGHTS_FILE, CONFIG_FILE, MODELOPT_CONFIG_FILE)


# --------------------------------------------------------------------------
# Reading.
# --------------------------------------------------------------------------


def weight_files(path: str) -> list[str]:
    """The safetensors files of a file or model directory."""
    if os.path.isfile(path):
        return [path]
    files = sorted(
        os.path.join(path, n)
        for n in os.listdir(path)
        if n.endswith(".safetensors") and os.path.isfile(os.path.join(path, n))
    )
    if not files:
        raise ValueError(f"{path} holds no .safetensors file (a model directory holds one or more)")
    return files


def read_json(path: str) -> dict | None:
    """A JSON object file, or None where there is none."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            obj = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return obj


class Tensors:
    """The tensors of one or several safetensors files, read on demand, by name."""

    def __init__(self, path: str, headers: dict | None = None):
        """``headers``: {file: its :func:`_safetensors.header`} of files already read."""
        self.entries: dict[str, tuple[str, dict, int]] = {}
        self.hints: dict[str, dict] = {}
        self.layouts: set[str] = set()
        for file in weight_files(path):
            if headers and file in headers:
                entries, meta, start = headers[file]
            else:
                entries, meta, start = _safetensors.header(file)
            for name, info in entries.items():
                if name in self.entries:
                    raise ValueError(
                        f"{path}: the tensor {name!r} is in both {self.entries[name][0]} and {file}"
                    )
                self.entries[name] = (file, info, start)
            if HINT_KEY in meta:
                hint = _check_hint(file, meta[HINT_KEY])
                self.layouts.add(hint["layout"])
                self.hints.update(hint["mx"])

    def dtype(self, name: str) -> str:
        """The safetensors dtype code of a tensor (``"U8"``, ``"F8_E4M3"``, ...)."""
        return self.entries[name][1]["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name][1]["shape"])

    def where(self, name: str) -> str:
        return f"{self.entries[name][0]}: tensor {name!r}"

    def read(self, name: str) -> np.ndarray:
        file, info, start = self.entries[name]
        with open(file, "rb") as f:
            buf = _safetensors.tensor_bytes(f, file, name, info, start)
        dtype = M.dtype(M.SAFETENSORS_DTYPES[info["dtype"]])
        return np.frombuffer(buf, dtype=dtype).reshape(info["shape"])


def _check_hint(file: str, text) -> dict:
    def bad(why: str):
        return ValueError(f"{file}: its __metadata__[{HINT_KEY!r}] is wrong: {why}")

    try:
        hint = json.loads(text) if isinstance(text, str) else None
    except (json.JSONDecodeError, RecursionError) as e:
        raise bad(f"not JSON ({e})") from None
    if not isinstance(hint, dict) or set(hint) != {"layout", "mx"}:
        raise bad('not a JSON object {"layout": ..., "mx": {...}}')
    if not isinstance(hint["layout"], str) or not isinstance(hint["mx"], dict):
        raise bad("layout must be a string and mx an object")
    for stem, entry in hint["mx"].items():
        ok = isinstance(entry, dict) and set(entry) == {"dtype", "packed"}
        ok = ok and isinstance(entry["packed"], bool) and _float_dtype(entry["dtype"])
        if not ok:
            raise bad(
                f'the entry of {stem!r} is {entry!r}; it must be {{"dtype": a float dtype '
                'name such as "float32" or "bfloat16", "packed": true or false}'
            )
    return hint


def _float_dtype(name) -> bool:
    try:
        return jax.dtypes.issubdtype(M.dtype(name), np.floating)
    except ValueError:
        return False


class Codec:
    """What the layouts' codecs share: the ``quant_method`` that claims a model directory.

    A directory is the codec's when the ``quantization_config`` of its
    ``config.json`` names the codec's ``QUANT_METHOD``; a codec with more
    ways to be claimed (ModelOpt) overrides :meth:`claims`.
    """

    NAME: str
    QUANT_METHOD: str

    @classmethod
    def claims(cls, config: dict | None, quant: dict | None) -> bool:
        qc = (config or {}).get("quantization_config")
        return isinstance(qc, dict) and qc.get("quant_method") == cls.QUANT_METHOD


# --------------------------------------------------------------------------
# Trees <-> dotted names.
# --------------------------------------------------------------------------


def flatten(tree, keys: tuple = ()) -> list[tuple[str, object, tuple]]:
    """(dotted name, leaf, keys) of every MXTensor and array of a tree, in tree order."""
    if isinstance(tree, MXTensor) or _tree.is_array(tree):
        if not keys:
            raise TypeError("save takes a tree (a dict of MXTensors and arrays), not a bare leaf")
        return [(".".join(str(k) for k in keys), tree, keys)]
    kind = _tree.container_kind(tree)
    if kind in ("dict", "frozendict"):
        items = list(tree.items())
    elif kind in ("list", "tuple"):
        items = list(enumerate(tree))
    else:
        raise TypeError(
            f"{_tree.where(keys)} is a {type(tree).__name__}; a layout file holds tensors "
            "only: save takes nested dicts, lists and tuples of MXTensors and arrays"
        )
    out = []
    for k, v in items:
        if isinstance(k, bool) or not isinstance(k, (str, int)) or not str(k) or "." in str(k):
            raise ValueError(
                f"{_tree.where(keys)} has the key {k!r}; tensor names in a layout file are "
                "the keys joined with '.', so keys must be non-empty str or int without '.'"
            )
        out.extend(flatten(v, (*keys, k)))
    return out


def nest(flat: dict, path: str) -> dict:
    """{"a.b": x} -> {"a": {"b": x}}; a name that is also the prefix of another is an error."""
    out: dict = {}
    for name in sorted(flat):  # a prefix sorts before the names it begins
        *parents, last = name.split(".")
        d = out
        for i, p in enumerate(parents):
            d = d.setdefault(p, {})
            if not isinstance(d, dict):
                raise ValueError(
                    f"{path}: the tensor {'.'.join(parents[: i + 1])!r} is also a prefix of "
                    f"{name!r}; the names cannot be nested into a tree"
                )
        d[last] = flat[name]
    return out


# --------------------------------------------------------------------------
# Writing.
# --------------------------------------------------------------------------


def host(a) -> np.ndarray:
    return _safetensors.host(
        a, "an array sharded over several processes cannot be written to one file"
    )


def write(path: str, tensors: dict, layout: str, mx_hints: dict, configs: dict) -> None:
    """Writes the tensors (one safetensors file) and, for a directory, its JSON configs."""
    save_file = _safetensors.writer("saving a layout needs")
    meta = {"format": "pt", HINT_KEY: json.dumps({"layout": layout, "mx": mx_hints})}
    if path.endswith(".safetensors"):
        save_file(tensors, path, metadata=meta)
        return
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_FILE), metadata=meta)
    for name, obj in configs.items():
        with open(os.path.join(path, name), "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")


def check_replaceable(path: str, layout: str) -> None:
    """Whether save, asked to overwrite, may replace what is at ``path``: only what a layout
    save wrote."""
    if os.path.isfile(path):
        ok = path.endswith(".safetensors") and _written_by_jaxmx(path)
    elif os.path.isdir(path):
        names = set(os.listdir(path))
        ok = names <= set(WRITTEN) and WEIGHTS_FILE in names
        ok = ok and _written_by_jaxmx(os.path.join(path, WEIGHTS_FILE))
    else:
        ok = False
    if not ok:
        raise FileExistsError(
            f"{path} exists and is not a layout checkpoint jaxmx.save wrote; overwrite=True "
            f"replaces only those (a .safetensors file, or a directory holding only "
            f"{', '.join(WRITTEN)}), so it is left as it is (remove it yourself, or save "
            f"the {layout} layout elsewhere)"
        )
    if os.path.isdir(path):
        for name in os.listdir(path):
            os.remove(os.path.join(path, name))
    else:
        os.remove(path)


def _written_by_jaxmx(file: str) -> bool:
    try:
        return HINT_KEY in _safetensors.header(file)[1]
    except (OSError, ValueError):
        return False
