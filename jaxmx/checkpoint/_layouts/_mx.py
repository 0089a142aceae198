"""FP4 MXTensors <-> the bytes the layouts store: checks, and building the tensor.

Every layout here stores two E2M1 codes per byte along the last (input)
axis, element ``2i`` in the low nibble and ``2i + 1`` in the high one, each
code a sign bit (bit 3) over a 3-bit magnitude (0, 0.5, 1, 1.5, 2, 3, 4, 6).
That is jaxmx's own 4-bit packing (:mod:`jaxmx.bitstream`), so the file's
bytes are a packed MXTensor's ``data`` as they are: a load takes them as
that (and unpacks them only for a tensor saved unpacked), a save writes
the data of :func:`jaxmx.pack` of the tensor. tests/test_layouts.py checks
the bytes against a NumPy packer of the layouts' order, written out there.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxmx.checkpoint._layouts import _files
from jaxmx.formats import get_format
from jaxmx.packing import pack, unpack
from jaxmx.tensor import MXTensor, check_leaves


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


def packed_codes(t: MXTensor) -> np.ndarray:
    """The packed E2M1 codes of a checked MXTensor: uint8 (..., n / 2), the file's bytes."""
    return _files.host(pack(t).data)


def build(
    packed: np.ndarray,
    scale: np.ndarray,
    fmt: str,
    block: int,
    hint: dict | None,
    tensor_scale: np.ndarray | None = None,
) -> MXTensor:
    """The MXTensor of packed codes (uint8 (..., n / 2)) and scales, as the file's hint says.

    Without a hint it stands for float32 (every value of these formats is a
    float32 number, so its float32 decode is exact) and its codes are packed.
    """
    t = MXTensor(
        data=jnp.asarray(packed),
        scale=jnp.asarray(scale),
        format=get_format(fmt),
        axis=-1,
        block_size=block,
        length=2 * packed.shape[-1],  # two codes a byte
        dtype=np.dtype((hint or {}).get("dtype", "float32")),
        packed=True,
        made_ndim=packed.ndim,
        tensor_scale=None if tensor_scale is None else jnp.asarray(tensor_scale),
    )
    if hint is not None and not hint["packed"]:
        t = unpack(t)
    check_leaves(t)
    return t


def hint_of(t: MXTensor) -> dict:
    """What save records for an MXTensor beyond its codes and scales."""
    return {"dtype": np.dtype(t.dtype).name, "packed": bool(t.packed)}
