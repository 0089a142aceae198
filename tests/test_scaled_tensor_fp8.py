"""Per-tensor FP8 numerics (jaxmx.families.tensor_fp8._kernels) against the NumPy reference.

There are no reference vectors for per-tensor FP8 (tests/data/vectors_turn2
holds NVFP4 and the shared-microexponent formats); the ground truth is
``tests.reference_blockformats.tensor_fp8``, whose hand-checked cases live in
tests/test_reference_blockformats.py. jaxmx must match it bit for bit (codes,
scale, dequantized values) on random data at every magnitude (subnormal
scales included), zeros, saturation, ties and NaN/Inf, under jit and vmap.
"""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxmx.families.tensor_fp8._kernels import (
    tensor_fp8_dequantize,
    tensor_fp8_fake_quantize,
    tensor_fp8_quantize,
)
from tests import reference_blockformats as ref

F32 = np.float32
ELEMENTS = ("e4m3", "e5m2")


def bits_equal(actual, expected, what=""):
    """Equal bit for bit (as unsigned patterns of the same width), NaN equal to NaN."""
    a, e = np.asarray(actual), np.asarray(expected)
    assert a.shape == e.shape and a.dtype == e.dtype, (what, a.shape, e.shape, a.dtype, e.dtype)
    a32, e32 = a.astype(F32), e.astype(F32)
    np.testing.assert_array_equal(np.isnan(a32), np.isnan(e32), err_msg=f"{what}: NaN positions")
    keep = ~np.isnan(a32)
    u = np.dtype(f"u{a.dtype.itemsize}")
    np.testing.assert_array_equal(a.view(u)[keep], e.view(u)[keep], err_msg=what)


def check(x, element):
    r = ref.tensor_fp8(x, element)
    codes, scale = tensor_fp8_quantize(x, element)
    bits_equal(codes, r.codes, "codes")
    bits_equal(scale, r.scale, "scale")
    bits_equal(tensor_fp8_dequantize(codes, scale), r.y, "dequantize")
    bits_equal(tensor_fp8_fake_quantize(x, element), r.y, "fake_quantize")
    return r


def random_tensor(rng, shape, log2_scale):
    # |normal| < 3.99 keeps 2**126 * x below float32's largest finite value:
    # an overflow to inf here would test the cast, not the quantizer.
    x = np.clip(rng.standard_normal(shape), -3.99, 3.99) * 2.0**log2_scale
    flat = x.reshape(-1)
    flat[rng.integers(0, flat.size, flat.size // 10)] = 0.0
    flat[rng.integers(0, flat.size, flat.size // 20)] = -0.0
    flat[rng.integers(0, flat.size, flat.size // 20)] *= 2.0**-20
    return x.astype(F32)


@pytest.mark.parametrize("element", ELEMENTS)
@pytest.mark.parametrize("log2_scale", [0, -30, -90, -110, -120, -126, -135, -145, 60, 120])
def test_matches_reference_across_magnitudes(element, log2_scale):
    # Below ~2^-100 the scale is tiny or subnormal and the integer path runs;
    # from -126 on the inputs themselves are float32 subnormals.
    x = random_tensor(np.random.default_rng(abs(log2_scale)), (24, 40), log2_scale)
    r = check(x, element)
    if log2_scale > -140:
        assert not np.array_equal(r.y, x)  # quantization did something


@pytest.mark.parametrize("element", ELEMENTS)
def test_ties_saturation_and_zeros(element):
    top = {"e4m3": 448.0, "e5m2": 57344.0}[element]
    # amax = max_normal gives scale 1: values round as they are.
    x = F32([top, 1.0625, 1.1875, -1.0625, 0.0009765625, -0.0, 1.125, 3.5, -top])
    r = check(x, element)
    assert r.scale == 1
    check(np.zeros((3, 5), F32), element)
    z = np.zeros(4, F32)
    z[2] = -0.0
    codes, scale = tensor_fp8_quantize(z, element)
    assert scale == 1 and np.signbit(np.asarray(codes, F32)[2])
    # The underflow floor: amax / max_normal below 2^-149 becomes 2^-149.
    tiny = np.array([1, 0x80000001, 0, 3], np.uint32).view(F32)
    r = check(tiny, element)
    assert r.scale == np.array([1], np.uint32).view(F32)[0]


@pytest.mark.parametrize("element", ELEMENTS)
def test_nan_and_inf_poison_the_tensor(element):
    for bad in (np.nan, np.inf, -np.inf):
        x = F32([1.0, -2.0, bad, 0.0])
        r = check(x, element)
        assert np.isnan(r.scale)
        codes, _ = tensor_fp8_quantize(x, element)
        nan_byte = {"e4m3": 0x7F, "e5m2": 0x7E}[element]
        assert np.all(np.asarray(codes).view(np.uint8) == nan_byte)
        assert np.isnan(np.asarray(tensor_fp8_fake_quantize(x, element))).all()


@hypothesis.settings(max_examples=30)
@hypothesis.given(
    st.integers(0, 2**32 - 1),
    st.sampled_from(ELEMENTS),
    st.sampled_from([0, -50, -115, -128, -140, 100, 126]),
    st.booleans(),
)
def test_property(seed, element, log2_scale, special):
    rng = np.random.default_rng(seed)
    x = random_tensor(rng, (7, 13), log2_scale)
    if special:
        x[rng.integers(0, 7), rng.integers(0, 13)] = rng.choice([np.nan, np.inf, -np.inf])
    check(x, element)


def test_jit_vmap_and_dtypes():
    rng = np.random.default_rng(1)
    xs = np.stack([random_tensor(rng, (8, 16), s) for s in (0, -125, 20)])
    for element in ELEMENTS:
        q = jax.vmap(lambda v, e=element: tensor_fp8_quantize(v, e))(xs)
        fq = jax.jit(jax.vmap(lambda v, e=element: tensor_fp8_fake_quantize(v, e)))(xs)
        dq = jax.vmap(tensor_fp8_dequantize)(*q)
        for i, x in enumerate(xs):
            r = ref.tensor_fp8(x, element)
            bits_equal(q.codes[i], r.codes)
            bits_equal(q.scale[i], r.scale)
            bits_equal(fq[i], r.y)
            bits_equal(dq[i], r.y)
    x = random_tensor(rng, (4, 8), 0)
    for dt in (jnp.bfloat16, jnp.float16):
        xd = jnp.asarray(x, dt)
        r = ref.tensor_fp8(np.asarray(xd.astype(jnp.float32)))
        y = tensor_fp8_fake_quantize(xd)
        assert y.dtype == dt
        bits_equal(np.asarray(y), r.y.astype(dt))
        bits_equal(tensor_fp8_dequantize(r.codes, r.scale, dtype=dt), r.y.astype(dt))
    assert tensor_fp8_quantize(jnp.float32(3.0)).scale == F32(3.0) / F32(448.0)  # rank 0


def test_dequantize_reads_inf_and_nan_codes():
    codes = np.array([0x7C, 0xFC, 0x7E, 0x01], np.uint8).view(ml_dtypes.float8_e5m2)
    y = np.asarray(tensor_fp8_dequantize(codes, F32(2.0)))
    assert y[0] == np.inf and y[1] == -np.inf and np.isnan(y[2]) and y[3] == 2.0**-15


def test_errors():
    with pytest.raises(ValueError, match="element"):
        tensor_fp8_quantize(np.ones(3, F32), "e3m4")
    with pytest.raises(ValueError, match="empty"):
        tensor_fp8_quantize(np.zeros((0, 3), F32))
    with pytest.raises(TypeError, match="dtype"):
        tensor_fp8_quantize(np.ones(3, np.int32))
    with pytest.raises(TypeError, match="float8"):
        tensor_fp8_dequantize(np.ones(3, F32), F32(1))
    with pytest.raises(ValueError, match="scalar"):
        tensor_fp8_dequantize(np.ones(3, F32).astype(ml_dtypes.float8_e4m3fn), np.ones(2, F32))
