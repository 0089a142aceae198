"""The gpt-oss layout: OpenAI's MXFP4 weights (and Hugging Face's copy of them).

A weight ``W`` of shape ``(..., n)`` is two tensors:

* ``W_blocks`` (Hugging Face) or ``W.blocks`` (OpenAI's original files):
  uint8 of shape ``(..., n / 32, 16)``, the 32 E2M1 codes of each block in
  16 bytes, element ``2i`` in the low nibble;
* ``W_scales`` / ``W.scales``: uint8 of shape ``(..., n / 32)``, the E8M0
  exponent of each block, ``2^(byte - 127)``.

The reference decode (``gpt_oss/torch/weights.py``, ``_get_mxfp4_tensor``,
copied into ``transformers/integrations/mxfp4.py`` as
``convert_moe_packed_tensors``) looks each nibble up in the E2M1 table and
multiplies by ``ldexp(1, byte - 127)``: every result is exact, the same as
jaxmx's decode of the same codes and E8M0 scales, except for the byte 255,
which OCP MX (and jaxmx) read as NaN while ``ldexp`` gives ``2^128 = inf``
(so a nonzero code becomes +-inf, a zero one NaN). A block with scale byte
255 is therefore loaded (and saved) only when all of its codes are +-0, the
case where both decode to NaN; otherwise it is refused.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from jaxmx.checkpoint._layouts import _files, _mx
from jaxmx.tensor import MXTensor

NAME = "gpt-oss"
FORMAT = "mxfp4"
BLOCK = 32
BYTES = 16  # bytes per block
SUFFIXES = (("_blocks", "_scales"), (".blocks", ".scales"))  # Hugging Face's, OpenAI's
NAN_SCALE = 255
_E8M0 = np.dtype(ml_dtypes.float8_e8m0fnu)


class GptOss(_files.Codec):
    NAME = NAME
    QUANT_METHOD = "mxfp4"
    SUFFIXES = SUFFIXES[0]  # the names a save writes

    @staticmethod
    def config(mx_stems: list[str], plain_names: list[str]) -> dict:
        """The JSON files written next to the weights of a directory."""
        return {_files.CONFIG_FILE: {"quantization_config": {"quant_method": GptOss.QUANT_METHOD}}}

    @staticmethod
    def stems(ts: _files.Tensors) -> dict[str, tuple[str, str]]:
        """{weight name: (blocks tensor, scales tensor)} of every MXFP4 weight in the files."""
        out = {}
        for name in ts.entries:
            for b, s in SUFFIXES:
                for mine, other in ((b, s), (s, b)):
                    stem = name[: -len(mine)]
                    if name.endswith(mine) and stem + other not in ts.entries:
                        raise ValueError(
                            f"{ts.where(name)} has no tensor {stem + other!r} beside it (gpt-oss "
                            "stores each MXFP4 weight as two tensors, "
                            f"{stem + b!r} and {stem + s!r})"
                        )
                if name.endswith(b):
                    out[name[: -len(b)]] = (name, name[: -len(b)] + s)
        return out

    @staticmethod
    def looks_like(ts: _files.Tensors) -> bool:
        return any(n.endswith(("_blocks", ".blocks")) and ts.dtype(n) == "U8" for n in ts.entries)

    @staticmethod
    def decode(
        ts: _files.Tensors, stem: str, names: tuple, hint: dict | None, notes: list
    ) -> MXTensor:
        blocks_name, scales_name = names
        bshape, sshape = ts.shape(blocks_name), ts.shape(scales_name)
        if ts.dtype(blocks_name) != "U8" or len(bshape) < 2 or bshape[-1] != BYTES:
            raise ValueError(
                f"{ts.where(blocks_name)} is {ts.dtype(blocks_name)}{list(bshape)}; gpt-oss blocks "
                f"are U8 of shape (..., blocks, {BYTES}): {BLOCK} E2M1 codes in {BYTES} bytes"
            )
        if ts.dtype(scales_name) != "U8" or sshape != bshape[:-1]:
            raise ValueError(
                f"{ts.where(scales_name)} is {ts.dtype(scales_name)}{list(sshape)}; the scales of "
                f"blocks of shape {list(bshape)} are U8 (E8M0) of shape {list(bshape[:-1])}"
            )
        blocks, scales = ts.read(blocks_name), ts.read(scales_name)
        _check_nan_blocks(blocks, scales, ts.where(scales_name))
        packed = blocks.reshape(bshape[:-2] + (bshape[-2] * BYTES,))
        return _mx.build(packed, scales.view(_E8M0), FORMAT, BLOCK, hint)

    @staticmethod
    def encode(stem: str, t: MXTensor, where: str, notes: list) -> dict[str, np.ndarray]:
        _mx.check(t, where, NAME, FORMAT, BLOCK, rank2=False)
        packed = _mx.packed_codes(t)
        blocks = packed.reshape(packed.shape[:-1] + (packed.shape[-1] // BYTES, BYTES))
        scales = _files.host(t.scale).view(np.uint8)
        _check_nan_blocks(blocks, scales, where)
        return {stem + "_blocks": blocks, stem + "_scales": scales}


def _check_nan_blocks(blocks: np.ndarray, scales: np.ndarray, where: str) -> None:
    nan = scales == NAN_SCALE
    if not nan.any():
        return
    nonzero = ((blocks & 0x77) != 0).any(axis=-1) & nan  # magnitude bits of both nibbles
    if nonzero.any():
        at = tuple(int(i) for i in np.argwhere(nonzero)[0])
        raise ValueError(
            f"{where}: the block at {at} has the scale byte 255 and nonzero codes; OCP MX "
            "(and jaxmx) decode it to NaN, gpt-oss's reference decode (ldexp by 2^128) to "
            "+-inf, so no MXTensor holds it as gpt-oss reads it"
        )
