"""Decoding MXTensors: every code under every scale byte, bit for bit.

The decode (``jaxmx.dequantize``: a float multiply where a tensor's scales
keep its values normal, an integer construction otherwise) is compared with
an independent NumPy model built on ml_dtypes' element values, and with the
integer construction alone (the decode before the float path existed), for
every element code of every OCP format and NVFP4 under every scale byte
(E8M0 0xFF and E4M3 NaN included), float32 and bfloat16, packed and not,
under jit. The weight-only serving path (``jaxmx.intercept``, which decodes a
weight slab by slab on CPU) is compared with the product of the whole
decoded weight.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxmx
from jaxmx.families.ocp import _kernels as ocp_kernels

OCP = ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_e2m1", "mxint8", "mxint4"]
DTYPES = [jnp.float32, jnp.bfloat16]
NAN32 = np.uint32(0x7FC00000)
ML_ELEMENTS = {
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
}


def element_values(elem) -> np.ndarray:
    """float64 value of every raw code 0 .. 2^bits - 1 (NaN codes give NaN)."""
    codes = np.arange(1 << elem.bits, dtype=np.int64)
    if elem.kind == "int":  # two's complement, value = code * 2^-m
        signed = np.where(codes >= 1 << (elem.bits - 1), codes - (1 << elem.bits), codes)
        return signed * 2.0**-elem.mantissa_bits
    return codes.astype(np.uint8).view(ML_ELEMENTS[elem.name]).astype(np.float64)


def reference_bits(values: np.ndarray, dtype) -> np.ndarray:
    """Bit patterns of float64 ``values`` (exact in float32, or past its range) in ``dtype``.

    NaN is the unsigned quiet NaN; values above float32's range are +-Inf.
    """
    with np.errstate(over="ignore"):
        f32 = values.astype(np.float32)  # exact, or Inf past float32's range
    if dtype == jnp.float32:
        bits = f32.view(np.uint32)
        return np.where(np.isnan(values), NAN32, bits)
    bits = f32.astype(ml_dtypes.bfloat16).view(np.uint16)  # round to nearest even
    return np.where(np.isnan(values), np.uint16(0x7FC0), bits)


def out_bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint16)


def ocp_tensor(name: str):
    """Every raw code (a row) under every scale byte (a column of blocks).

    Shape (256 * reps, 32) blocked along the last axis: row-block ``s`` holds
    scale byte ``s``, its 32 elements the codes cycled, with the row index
    shifting the cycle so every code meets every scale byte.
    """
    fmt = jaxmx.get_format(name)
    elem = fmt.element
    n = 1 << elem.bits
    reps = max(1, n // 32)
    rows = 256 * reps
    codes = (np.arange(32)[None, :] + 32 * (np.arange(rows)[:, None] % reps)) % n
    scale = (np.arange(rows) // reps).astype(np.uint8)[:, None]
    t = jaxmx.quantize(jnp.zeros((rows, 32)), fmt)
    storage = jaxmx.codes.raw_to_storage(jnp.asarray(codes, jnp.uint8), elem)
    s = jax.lax.bitcast_convert_type(jnp.asarray(scale), fmt.scale.storage_dtype)
    t = dataclasses.replace(t, data=storage, scale=s)
    raw = codes.astype(np.int64)
    values = element_values(elem)[raw] * np.exp2(scale.astype(np.float64) - fmt.scale.bias)
    values = np.where(scale == fmt.scale.nan_code, np.nan, values)
    return t, values


def fast_rows(t, values):
    """The rows of :func:`ocp_tensor` whose scale byte the float path takes (and NaN's)."""
    fmt = t.format
    lo, hi = ocp_kernels._fast_exponents(fmt)
    e = np.arange(256) - fmt.scale.bias
    keep = ((e >= lo) & (e <= hi)) | (np.arange(256) == fmt.scale.nan_code)
    assert keep[128] and not keep[0]  # 2^1 takes the float path, 2^-127 does not
    rows = np.repeat(keep, t.shape[0] // 256)
    return dataclasses.replace(t, data=t.data[rows], scale=t.scale[rows]), values[rows]


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", OCP)
def test_ocp_every_code_every_scale(name, dtype):
    """All 256 scale bytes in one tensor (the integer path, since 0x00 is among
    them), and the bytes of the float path alone (a tensor the float path takes)."""
    decode = jax.jit(jaxmx.dequantize, static_argnums=1)
    whole, values = ocp_tensor(name)
    for t, v in (ocp_tensor(name), fast_rows(whole, values)):
        want = reference_bits(v, dtype)
        np.testing.assert_array_equal(out_bits(decode(t, dtype)), want)
        if t.format.packable:
            packed = jaxmx.pack(t)
            assert packed.packed
            np.testing.assert_array_equal(out_bits(decode(packed, dtype)), want)


@pytest.mark.parametrize("name", OCP)
def test_ocp_paths_each_exact(name):
    """Each path on its own against the model: the integer construction (the
    decode before the float path existed) on every scale byte, the float
    path on the bytes its whole-tensor test lets through."""
    t, values = ocp_tensor(name)
    biased = jnp.expand_dims(jax.lax.bitcast_convert_type(t.scale, jnp.uint8), t.axis)
    old = jax.jit(lambda d, b: ocp_kernels._decode_exact(d, b, t, jnp.float32))(t.data, biased)
    np.testing.assert_array_equal(out_bits(old), reference_bits(values, jnp.float32))
    sub, v = fast_rows(t, values)
    biased = jnp.expand_dims(jax.lax.bitcast_convert_type(sub.scale, jnp.uint8), sub.axis)
    fast = jax.jit(lambda d, b: ocp_kernels._decode_fast(d, b, t=sub, dtype=jnp.float32))
    np.testing.assert_array_equal(out_bits(fast(sub.data, biased)), reference_bits(v, jnp.float32))
