"""The weight-only matmul for serving: ``x @ W`` with ``W`` read as stored (an MXTensor).

``W`` is a weight of shape ``(K, N)`` (a Dense kernel ``(in_features,
out_features)``) quantized with blocks along K, the contraction axis, which
is how :func:`jaxmx.quantize_params` stores it. The kernel
(``implementation="pallas"``) reads its codes and scales from HBM, decodes
them a tile at a time in on-chip memory (VMEM on a TPU, registers and
shared memory on a GPU) and accumulates in float32: the decoded ``W`` is
never written to HBM. The tiling is :mod:`jaxmx.pallas._wtiles`', the
decode :mod:`jaxmx.pallas._wdecode`'s.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from jaxmx import codes, numerics, platforms
from jaxmx.pallas import _wtiles
from jaxmx.pallas._choice import INTERPRET, check_implementation, dispatch
from jaxmx.pallas._wdecode import Weight
from jaxmx.tensor import MXTensor

__all__ = ["weight_only_matmul"]

# Block sizes the kernel takes: a block covers whole sublane tiles of code
# rows (8 or more when packed) and divides the backends' K steps.
BLOCK_SIZES = (16, 32, 64, 128)
# x dtypes the kernel multiplies in (others are converted to float32, exactly).
COMPUTE_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float32))


def weight_only_matmul(
    x: ArrayLike,
    w: MXTensor,
    *,
    out_dtype: DTypeLike | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """``x @ w`` for a float activation ``x`` and an MXTensor weight ``w``.

    ``implementation="pallas"`` runs a fused kernel that reads ``w``'s codes
    (packed or not) and scales, decodes them tile by tile in on-chip memory
    and accumulates in float32, never writing the decoded weight to HBM:
    Mosaic on TPUs, Triton on NVIDIA GPUs, chosen when the program is
    lowered (as :func:`jaxmx.quantize`'s kernels are; under
    :func:`jaxmx.pallas.interpret` it runs in Pallas's interpreter). It
    takes weights of shape ``(K, N)`` blocked along axis 0 (K, the
    contraction axis) in the formats of the OCP MX family with float elements
    (MXFP8 E4M3/E5M2, MXFP6 E3M2/E2M3 unpacked, MXFP4 packed or not) and
    NVFP4 (packed or not), with blocks of 16 to 128 and K a multiple of the
    block size. bfloat16 ``x`` is multiplied in bfloat16 (every decoded MX
    value is a bfloat16 number, and so are NVFP4's before its tensor scale)
    and float32 ``x`` in float32, with float32 accumulation either way.

    ``"xla"`` (and ``None``, the default until the kernel has been measured
    on hardware) is ``x @ w.dequantize(float32)`` with float32 accumulation,
    for any MXTensor of shape ``(K, N)``.

    Args:
      x: ``(..., K)`` float array; its leading axes are flattened into the
        rows of the product.
      w: ``(K, N)`` :class:`~jaxmx.MXTensor`.
      out_dtype: dtype of the result (float32, bfloat16, float16); default ``x``'s.
      implementation: None (``"xla"``), ``"xla"`` or ``"pallas"``.

    Returns:
      ``(..., N)`` array of ``out_dtype``.

    Raises:
      TypeError: ``w`` is not an MXTensor, or ``x`` or ``out_dtype`` is not float.
      ValueError: the shapes do not match, or (``"pallas"``) ``w``'s layout,
        format, packing or block size is not one the kernel takes.

    >>> import jax, jax.numpy as jnp, jaxmx
    >>> w = jaxmx.quantize(jax.random.normal(jax.random.key(0), (64, 48)), "mxfp4",
    ...                    axis=0, packed=True)
    >>> x = jnp.ones((3, 64), jnp.bfloat16)
    >>> with jaxmx.pallas.interpret("triton"):
    ...     y = jaxmx.pallas.weight_only_matmul(x, w, implementation="pallas")
    >>> ref = jaxmx.pallas.weight_only_matmul(x, w)
    >>> y.shape, y.dtype, bool(jnp.allclose(y.astype(float), ref.astype(float), rtol=1e-2))
    ((3, 48), dtype(bfloat16), True)
    """
    impl = check_implementation(implementation)
    if not isinstance(w, MXTensor):
        raise TypeError(f"weight_only_matmul: w must be an MXTensor, got {type(w).__name__}")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"weight_only_matmul: x must be a float array, got dtype {x.dtype}")
    if w.ndim != 2:
        raise ValueError(
            f"weight_only_matmul: w must be a 2-D MXTensor (K, N), got shape {w.shape}"
        )
    k, n = w.shape
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(
            f"weight_only_matmul: x of shape {x.shape} cannot multiply w of shape {w.shape}: "
            f"x's last axis must be K={k}"
        )
    out = numerics.check_out_dtype(x.dtype if out_dtype is None else out_dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if impl == "pallas":
        weight = check_weight(w)
        if x2.size and n:
            y = _pallas(x2, w, weight, out, INTERPRET.get(), platforms.forced())
            return y.reshape(*lead, n)
    return _xla(x2, w, out).reshape(*lead, n)


def check_weight(w: MXTensor) -> Weight:
    """The kernel's description of ``w``, or a ValueError naming what it takes."""
    fmt = w.format
    axis = w.block_axis() + w.ndim
    if axis != 0:
        raise ValueError(
            f"implementation='pallas': w ({fmt.name}, shape {w.shape}) is blocked along axis "
            f"{axis}; the kernel takes weights (K, N) blocked along axis 0, the contraction "
            "axis K, as jaxmx.quantize_params stores a Dense kernel (in_features, "
            "out_features): quantize with axis=0, or use implementation='xla'"
        )
    elem = fmt.element
    if fmt.family not in ("ocp", "nvfp4") or elem.kind != "float" or fmt.scale is None:
        raise ValueError(
            f"implementation='pallas': the weight-only kernel takes the OCP MX formats with "
            f"float elements (mxfp8_e4m3, mxfp8_e5m2, mxfp6_e3m2, mxfp6_e2m3, mxfp4_e2m1) and "
            f"nvfp4; got {fmt.name} (family {fmt.family!r}, {elem.kind} elements); "
            "implementation='xla' takes every format"
        )
    if w.packed and elem.bits != 4:
        raise ValueError(
            f"implementation='pallas': the kernel unpacks 4-bit codes (two per byte); "
            f"w holds packed {elem.bits}-bit {fmt.name} codes: jaxmx.unpack(w) first, "
            "or use implementation='xla'"
        )
    bs = w.block_size
    if not isinstance(bs, int) or bs not in BLOCK_SIZES:
        raise ValueError(
            f"implementation='pallas': the kernel takes block sizes "
            f"{', '.join(map(str, BLOCK_SIZES))} along K; w has block_size={bs!r}"
        )
    if w.length % bs:
        raise ValueError(
            f"implementation='pallas': K={w.length} is not a multiple of w's block size {bs} "
            "(its last block is partial); the kernel takes whole blocks. Use "
            "implementation='xla'"
        )
    if w.tensor_scale is not None and w.tensor_scale.ndim:
        raise ValueError(
            f"implementation='pallas': w's tensor scale has shape {w.tensor_scale.shape}; the "
            "kernel takes one scalar tensor scale"
        )
    return Weight(family=fmt.family, element=elem, block_size=bs, packed=bool(w.packed))


@functools.partial(jax.jit, static_argnums=(2,))
def _xla(x: jax.Array, w: MXTensor, out: np.dtype) -> jax.Array:
    wd = w.dequantize(jnp.float32)
    hi = lax.Precision.HIGHEST
    y = jnp.dot(x.astype(jnp.float32), wd, precision=hi, preferred_element_type=jnp.float32)
    return y.astype(out)


# The forced platform is static: it decides the codes' storage dtype, and so
# the conversion to raw codes, and must be part of the jit cache key.


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _pallas(
    x: jax.Array,
    w: MXTensor,
    weight: Weight,
    out: np.dtype,
    interpret_as: str | None,
    forced: platforms.Platform | None,
) -> jax.Array:
    if np.dtype(x.dtype) not in COMPUTE_DTYPES:
        x = x.astype(jnp.float32)  # float16: exact in float32
    # The leaves as bytes: free bit-casts of packed, float8 and uint8 codes
    # (float4 codes, held unpacked on accelerators, are widened to a byte).
    raw = w.data if w.packed else codes.storage_to_raw(w.data, weight.element)
    scales = lax.bitcast_convert_type(w.scale, jnp.uint8)
    ins = [x, raw, scales]
    if weight.tensor_scale:
        ins.append(jnp.asarray(w.tensor_scale, jnp.float32).reshape(1, 1))
    shape = jax.ShapeDtypeStruct((x.shape[0], raw.shape[1]), out)
    call = functools.partial(_wtiles.run, weight, out)
    (y,) = dispatch(call, ins, [shape], interpret_as)
    return y
