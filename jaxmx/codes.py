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

from jaxmx.formats import ElementFormat

__all__ = ["raw_codes", "signed_codes", "raw_to_storage", "storage_to_raw", "split_codes"]


def raw_codes(sign: jax.Array, code: jax.Array, elem: ElementFormat) -> jax.Array:
    """Sign + code magnitude -> uint8 holding the ``bits``-wide wire code."""
    if elem.kind == "int":
        c = jnp.where(sign != 0, -code.astype(jnp.int32), code.astype(jnp.int32))
        return (c & ((1 << elem.bits) - 1)).astype(jnp.uint8)
    return (code | lax.shift_left(sign, jnp.uint32(elem.bits - 1))).astype(jnp.uint8)


def signed_codes(sign: jax.Array, code: jax.Array, elem: ElementFormat) -> jax.Array:
    """Code magnitudes + signs -> the element storage of an MXTensor."""
    if elem.kind == "int":
        c = code.astype(jnp.int32)
        return jnp.where(sign != 0, -c, c).astype(jnp.int8)
    return raw_to_storage(raw_codes(sign, code, elem), elem)


def raw_to_storage(raw: jax.Array, elem: ElementFormat) -> jax.Array:
    """uint8 holding a ``bits``-wide raw code -> the storage dtype."""
    dtype = elem.storage_dtype
    if dtype == np.uint8:
        return raw
    if dtype == np.int8:
        # Sign-extend a bits-wide two's-complement code.
        shift = 8 - elem.bits
        return lax.shift_right_arithmetic(
            lax.shift_left(raw, jnp.uint8(shift)).view(jnp.int8), jnp.int8(shift)
        )
    if dtype.itemsize * 8 == elem.bits:
        return lax.bitcast_convert_type(raw, dtype)
    if elem.bits == 4:
        return lax.bitcast_convert_type(raw.astype(jnp.uint4), dtype)
    raise NotImplementedError(f"no storage conversion for {elem.name} in {dtype}")


def storage_to_raw(data: jax.Array, elem: ElementFormat) -> jax.Array:
    """The storage dtype -> uint8 holding the ``bits``-wide raw code."""
    if data.dtype == jnp.uint8:
        return data
    if data.dtype == jnp.int8:
        return data.view(jnp.uint8) & jnp.uint8((1 << elem.bits) - 1)
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
