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
from tests._params import covering

OCP = [f for f in jaxmx.list_formats() if jaxmx.get_format(f).family == "ocp"]
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


def reference_bits(values: np.ndarray, dtype, nan_sign=0) -> np.ndarray:
    """Bit patterns of float64 ``values`` (exact in float32, or past its range) in ``dtype``.

    NaN is the quiet NaN, negative where ``nan_sign`` is 1; values above
    float32's range are +-Inf.
    """
    nan_sign = np.asarray(nan_sign, np.uint32)
    with np.errstate(over="ignore"):
        f32 = values.astype(np.float32)  # exact, or Inf past float32's range
    if dtype == jnp.float32:
        bits = f32.view(np.uint32)
        return np.where(np.isnan(values), NAN32 | (nan_sign << 31), bits)
    bits = f32.astype(ml_dtypes.bfloat16).view(np.uint16)  # round to nearest even
    nan = (np.uint32(0x7FC0) | (nan_sign << 15)).astype(np.uint16)
    return np.where(np.isnan(values), nan, bits)


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


# NVFP4: E2M1 codes x E4M3 block scales x a float32 tensor scale.

E2M1_VALUES = element_values(jaxmx.get_format("nvfp4").element)
# Tensor scales: ordinary ones (the float path), one whose products with
# small block scales are float32 subnormals, one that overflows, and one
# below the float path's bound (the integer path).
TENSOR_SCALES = [1.0, 0.0022321428, 2.0**-120, 2.0**-140, 2.0**100, 3.0e38]


def nvfp4_tensor(tensor_scale: float):
    """Every E2M1 code (16 per block) under every E4M3 scale byte (one block each).

    Returns the tensor, the values of TE's decode and the sign of each NaN:
    a NaN block scale (0x7F, 0xFF) decodes its block to NaN with its sign.
    A decode factor past float32's range is Inf, and a zero code times Inf
    is the invalid operation's NaN, whose sign the hardware chooses.
    """
    codes = np.tile(np.arange(16, dtype=np.uint8), (256, 1))
    scales = np.arange(256, dtype=np.uint8)[:, None]
    t = jaxmx.quantize(jnp.ones((256, 16)), "nvfp4")
    t = dataclasses.replace(
        t,
        data=jnp.asarray(codes),
        scale=jnp.asarray(scales.view(ml_dtypes.float8_e4m3fn)),
        tensor_scale=jnp.float32(tensor_scale),
    )
    # TE's decode, one float32 rounding per step: s8 * ts, then E2M1 * that.
    s8 = scales.view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        dec = (s8 * np.float64(np.float32(tensor_scale))).astype(np.float32).astype(np.float64)
        values = (E2M1_VALUES[codes] * dec).astype(np.float32).astype(np.float64)
    return t, values, np.broadcast_to(scales >> 7, codes.shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("tensor_scale", TENSOR_SCALES)
def test_nvfp4_every_code_every_scale(tensor_scale, dtype):
    t, values, nan_sign = nvfp4_tensor(tensor_scale)
    invalid = np.isnan(values) & ~np.isnan(t.scale.astype(np.float32))[:, :1]
    want = reference_bits(values, dtype, nan_sign)
    decode = jax.jit(jaxmx.dequantize, static_argnums=1)
    packed = jaxmx.pack(t)
    assert packed.packed and packed.data.shape == (256, 8)
    for u in (t, packed):
        got = decode(u, dtype)
        assert np.isnan(np.asarray(got, np.float32)[invalid]).all()
        np.testing.assert_array_equal(
            np.where(invalid, 0, out_bits(got)), np.where(invalid, 0, want)
        )
    if tensor_scale == 3.0e38:
        assert invalid.any()  # the overflow case holds 0 * Inf
    else:
        assert not invalid.any()


# The weight-only serving path: intercept decodes an MXTensor weight slab by
# slab on CPU. Each slab decodes to the bits of its slice of the whole
# decode; the products are float32-accumulated dot products of those values,
# in the order XLA's kernels choose for the slab's shape, so they are
# compared with the whole decoded weight's product within float32
# accumulation error.


def _while_count(fn, *args) -> int:
    """Loops in ``fn``'s program as lowered for this host (the CPU)."""
    return jax.jit(fn).lower(*args).as_text().count("stablehlo.while")


SERVING = {
    # name: (function of (w, x), weight shape, x shape, quantized axis of w)
    "x @ kernel": (lambda w, x: x @ w, (64, 768), (3, 64), 0),
    "one token": (lambda w, x: x @ w, (96, 768), (1, 96), 0),
    "(out, in) weight": (lambda w, x: jnp.einsum("mk,nk->mn", x, w), (768, 64), (3, 64), 1),
    "weight on the left": (
        lambda w, x: jax.lax.dot_general(w, x, (((0,), (1,)), ((), ()))),
        (64, 768),
        (3, 64),
        0,
    ),
    "batched": (
        lambda w, x: jax.lax.dot_general(x, w, (((2,), (1,)), ((0,), (0,)))),
        (2, 64, 384),
        (2, 3, 64),
        1,
    ),
    "bfloat16 layer": (
        lambda w, x: x.astype(jnp.bfloat16) @ w.astype(jnp.bfloat16),
        (64, 768),
        (3, 64),
        0,
    ),
}


SERVING_FORMATS = ("mxfp4", "nvfp4", "mxfp8")
# The default suite runs each case under one format, rotating through them.
SERVING_FAST = [(c, SERVING_FORMATS[i % 3]) for i, c in enumerate(SERVING)]


@pytest.mark.parametrize(
    "case,fmt",
    covering([(c, f) for c in SERVING for f in SERVING_FORMATS], every=1000, always=SERVING_FAST),
)
def test_weight_only_slabs_match_whole_decode(case, fmt, monkeypatch):
    from jaxmx._intercept import slabs

    fn, wshape, xshape, axis = SERVING[case]
    monkeypatch.setattr(slabs, "SLAB_ELEMENTS", 96 * 256)  # slabs of 256 or 128 columns
    w = jax.random.normal(jax.random.key(0), wshape)
    x = jax.random.normal(jax.random.key(1), xshape)
    t = jaxmx.pack(jaxmx.quantize(w, fmt, axis=axis))

    def model(p, x):
        return fn(p["w"], x)

    served = jaxmx.intercept(model, None, warn=False)
    got = jax.jit(served)({"w": t}, x)
    assert _while_count(served, {"w": t}, x) == 1  # the slab loop ran
    dtype = jnp.bfloat16 if "bfloat16" in case else jnp.float32
    wd = jaxmx.dequantize(t, dtype)
    want = jax.jit(fn)(wd, x)
    assert got.dtype == want.dtype and got.shape == want.shape
    # Two float32 summation orders of K terms differ by at most 2 K u sum |terms|.
    k = wshape[1] if case == "batched" else (wshape[1] if axis == 1 else wshape[0])
    mag = np.asarray(fn(jnp.abs(wd).astype(jnp.float32), jnp.abs(x).astype(jnp.float32)))
    bound = 2 * k * 2.0**-24 * mag
    if dtype == jnp.bfloat16:  # and one bfloat16 rounding of each
        bound = bound + 2.0**-8 * np.abs(np.asarray(want, np.float32))
    err = np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32))
    assert (err <= bound).all(), float((err / np.maximum(bound, 1e-30)).max())
    assert not np.array_equal(np.asarray(got), np.asarray(fn(w, x)))  # quantized
    with jaxmx.platforms.force("tpu"):  # no slabs there: the whole weight
        served = jaxmx.intercept(model, None, warn=False)  # traced afresh under the force
        assert _while_count(served, {"w": t}, x) == 0
        np.testing.assert_array_equal(out_bits(jax.jit(served)({"w": t}, x)), out_bits(want))


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "mxfp8"])
def test_slabs_decode_to_slices_of_the_whole_decode(fmt):
    """Every slab the loop cuts decodes to the bits of its slice of the whole decode."""
    from jaxmx._intercept import slabs

    w = jax.random.normal(jax.random.key(0), (64, 768)) * jnp.exp2(jnp.arange(768) % 40 - 20.0)
    t = jaxmx.pack(jaxmx.quantize(w, fmt, axis=0))
    whole = np.asarray(jaxmx.dequantize(t))

    @jax.jit
    def slab(t, start):
        return jaxmx.dequantize(slabs._cut(t.canonical(), 1, start, 128))

    for start in range(0, 768, 128):
        got = out_bits(slab(t, jnp.int32(start)))
        np.testing.assert_array_equal(got, out_bits(whole[:, start : start + 128]))


def test_weight_only_small_weight_decoded_whole():
    """Weights that take no slabs under the default sizes are decoded whole."""
    served = jaxmx.intercept(lambda p, x: x @ p["w"], None, warn=False)
    for n in (768, 8 * 128 + 8):  # below two slabs; not a whole number of column blocks
        t = jaxmx.quantize(jax.random.normal(jax.random.key(0), (64, n)), "mxfp4", axis=0)
        assert _while_count(served, {"w": t}, jnp.ones((2, 64))) == 0
