"""FP4 MXTensors <-> the bytes the layouts store: checks, nibbles, and building the tensor.

Every layout here stores two E2M1 codes per byte along the last (input)
axis, element ``2i`` in the low nibble and ``2i + 1`` in the high one, each
code a sign bit (bit 3) over a 3-bit magnitude (0, 0.5, 1, 1.5, 2, 3, 4, 6).
That is written out here, in NumPy, rather than taken from jaxmx's own
packing, so the files keep the layout's order whatever order jaxmx packs in:
a load unpacks the file's bytes to codes and packs them with
:func:`jaxmx.bitstream.pack_codes`; a save does the reverse.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxmx import bitstream, codes
from jaxmx.checkpoint._layouts import _files
from jaxmx.formats import get_format
from jaxmx.tensor import MXTensor, check_leaves


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8 (..., n) -> uint8 E2M1 codes (..., 2n), low nibble first."""
    out = np.empty(packed.shape[:-1] + (2 * packed.shape[-1],), np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def pack_nibbles(raw: np.ndarray) -> np.ndarray:
    """uint8 E2M1 codes (..., 2n) -> uint8 (..., n), even element in the low nibble."""
    return (raw[..., 0::2] | (raw[..., 1::2] << 4)).astype(np.uint8)


def check(t: MXTensor, where: str, layout: str, fmt: str, block: int, rank2: bool) -> None:
    """Refuses an MXTensor the layout cannot hold, saying what it takes."""
    want = get_format(fmt)
    takes = (
        f"the {layout} layout holds {want.name} tensors with blocks of {block} along the last "
        f"axis{' of a 2-D (out_features, in_features) weight' if rank2 else ''}"
    )
    if t.format != want:
        raise ValueError(f"{where} is a {t.format.name} MXTensor; {takes}")
    try:
        check_leaves(t)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if t.block_size != block:
        raise ValueError(f"{where} has block_size {t.block_size!r}; {takes}")
    axis = t.block_axis()
    if axis != -1:
        raise ValueError(
            f"{where} has its blocks along axis {axis} of shape {t.shape}; {takes}: "
            "transpose it first (t.T moves the blocks with the axes, exactly)"
        )
    if t.length % block:
        raise ValueError(
            f"{where} has {t.length} elements along its block axis, a partial last block; "
            f"{takes}, all whole"
        )
    if rank2 and t.ndim != 2:
        raise ValueError(f"{where} has shape {t.shape}; {takes}")
    if t.tensor_scale is not None and t.tensor_scale.ndim:
        raise ValueError(
            f"{where} has one tensor scale per item (shape {tuple(t.tensor_scale.shape)}, "
            f"made under vmap); {takes} and one tensor scale"
        )


def raw_codes(t: MXTensor) -> np.ndarray:
    """The E2M1 codes of a checked MXTensor, one per uint8, blocks along the last axis."""
    elem = t.format.element
    if t.packed:
        raw = bitstream.unpack_codes(t.data, elem.bits, -1, t.length)
    else:
        raw = codes.storage_to_raw(t.data, elem)
    return _files.host(raw).astype(np.uint8)


def build(
    raw: np.ndarray,
    scale: np.ndarray,
    fmt: str,
    block: int,
    hint: dict | None,
    tensor_scale: np.ndarray | None = None,
) -> MXTensor:
    """The MXTensor of codes (uint8, one per element) and scales, as the file's hint says.

    Without a hint it stands for float32 (every value of these formats is a
    float32 number, so its float32 decode is exact) and its codes are packed.
    """
    f = get_format(fmt)
    raw_j = jnp.asarray(raw)
    t = MXTensor(
        data=bitstream.pack_codes(raw_j, f.element.bits, -1),
        scale=jnp.asarray(scale),
        format=f,
        axis=-1,
        block_size=block,
        length=raw.shape[-1],
        dtype=np.dtype((hint or {}).get("dtype", "float32")),
        packed=True,
        made_ndim=raw.ndim,
        tensor_scale=None if tensor_scale is None else jnp.asarray(tensor_scale),
    )
    if hint is not None and not hint["packed"]:
        t = dataclasses.replace(t, data=codes.raw_to_storage(raw_j, f.element), packed=False)
    check_leaves(t)
    return t


def hint_of(t: MXTensor) -> dict:
    """What save records for an MXTensor beyond its codes and scales."""
    return {"dtype": np.dtype(t.dtype).name, "packed": bool(t.packed)}
