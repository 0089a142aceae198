"""What every fused kernel shares around its body: which specs it takes, and which backend runs it.

* :data:`KERNELS`: the kernel bodies of each family that has them;
  :func:`unsupported_reason` says why a spec is not taken (the error
  message), :func:`whole_blocks` where the family itself refuses partial
  blocks.
* which backend runs a kernel is :func:`jaxmx.pallas._choice.dispatch`'s
  choice; :data:`INTERPRET`, :data:`IMPLEMENTATIONS` and
  :func:`check_implementation` are :mod:`jaxmx.pallas._choice`'s, here for
  the quantize kernels' modules.
* :func:`make`: the MXTensor of a kernel's raw codes and biased scales,
  the same leaves and metadata as the family's XLA path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import DTypeLike

from jaxmx import codes
from jaxmx.bitstream import pack_codes
from jaxmx.families._common import make_tensor
from jaxmx.formats import ScaleFormat
from jaxmx.pallas import _bits, _nvfp4, _ocp
from jaxmx.pallas._choice import IMPLEMENTATIONS, INTERPRET, check_implementation
from jaxmx.spec import QuantSpec
from jaxmx.tensor import MXTensor

# The kernel bodies of each family that has them.
KERNELS = {"ocp": _ocp, "nvfp4": _nvfp4}


def unsupported_reason(spec: QuantSpec, dtype: DTypeLike = jnp.float32) -> str | None:
    """Why the kernels cannot quantize as ``spec`` (an error message), or None."""
    family = spec.format.family
    if family not in KERNELS:
        return (
            f"jaxmx's Pallas kernels cover the families {', '.join(sorted(KERNELS))}; "
            f"{spec.format.name} is of family {family!r}"
        )
    reason = KERNELS[family].supported(spec)
    if reason is not None:
        return reason
    bs = spec.block_size
    if not isinstance(bs, int) or bs < 2 or bs > 1024 or bs & (bs - 1):
        return (
            f"the Pallas kernels take block sizes that are powers of two from 2 to 1024 "
            f"(Triton tiles are powers of two); got block_size={bs!r}"
        )
    if np.dtype(dtype) not in _bits.CARRIER:
        return f"the Pallas kernels take float32, bfloat16 or float16 input, got {dtype}"
    return None


def check(spec: QuantSpec, x: jax.Array) -> None:
    """Raises the error of :func:`unsupported_reason`, if any."""
    reason = unsupported_reason(spec, x.dtype)
    if reason is not None:
        raise ValueError(f"implementation='pallas': {reason}; implementation='xla' takes it")


def whole_blocks(spec: QuantSpec, shape: tuple[int, ...]) -> bool:
    """False where the family refuses a partial block (its references have none)."""
    return spec.rules.block_sizes != "tiles" or shape[spec.axis] % block_size(spec) == 0


def block_size(spec: QuantSpec) -> int:
    """The block size of a spec the kernels take (:func:`unsupported_reason`)."""
    bs = spec.block_size
    # unsupported_reason refuses tiles (a pair) and None before any kernel runs.
    assert isinstance(bs, int), f"a kernel reached with block_size={bs!r}"
    return bs


def _scale(spec: QuantSpec) -> ScaleFormat:
    """The block scale's format: both families with kernels have one (E8M0, E4M3)."""
    scale = spec.format.scale
    assert scale is not None, f"{spec.format.name}: a kernel family without a block scale"
    return scale


def make(
    spec: QuantSpec,
    x: jax.Array,
    raw: jax.Array,
    biased: jax.Array,
    tensor_scale: jax.Array | None,
) -> MXTensor:
    """The MXTensor of ``x`` from a kernel's outputs, laid out as the family's.

    ``raw``: the wire codes, shaped as ``x``; ``biased``: the scale bytes,
    shaped as the tensor's scales; ``tensor_scale``: the float32 pattern of
    the per-tensor scale of formats that have one.
    """
    elem = spec.format.element
    if spec.packed:
        data = pack_codes(raw, elem.bits, spec.axis)
    else:
        data = codes.raw_to_storage(raw, elem)
    scale = lax.bitcast_convert_type(biased, _scale(spec).storage_dtype)
    if not spec.format.tensor_scale:
        return make_tensor(spec, x, data, scale)
    assert tensor_scale is not None, f"{spec.format.name}: a tensor scale is needed"
    return make_tensor(
        spec, x, data, scale, tensor_scale=_bits.from_carrier(tensor_scale, jnp.float32)
    )


__all__ = [
    "IMPLEMENTATIONS",
    "INTERPRET",
    "KERNELS",
    "check",
    "check_implementation",
    "make",
    "unsupported_reason",
    "whole_blocks",
]
