"""Block-scaled hardware matmuls through ``jax.lax.scaled_dot``.

NVIDIA Blackwell-class GPUs (compute capability 10.x and 12.x) multiply
MXFP8 and MXFP4 blocks natively: the tensor cores read the element codes
and the E8M0 scales and accumulate in float32. JAX reaches them through
``jax.lax.scaled_dot``, which on other backends lowers to a reference
decomposition (dequantize to bfloat16, then ``dot_general``), so the same
call runs everywhere and serves as a cross-check of the emulation.

``DotConfig.implementation`` chooses: ``None`` (native where the platform
being lowered has it and the operands fit), ``"xla"`` (always emulate), or
``"native"`` (``lax.scaled_dot`` for the forward and both backward matmuls
wherever it runs; operands that do not fit raise an error that says why).
The emulated and native paths agree up to float32 summation order, except
that the reference decomposition flushes float32 subnormals (MX values
below 2^-126) on CPU. NVFP4 operands pass their E4M3 block scales to
``lax.scaled_dot`` and multiply the product by both tensor scales after it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxmx.codes import storage_to_raw
from jaxmx.config import DotConfig
from jaxmx.formats import MXFormat, get_family
from jaxmx.platforms import PLATFORMS, Platform

if TYPE_CHECKING:  # annotations only: jaxmx.tensor's import chain reaches this module
    from jaxmx.tensor import MXTensor

__all__ = ["has_native_mx", "unsupported_reason"]


@functools.cache
def has_native_mx(platform: Platform | str = "cuda") -> bool:
    """Whether ``platform`` multiplies MX blocks in hardware here.

    A platform record that lists ``"scaled_dot"`` (cuda) has it where one of
    this process's devices of that platform has compute capability 10 or
    newer (Blackwell); without such a device (a CPU host exporting for
    cuda), the emulated matmul is lowered.

    >>> import jaxmx
    >>> jaxmx.native.has_native_mx("cpu"), jaxmx.native.has_native_mx("cuda")  # no GPU here
    (False, False)
    """
    rec = platform if isinstance(platform, Platform) else PLATFORMS[platform]
    return "scaled_dot" in rec.native and _newest_compute_capability(rec.name) >= 10


@functools.cache
def _newest_compute_capability(name: str) -> int:
    try:
        devices = jax.devices(name)
    except RuntimeError:  # no such backend in this process
        return 0
    majors = [0]
    for d in devices:
        try:
            majors.append(int(str(getattr(d, "compute_capability", "0")).split(".")[0]))
        except ValueError:
            continue
    return max(majors)


def unsupported_reason(
    a_fmt: MXFormat | None,
    b_fmt: MXFormat | None,
    a_contract: tuple[int, ...],
    a_shape: tuple[int, ...],
    block_sizes: tuple[Any, Any],
) -> str | None:
    """Why a matmul cannot run as ``lax.scaled_dot``; ``None`` when it can.

    ``a_contract`` / ``a_shape``: the left operand's contracting axes and
    shape (the right operand's are paired with them, so they agree).
    ``block_sizes``: each operand's block size (an int, or a pair for 2-D
    tiles).
    """
    if a_fmt is None or b_fmt is None:
        return "an operand is not quantized"
    for f in (a_fmt, b_fmt):
        if "scaled_dot" not in get_family(f).native_matmuls(f):
            return f"{f.name} has no native block-scaled matmul (those: MXFP8, MXFP4, NVFP4)"
    if not a_contract:
        return "nothing to contract"  # paired axes: b contracts as many as a
    if any(isinstance(bs, tuple) for bs in block_sizes):
        return "2-D tiles (rhs_block_size=(rows, columns)) are not blocks along the contraction"
    bs_a, bs_b = block_sizes
    if bs_a != bs_b:
        return f"block sizes differ ({bs_a} vs {bs_b})"
    k = a_shape[a_contract[-1]]
    if k % bs_a:
        return f"contraction length {k} is not a multiple of the block size {bs_a}"
    return None


def use_native(config: DotConfig, reason: str | None, platform: Platform) -> bool:
    """Applies ``config.implementation`` to one matmul whose fit is ``reason``,
    lowered for ``platform``."""
    if config.implementation in ("xla", "pallas"):
        return False
    if config.implementation == "native":
        if reason is not None:
            raise ValueError(
                f"DotConfig(implementation='native') but this matmul cannot run as "
                f"lax.scaled_dot: {reason}; implementation='xla' (exact emulation) runs it"
            )
        return True
    return reason is None and has_native_mx(platform)


def scaled_dot(a: MXTensor, b: MXTensor, dims: Any, out_dtype: Any) -> jax.Array:
    """``lax.scaled_dot`` of two MXTensors blocked along their contracting axes.

    ``lax.scaled_dot`` takes operands of equal rank, so both are brought to
    (batch, free, contracting) form first; the result is dot_general's layout.
    """
    (lc, rc), (lb, rb) = dims
    a3, a_free = _canonical(a, tuple(lc), tuple(lb))
    b3, b_free = _canonical(b, tuple(rc), tuple(rb))
    out = lax.scaled_dot(
        a3.data,
        b3.data,
        lhs_scale=a3.scale,
        rhs_scale=b3.scale,
        dimension_numbers=(((2,), (2,)), ((0,), (0,))),
        preferred_element_type=jnp.float32,
    )
    for t in (a, b):  # NVFP4: the per-tensor decode scales, folded into the product
        if t.tensor_scale is not None:
            out = out * t.tensor_scale
    batch = tuple(a.data.shape[i] for i in lb)
    return out.reshape(batch + a_free + b_free).astype(out_dtype)


def _canonical(t: MXTensor, contract: tuple[int, ...], batch: tuple[int, ...]) -> Any:
    """Transposes/reshapes an MXTensor to (prod(batch), prod(free), prod(contract)).

    Several contracting axes merge into one; blocks run along the last of
    them, whose length is a multiple of the block size, so every block stays
    whole and in place.
    """
    t = t.canonical()
    elem = t.format.element
    if t.data.dtype != elem.storage_dtype:  # 4-bit codes held in bytes on CPU
        raw = storage_to_raw(t.data, elem)
        t = dataclasses.replace(
            t, data=lax.bitcast_convert_type(raw.astype(jnp.uint4), elem.storage_dtype)
        )
    shape = t.data.shape
    free = tuple(i for i in range(len(shape)) if i not in contract and i not in batch)
    perm = (*batch, *free, *contract)
    nb = math.prod(shape[i] for i in batch)
    nf = math.prod(shape[i] for i in free)
    data = jnp.transpose(t.data, perm).reshape(nb, nf, -1)
    scale = jnp.transpose(t.scale, perm).reshape(nb, nf, -1)
    return dataclasses.replace(t, data=data, scale=scale, axis=-1), tuple(shape[i] for i in free)
