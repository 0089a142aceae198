"""Storage of element codes in an MXTensor.

Inside jaxmx an element is a sign bit plus a code magnitude (see
:func:`jaxmx.numerics.encode_magnitude`). In an MXTensor the element lives in
its storage dtype (:attr:`ElementFormat.storage_dtype`): the ml_dtypes float
where XLA has one (FP8, FP4), a uint8 holding the 6-bit code for FP6, and an
int8 holding the two's-complement integer for MXINT. The "raw" form used for
packing is a uint8 holding the ``bits``-wide code as stored on the wire
(sign-magnitude for floats, two's complement for integers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmx import platforms
from jaxmx.formats import ElementFormat

__all__ = [
    "raw_codes",
    "raw_dtype",
    "signed_codes",
    "raw_to_storage",
    "storage_dtype",
    "storage_to_raw",
    "split_codes",
]


def raw_dtype(bits: int) -> type[np.unsignedinteger]:
    """Unsigned dtype holding one ``bits``-wide wire code."""
    return jnp.uint8 if bits <= 8 else jnp.uint16


def storage_dtype(elem: ElementFormat) -> np.dtype:
    """dtype of the element codes of an unpacked MXTensor.

    The format's own ``storage_dtype`` (the ml_dtypes float where XLA has
    one), except for 4-bit floats, whose code is held in a uint8 as FP6
    codes are: XLA:CPU miscompiles some programs that carry
    ``float4_e2m1fn`` arrays (a ``lax.scan`` over them fails with "Invalid
    LLVM IR: bitcast i8 to i4"), and a dtype is part of a program's types,
    so it cannot follow the platform the program is lowered for. A forced
    accelerator platform (:func:`jaxmx.platforms.force`) holds them as
    float4. ``tests/test_regressions.py`` keeps the upstream failure under
    watch.
    """
    dtype = np.dtype(elem.storage_dtype)
    if elem.kind == "float" and dtype.itemsize * 8 != elem.bits:
        forced = platforms.forced()
        if forced is None or not forced.float4_codes:
            return np.dtype(raw_dtype(elem.bits))
    return dtype


def raw_codes(sign: jax.Array, code: jax.Array, elem: ElementFormat) -> jax.Array:
    """Sign + code magnitude -> uint8 holding the ``bits``-wide wire code."""
    if elem.kind == "int":
        c = jnp.where(sign != 0, -code.astype(jnp.int32), code.astype(jnp.int32))
        return (c & ((1 << elem.bits) - 1)).astype(raw_dtype(elem.bits))
    return (code | lax.shift_left(sign, jnp.uint32(elem.bits - 1))).astype(raw_dtype(elem.bits))


def signed_codes(sign: jax.Array, code: jax.Array, elem: ElementFormat) -> jax.Array:
    """Code magnitudes + signs -> the element storage of an MXTensor."""
    if elem.kind == "int":
        c = code.astype(jnp.int32)
        return jnp.where(sign != 0, -c, c).astype(storage_dtype(elem))
    return raw_to_storage(raw_codes(sign, code, elem), elem)


def raw_to_storage(raw: jax.Array, elem: ElementFormat) -> jax.Array:
    """Unsigned array holding a ``bits``-wide raw code -> the storage dtype."""
    dtype = storage_dtype(elem)
    if dtype in (np.uint8, np.uint16):
        return raw.astype(dtype)
    if dtype in (np.int8, np.int16):
        # Sign-extend a bits-wide two's-complement code.
        width = dtype.itemsize * 8
        shift = width - elem.bits
        u = raw.astype(np.dtype(f"uint{width}"))
        s = lax.bitcast_convert_type(lax.shift_left(u, u.dtype.type(shift)), dtype)
        return lax.shift_right_arithmetic(s, dtype.type(shift))
    if dtype.itemsize * 8 == elem.bits:
        return lax.bitcast_convert_type(raw, dtype)
    if elem.bits == 4:
        return lax.bitcast_convert_type(raw.astype(jnp.uint4), dtype)
    raise NotImplementedError(f"no storage conversion for {elem.name} in {dtype}")


def storage_to_raw(data: jax.Array, elem: ElementFormat) -> jax.Array:
    """The storage dtype -> unsigned array holding the ``bits``-wide raw code."""
    rd = raw_dtype(elem.bits)
    if data.dtype in (jnp.uint8, jnp.uint16):
        return data.astype(rd)
    if data.dtype in (jnp.int8, jnp.int16):
        u = lax.bitcast_convert_type(data, jnp.dtype(f"uint{data.dtype.itemsize * 8}"))
        return (u & u.dtype.type((1 << elem.bits) - 1)).astype(rd)
    if np.dtype(data.dtype).itemsize * 8 == elem.bits:
        return lax.bitcast_convert_type(data, jnp.uint8)
    if elem.bits == 4:
        return lax.bitcast_convert_type(data, jnp.uint4).astype(jnp.uint8)
    raise NotImplementedError(f"no storage conversion for {elem.name} in {data.dtype}")


def split_codes(data: jax.Array, elem: ElementFormat) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Storage -> (sign, code magnitude, is_special) as uint32/bool arrays."""
    if elem.kind == "int":
        c = data.astype(jnp.int32)
        sign = (c < 0).astype(jnp.uint32)
        mag = jnp.abs(c).astype(jnp.uint32)
        return sign, mag, mag > elem.max_code  # the unused code -2^(bits-1)
    raw = storage_to_raw(data, elem).astype(jnp.uint32)
    sign = lax.shift_right_logical(raw, jnp.uint32(elem.bits - 1)) & jnp.uint32(1)
    mag = raw & jnp.uint32(elem.sign_bit - 1)
    return sign, mag, mag > elem.max_code  # Inf/NaN codes of FP8
