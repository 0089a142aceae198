"""Checkpoints in the layouts the ecosystem ships: gpt-oss, compressed-tensors, ModelOpt.

``jaxmx.load(path, layout=...)`` reads them and ``jaxmx.save(path, tree,
layout=...)`` writes them; ``layout="jaxmx"`` is jaxmx's own checkpoint
(:mod:`jaxmx.checkpoint`). A load never decodes: the file's codes and scales
become an MXTensor's codes and scales, the tensor scale converted as each
layout's module says (:mod:`._gptoss`, :mod:`._nvfp4`), and every other
tensor (biases, norms, activation scales, unquantized layers) a plain array
(a jax Array; a NumPy array for int64 and float64 while ``jax_enable_x64`` is
off, which JAX would narrow).
Tensor names are split at ``.`` into nested dicts, and a save joins the
keys of a tree with ``.``, so ``{"model": {"layers": {"0": {"mlp": ...}}}}``
is ``model.layers.0.mlp...`` in the file, as Hugging Face names it.

A path ending in ``.safetensors`` is one file; any other path is a model
directory: every ``*.safetensors`` file in it is read (shards included), and
a save writes ``model.safetensors`` with the ``config.json`` (and, for
ModelOpt, ``hf_quant_config.json``) that holds the layout's
``quantization_config``, so the ecosystem's loaders know what they read.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxmx.checkpoint import _manifest as M
from jaxmx.checkpoint import _orbax, _safetensors, _tree
from jaxmx.checkpoint._layouts import _files, _mx
from jaxmx.checkpoint._layouts._gptoss import GptOss
from jaxmx.checkpoint._layouts._nvfp4 import CompressedTensors, ModelOpt
from jaxmx.tensor import MXTensor

JAXMX = "jaxmx"
CODECS = {c.NAME: c for c in (GptOss, CompressedTensors, ModelOpt)}
LAYOUTS = (JAXMX, *CODECS)
# The tensor names that mark each layout, for the error naming none of them.
_MARKERS = {c.NAME: " / ".join("*" + s for s in c.SUFFIXES) for c in CODECS.values()}


def check(layout: Any, *, for_load: bool) -> None:
    if layout is None and for_load:
        return
    if not isinstance(layout, str) or layout not in LAYOUTS:
        allowed = ", ".join(repr(x) for x in LAYOUTS)
        extra = " (or None: detect it)" if for_load else ""
        raise ValueError(f"unknown layout {layout!r}; allowed: {allowed}{extra}")


# --------------------------------------------------------------------------
# Detection.
# --------------------------------------------------------------------------


class Detected(NamedTuple):
    """The layout of a checkpoint, and what was read to tell it, for the load not to read
    it again."""

    layout: str
    tensors: _files.Tensors | None = None  # a layout checkpoint's, for load()
    header: tuple[dict, int] | None = None  # a safetensors file's raw_header, for its reader


def detect(path: str) -> Detected:
    """The layout of the checkpoint at ``path``; ``"jaxmx"`` where nothing says otherwise."""
    if os.path.isdir(path):
        return _detect_dir(path)
    try:
        raw = _safetensors.raw_header(path)
    except (OSError, ValueError):
        return Detected(JAXMX)  # the jaxmx reader reports what is wrong with it
    if _safetensors.has_manifest(raw[0]):
        return Detected(JAXMX, header=raw)
    try:
        checked = _safetensors.header(path, raw)
    except (OSError, ValueError):
        return Detected(JAXMX, header=raw)
    ts = _files.Tensors(path, {path: checked})
    found = _by_hint_or_names(path, ts)
    return Detected(found, tensors=ts) if found else Detected(JAXMX, header=raw)


def _detect_dir(path: str) -> Detected:
    if _orbax.is_checkpoint(path) or not any(n.endswith(".safetensors") for n in os.listdir(path)):
        return Detected(JAXMX)  # an orbax checkpoint, or nothing a layout reads
    config = _files.read_json(os.path.join(path, _files.CONFIG_FILE))
    quant = _files.read_json(os.path.join(path, _files.MODELOPT_CONFIG_FILE))
    claimed = [name for name, c in CODECS.items() if c.claims(config, quant)]
    if len(claimed) > 1:
        raise ValueError(f"{path}: its config files fit several layouts ({claimed}); pass layout=")
    if claimed:
        return Detected(claimed[0])
    qc = (config or {}).get("quantization_config")
    if isinstance(qc, dict) and "quant_method" in qc:
        raise ValueError(
            f"{path}: its config.json has quantization_config.quant_method "
            f"{qc['quant_method']!r}, not a layout jaxmx reads ("
            + ", ".join(f"{c.NAME}: {c.QUANT_METHOD!r}" for c in CODECS.values())
            + "); pass layout= to read its tensors anyway"
        )
    ts = _files.Tensors(path)
    found = _by_hint_or_names(path, ts)
    if found is None:
        raise ValueError(
            f"{path} is neither a jaxmx checkpoint (it has no 'jaxmx' item) nor a model "
            "directory in a layout jaxmx recognises: its config.json names no "
            "quantization_config and no tensor is named as a layout names its weights "
            f"({'; '.join(f'{k}: {v}' for k, v in _MARKERS.items())}); pass layout= to read "
            "its tensors as plain arrays"
        )
    return Detected(found, tensors=ts)


def _by_hint_or_names(path: str, ts: _files.Tensors) -> str | None:
    hinted = [x for x in ts.layouts if x in CODECS]
    if len(hinted) == 1:
        return hinted[0]
    found = [name for name, c in CODECS.items() if c.looks_like(ts)]
    if len(found) > 1:
        raise ValueError(
            f"{path}: its tensors are named as several layouts name theirs ({found}); pass layout="
        )
    return found[0] if found else None


# --------------------------------------------------------------------------
# Load and save.
# --------------------------------------------------------------------------


def load(path: str, layout: str, ts: _files.Tensors | None = None) -> Any:
    """The tree of the layout checkpoint at ``path``: MXTensors and plain jax Arrays.

    ``ts``: its tensors, where :func:`detect` has read them.
    """
    codec = CODECS[layout]
    ts = ts if ts is not None else _files.Tensors(path)
    flat: dict = {}
    used: set = set()
    notes: list[str] = []
    for stem, names in codec.stems(ts).items():
        if stem in ts.entries and stem not in names:
            raise ValueError(
                f"{ts.where(stem)} has the name of the {layout} weight made of {list(names)}; "
                "the two cannot both be loaded"
            )
        flat[stem] = codec.decode(ts, stem, names, ts.hints.get(stem), notes)
        used.update(names)
    for name in ts.entries:
        if name not in used:
            a = ts.read(name)
            # int64 / float64 (compressed-tensors' weight_shape) while jax_enable_x64 is
            # off stay NumPy arrays: JAX would narrow them.
            wide = jax.dtypes.canonicalize_dtype(a.dtype) != a.dtype
            flat[name] = a if wide else jax.device_put(a)
    if notes:
        warnings.warn(_inexact(path, "holds", notes), UserWarning, stacklevel=3)
    return _files.nest(flat, path)


def save(path: str, tree: Any, layout: str, overwrite: bool) -> dict:
    """Writes ``tree`` in ``layout``; returns the counts SaveInfo reports."""
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    codec = CODECS[layout]
    tensors: dict[str, np.ndarray] = {}
    owners: dict[str, str] = {}
    hints: dict[str, dict] = {}
    stems: list[str] = []
    plain: list[str] = []
    notes: list[str] = []
    for name, leaf, keys in _files.flatten(tree):
        where = _tree.where(keys)
        if isinstance(leaf, MXTensor):
            written = codec.encode(name, leaf, where, notes)
            hints[name] = _mx.hint_of(leaf)
            stems.append(name)
        else:
            a = _files.host(leaf)
            if a.dtype.name not in M.SAFETENSORS_CODES:
                raise ValueError(
                    f"{where} is a {a.dtype.name} array; a {layout} file holds plain arrays of "
                    f"the dtypes safetensors readers know: {', '.join(M.SAFETENSORS_CODES)}"
                )
            written = {name: a}
            plain.append(name)
        for k, a in written.items():
            if k in owners:
                raise ValueError(
                    f"{where} is written as the tensor {k!r}, which {owners[k]} is written as "
                    "too; rename one of them"
                )
            owners[k] = where
            tensors[k] = a
    if not tensors:
        raise ValueError("the tree holds no arrays or MXTensors; there is nothing to save")
    if notes:
        warnings.warn(_inexact(path, "will hold", notes), UserWarning, stacklevel=3)
    if os.path.lexists(path):  # only now that the whole tree is known to fit the layout
        _files.check_replaceable(path, layout)
    _files.write(path, tensors, layout, hints, codec.config(stems, plain))
    return {
        "array_bytes": sum(a.nbytes for a in tensors.values()),
        "num_arrays": len(plain),
        "num_mx_tensors": len(stems),
    }


def _inexact(path: str, verb: str, notes: list[str]) -> str:
    shown = ", ".join(notes[:5]) + (f" and {len(notes) - 5} more" if len(notes) > 5 else "")
    return (
        f"{path} {verb} compressed-tensors NVFP4 weights whose decode by division, "
        "e2m1 * (block_scale / global_scale), differs in the last bit of the scale product "
        "from jaxmx's e2m1 * (block_scale * tensor_scale) with tensor_scale = "
        f"f32(1 / global_scale), for some blocks: {shown}. The MXTensors decode as jaxmx "
        "(and vLLM, which multiplies by the same reciprocal) does; see docs/serving.md"
    )
