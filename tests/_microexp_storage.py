"""Packed storage of the BDR codes at their real width, as a model of Quark's sizes.

Test helpers: jaxmx stores MX9/MX6/MX4/MSFP tensors packed through
:func:`jaxmx.pack` (the same little-endian bit stream); these functions pack
the raw arrays of :mod:`jaxmx.families.microexp._kernels` directly, so the tests can
check the stored sizes against the BDR paper's bits per element.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxmx.bitstream import pack_codes, unpack_codes
from jaxmx.blocks import packed_length
from jaxmx.families.microexp._kernels import MicroexpSpec, get_spec, quantize
from jaxmx.families.microexp._spec import check_axis as _check_axis

__all__ = ["nbytes", "pack", "quantize", "unpack"]


def pack(
    mantissas, micro, spec: str | MicroexpSpec, *, axis: int = -1
) -> tuple[jax.Array, jax.Array | None]:
    """Codes and micro bits packed into bytes at their real width.

    Codes take ``element_bits`` each (MX9/MSFP16: one byte; MX6: 8 codes in
    5 bytes; MX4: 8 in 3; MSFP12: 2 per byte), micro bits 8 per byte; both
    as jaxmx.packing's little-endian bit stream along ``axis`` (a partial
    group padded with zero codes). The shared exponents are already one
    byte per block and are not touched.

    Returns:
      ``(packed_codes, packed_micro)``: uint8, the axis of length
      ``packed_length(n, element_bits)`` and ``packed_length(micro_n, 1)``;
      ``packed_micro`` is ``None`` without microexponents.

    >>> import jax.numpy as jnp
    >>> q = quantize(jnp.linspace(-1.0, 1.0, 32), "mx6")
    >>> pc, pm = pack(q.mantissas, q.micro, "mx6")
    >>> pc.shape, pm.shape  # 32 x 5 bits, 16 micro bits
    ((20,), (2,))
    """
    spec = get_spec(spec)
    mantissas = jnp.asarray(mantissas)
    if mantissas.dtype != jnp.uint8 or mantissas.ndim == 0:
        raise TypeError(f"mantissas must be a uint8 array, got {mantissas.dtype}{mantissas.shape}")
    axis = _check_axis(axis, mantissas.ndim)
    if (micro is None) != (spec.sub_block_size is None):
        raise ValueError(
            f"{spec.name} {'has no' if micro is not None else 'needs'} micro bits; "
            f"got micro={'None' if micro is None else 'an array'}"
        )
    return _pack(mantissas, None if micro is None else jnp.asarray(micro), spec, axis)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _pack(mantissas, micro, spec: MicroexpSpec, axis: int):
    pc = pack_codes(mantissas, spec.element_bits, axis)
    pm = None if micro is None else pack_codes(micro.astype(jnp.uint8), 1, axis)
    return pc, pm


def unpack(
    packed_codes, packed_micro, spec: str | MicroexpSpec, *, length: int, axis: int = -1
) -> tuple[jax.Array, jax.Array | None]:
    """Inverse of :func:`pack`: ``(mantissas, micro)`` for ``length`` elements along ``axis``.

    >>> import jax.numpy as jnp
    >>> q = quantize(jnp.linspace(-1.0, 1.0, 40), "mx4")
    >>> m, mi = unpack(*pack(q.mantissas, q.micro, "mx4"), "mx4", length=40)
    >>> bool((m == q.mantissas).all() & (mi == q.micro).all())
    True
    """
    spec = get_spec(spec)
    packed_codes = jnp.asarray(packed_codes)
    if packed_codes.dtype != jnp.uint8 or packed_codes.ndim == 0:
        raise TypeError(f"packed_codes must be a uint8 array, got {packed_codes.dtype}")
    axis = _check_axis(axis, packed_codes.ndim)
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    length = int(length)
    want = packed_length(length, spec.element_bits)
    if packed_codes.shape[axis] != want:
        raise ValueError(
            f"packed_codes has {packed_codes.shape[axis]} bytes along axis {axis}; "
            f"{length} {spec.name} codes take {want}"
        )
    if (packed_micro is None) != (spec.sub_block_size is None):
        raise ValueError(f"packed_micro must be None exactly when {spec.name} has no micro bits")
    return _unpack(
        packed_codes,
        None if packed_micro is None else jnp.asarray(packed_micro),
        spec,
        axis,
        length,
    )


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _unpack(packed_codes, packed_micro, spec: MicroexpSpec, axis: int, length: int):
    codes = unpack_codes(packed_codes, spec.element_bits, axis, length)
    micro = None
    if packed_micro is not None:
        n_micro = -(-length // spec.block_size) * spec.subs_per_block
        micro = unpack_codes(packed_micro, 1, axis, n_micro)
    return codes, micro


def nbytes(shape, spec: str | MicroexpSpec, *, axis: int = -1) -> int:
    """Bytes a packed tensor of ``shape`` takes: codes + micro bits + exponents.

    Whole blocks give ``bits_per_element * size / 8`` exactly; a partial last
    block costs its padding.

    >>> nbytes((16, 128), "mx9"), nbytes((16, 128), "msfp16"), nbytes((16, 128), "mx4")
    (2304, 2176, 1024)
    """
    spec = get_spec(spec)
    shape = tuple(int(s) for s in shape)
    axis = _check_axis(axis, len(shape))
    n = shape[axis]
    rest = int(np.prod(shape)) // n if n else 0
    nb = -(-n // spec.block_size)
    per_row = packed_length(n, spec.element_bits) + nb
    if spec.sub_block_size is not None:
        per_row += packed_length(nb * spec.subs_per_block, 1)
    return rest * per_row
