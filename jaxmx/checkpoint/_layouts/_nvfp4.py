"""The NVFP4 layouts: compressed-tensors (llm-compressor, vLLM) and NVIDIA ModelOpt.

Both store a linear weight ``W`` of shape ``(out_features, in_features)`` as
E2M1 codes packed two per byte along the input axis (``(out, in / 2)`` uint8,
element ``2i`` in the low nibble), one E4M3 scale per 16 inputs (``(out, in
/ 16)`` ``float8_e4m3fn``) and one float32 scale for the tensor. They differ
in names and in what the tensor scale means:

==================  ===============================  ==============================
                    compressed-tensors               ModelOpt
==================  ===============================  ==============================
codes               ``W_packed``                     ``W``
block scales        ``W_scale``                      ``W_scale``
tensor scale        ``W_global_scale`` = 2688/amax   ``W_scale_2`` = amax/2688
decode (float32)    ``e2m1 * (s8 / global_scale)``   ``e2m1 * (s8 * scale_2)``
activation scale    ``input_global_scale``           ``input_scale``
==================  ===============================  ==============================

jaxmx decodes NVFP4 as ``e2m1 * (s8 * tensor_scale)``, so ModelOpt's
``W_scale_2`` *is* the tensor scale, bit for bit, both ways.

compressed-tensors divides. jaxmx takes ``tensor_scale = f32(1 / global_scale)``
(what vLLM computes from the same file when it loads it), and its decode then
equals the division for every block scale ``s8`` with ``f32(s8 *
tensor_scale) == f32(s8 / global_scale)``: always when the global scale is a
power of two, and for most block scales otherwise, but not all (no float32
multiplier reproduces a division for every E4M3 value). Where a tensor
holds a block scale for which the two differ (by one unit in the last place
of the float32 scale product), load warns, naming the tensors; the loaded
values are jaxmx's decode, never silently the file's. Save writes a global
scale ``g`` with ``f32(1 / g) == tensor_scale`` (so it loads back to the same
tensor scale), choosing among the one to five floats near ``1 / tensor_scale``
one whose division agrees with the tensor's decode for all of its block
scales where there is one, and warns where there is none.

The activation scales are written and read as plain arrays, unconverted.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from jaxmx.checkpoint._layouts import _files, _mx
from jaxmx.tensor import MXTensor

FORMAT = "nvfp4"
BLOCK = 16
_E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)


def _module(stem: str) -> str:
    return stem[: -len(".weight")] if stem.endswith(".weight") else stem


def _scalar(ts: _files.Tensors, name: str, what: str) -> np.float32:
    if ts.dtype(name) != "F32" or ts.shape(name) not in ((), (1,)):
        raise ValueError(
            f"{ts.where(name)} is {ts.dtype(name)}{list(ts.shape(name))}; {what} is one "
            "float32 (F32 of shape [] or [1])"
        )
    return ts.read(name).reshape(())


def _codes_and_scales(ts: _files.Tensors, codes: str, scales: str, layout: str):
    cshape, sshape = ts.shape(codes), ts.shape(scales)
    if ts.dtype(codes) != "U8" or len(cshape) != 2:
        raise ValueError(
            f"{ts.where(codes)} is {ts.dtype(codes)}{list(cshape)}; {layout} NVFP4 codes are "
            "U8 of shape (out_features, in_features / 2), two E2M1 codes per byte"
        )
    want = (cshape[0], 2 * cshape[1] // BLOCK)
    if ts.dtype(scales) != "F8_E4M3" or sshape != want or (2 * cshape[1]) % BLOCK:
        raise ValueError(
            f"{ts.where(scales)} is {ts.dtype(scales)}{list(sshape)}; the block scales of "
            f"codes of shape {list(cshape)} ({2 * cshape[1]} inputs) are F8_E4M3 of shape "
            f"{list(want)}, one per {BLOCK} inputs"
        )
    return ts.read(codes), ts.read(scales).view(_E4M3)


def _encode_common(t: MXTensor, where: str, layout: str):
    _mx.check(t, where, layout, FORMAT, BLOCK, rank2=True)
    packed = _mx.packed_codes(t)
    scale = _files.host(t.scale)
    return packed, scale, np.float32(_files.host(t.tensor_scale))


def _bits(a) -> np.ndarray:
    a = np.asarray(a, np.float32)
    return np.where(np.isnan(a), np.uint32(0x7FC00000), a.view(np.uint32))


def _used_scales(scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(each block scale a tensor uses, once, in float32; how many blocks use it)."""
    used, counts = np.unique(scale.view(np.uint8), return_counts=True)
    return used.view(_E4M3).astype(np.float32), counts


def _division_differs(used: tuple, g: np.float32, ts: np.float32) -> int:
    """Blocks whose scale product differs: f32(s8 / g) against f32(s8 * ts).

    ``used``: the tensor's :func:`_used_scales`.
    """
    s8, counts = used
    with np.errstate(all="ignore"):
        return int(counts[_bits(s8 / g) != _bits(s8 * ts)].sum())


def _stems(ts: _files.Tensors, key: str, suffixes: tuple, who: str, *optional: str) -> dict:
    """{stem: its tensor names} of every weight with a tensor named ``stem + key``.

    The names are ``stem + s`` for each of ``suffixes``, all of which must be
    there, then ``stem + s`` for each of ``optional`` that is there.
    """
    out = {}
    for name in ts.entries:
        if not name.endswith(key):
            continue
        stem = name[: -len(key)]
        names = tuple(stem + s for s in suffixes)
        missing = [n for n in names if n not in ts.entries]
        if missing:
            raise ValueError(
                f"{ts.where(name)} lacks {missing} beside it; {who} stores an NVFP4 weight as "
                f"{list(names)}"
            )
        out[stem] = names + tuple(stem + s for s in optional if stem + s in ts.entries)
    return out


# --------------------------------------------------------------------------
# compressed-tensors.
# --------------------------------------------------------------------------


class CompressedTensors(_files.Codec):
    NAME = "compressed-tensors"
    QUANT_METHOD = "compressed-tensors"
    SUFFIXES = ("_packed", "_scale", "_global_scale")

    @staticmethod
    def looks_like(ts: _files.Tensors) -> bool:
        return any(n.endswith("_packed") and ts.dtype(n) == "U8" for n in ts.entries)

    @classmethod
    def stems(cls, ts: _files.Tensors) -> dict[str, tuple[str, ...]]:
        return _stems(ts, "_packed", cls.SUFFIXES, "compressed-tensors", "_zero_point")

    @classmethod
    def decode(cls, ts, stem, names, hint, notes: list) -> MXTensor:
        codes, scales, glob = names[:3]
        packed, scale = _codes_and_scales(ts, codes, scales, cls.NAME)
        g = _scalar(ts, glob, "the weight's global scale")
        if len(names) == 4:
            zero = ts.read(names[3])
            if np.any(zero.astype(np.float32) != 0):
                raise ValueError(
                    f"{ts.where(names[3])} is not all zeros; NVFP4 is symmetric, and jaxmx "
                    "holds no zero point"
                )
        with np.errstate(all="ignore"):
            tensor_scale = np.float32(1) / g
        differ = _division_differs(_used_scales(scale), g, tensor_scale)
        if differ:
            notes.append(f"{stem} ({differ} of {scale.size} blocks)")
        return _mx.build(packed, scale, FORMAT, BLOCK, hint, tensor_scale)

    @classmethod
    def encode(cls, stem: str, t: MXTensor, where: str, notes: list) -> dict:
        packed, scale, tensor_scale = _encode_common(t, where, cls.NAME)
        g = _global_scale(tensor_scale, scale, stem, where, notes)
        return {
            stem + "_packed": packed,
            stem + "_scale": scale,
            stem + "_global_scale": np.asarray([g], np.float32),
        }

    @staticmethod
    def config(mx_stems: list[str], plain_names: list[str]) -> dict:
        scheme = {
            "num_bits": 4,
            "type": "float",
            "strategy": "tensor_group",
            "group_size": BLOCK,
            "symmetric": True,
        }
        acts = any(n.endswith("input_global_scale") for n in plain_names)
        group = {
            "targets": sorted({_module(s) for s in mx_stems}),
            "weights": {**scheme, "dynamic": False},
            "input_activations": {**scheme, "dynamic": "local"} if acts else None,
            "output_activations": None,
            "format": "nvfp4-pack-quantized",
        }
        qc = {
            "quant_method": CompressedTensors.QUANT_METHOD,
            "format": "nvfp4-pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {"group_0": group},
            "ignore": [],
            "kv_cache_scheme": None,
        }
        return {_files.CONFIG_FILE: {"quantization_config": qc}}


def _global_scale(ts: np.float32, scale: np.ndarray, stem: str, where: str, notes: list):
    """A float32 g with f32(1 / g) == ts, its division agreeing with ts where one does."""
    with np.errstate(all="ignore"):
        first = np.float32(1) / ts
        cands = [first]
        for direction in (np.float32(np.inf), np.float32(-np.inf)):
            c = first
            for _ in range(2):
                c = np.nextafter(c, direction, dtype=np.float32)
                cands.append(c)
        valid = [c for c in cands if _bits(np.float32(1) / c) == _bits(ts)]
    if not valid:
        raise ValueError(
            f"{where} has the tensor scale {float(ts)!r}, which is not the float32 reciprocal "
            "of any float32 near 1 / tensor_scale; compressed-tensors stores the tensor scale "
            "as its reciprocal (global_scale), which would not load back to the same value: "
            "save it with layout='modelopt' (which stores the tensor scale itself) or "
            "layout='jaxmx'"
        )
    used = _used_scales(scale)
    counts = [_division_differs(used, c, ts) for c in valid]
    best = int(np.argmin(counts))
    if counts[best]:
        notes.append(f"{stem} ({counts[best]} of {scale.size} blocks)")
    return valid[best]


# --------------------------------------------------------------------------
# ModelOpt.
# --------------------------------------------------------------------------


class ModelOpt(_files.Codec):
    NAME = "modelopt"
    QUANT_METHOD = "modelopt"
    SUFFIXES = ("", "_scale", "_scale_2")

    @classmethod
    def claims(cls, config: dict | None, quant: dict | None) -> bool:
        """Its quant_method (or quant_library), or an hf_quant_config.json with a quantization."""
        qc = (config or {}).get("quantization_config")
        if isinstance(qc, dict) and cls.QUANT_METHOD in (
            qc.get("quant_method"),
            qc.get("quant_library"),
        ):
            return True
        return isinstance(quant, dict) and isinstance(quant.get("quantization"), dict)

    @staticmethod
    def looks_like(ts: _files.Tensors) -> bool:
        return any(n.endswith("_scale_2") for n in ts.entries)

    @classmethod
    def stems(cls, ts: _files.Tensors) -> dict[str, tuple[str, ...]]:
        return _stems(ts, "_scale_2", cls.SUFFIXES, "ModelOpt")

    @classmethod
    def decode(cls, ts, stem, names, hint, notes: list) -> MXTensor:
        packed, scale = _codes_and_scales(ts, names[0], names[1], cls.NAME)
        tensor_scale = _scalar(ts, names[2], "the weight's second-level scale (weight_scale_2)")
        return _mx.build(packed, scale, FORMAT, BLOCK, hint, tensor_scale)

    @classmethod
    def encode(cls, stem: str, t: MXTensor, where: str, notes: list) -> dict:
        packed, scale, tensor_scale = _encode_common(t, where, cls.NAME)
        scale_2 = np.asarray(tensor_scale, np.float32).reshape(())
        return {stem: packed, stem + "_scale": scale, stem + "_scale_2": scale_2}

    @staticmethod
    def config(mx_stems: list[str], plain_names: list[str]) -> dict:
        quantized = {_module(s) for s in mx_stems}
        exclude = sorted({_module(n) for n in plain_names if n.endswith(".weight")} - quantized)
        producer = {"name": "jaxmx"}
        hf_quant = {
            "producer": producer,
            "quantization": {
                "quant_algo": "NVFP4",
                "kv_cache_quant_algo": None,
                "group_size": BLOCK,
                "exclude_modules": exclude,
            },
        }
        qc = {
            "quant_method": ModelOpt.QUANT_METHOD,
            "quant_algo": "NVFP4",
            "group_size": BLOCK,
            "ignore": exclude,
            "producer": producer,
        }
        return {
            _files.MODELOPT_CONFIG_FILE: hf_quant,
            _files.CONFIG_FILE: {"quantization_config": qc},
        }
