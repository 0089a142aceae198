"""What the families share: building their MXTensors, and GPTQ's per-entry grids."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmx import numerics
from jaxmx.spec import QuantSpec
from jaxmx.tensor import MXTensor


def make_tensor(spec: QuantSpec, x, data, scale, *, tensor_scale=None, micro=None) -> MXTensor:
    """The MXTensor of ``x`` quantized as ``spec`` from its leaves."""
    return MXTensor(
        data=data,
        scale=scale,
        format=spec.format,
        axis=spec.axis,
        block_size=spec.block_size,
        length=x.shape[spec.axis],
        dtype=np.dtype(x.dtype),
        packed=spec.packed,
        made_ndim=x.ndim,
        tensor_scale=tensor_scale,
        micro=micro,
    )


def expand(per_block, t: MXTensor, group: int | None = None):
    """A per-block (or, with ``group``, per-group) array repeated onto every entry of ``t``."""
    if isinstance(t.block_size, tuple):
        r, c = t.block_size
        return jnp.repeat(jnp.repeat(per_block, r, axis=-2), c, axis=-1)
    n = t.shape[t.axis]
    return lax.slice_in_dim(
        jnp.repeat(per_block, group or t.block_size, axis=t.axis), 0, n, axis=t.axis
    )


def to_grid(w, e, elem):
    """``w`` rounded to nearest even on the grid ``2^e * elem``, saturated (float32)."""
    bits = numerics.f32_to_bits(w)
    mag = bits & jnp.uint32(0x7FFFFFFF)
    out = numerics.round_magnitude(mag, e, elem) | (bits & jnp.uint32(0x80000000))
    return numerics.bits_to_f32(out)
