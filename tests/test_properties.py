"""Hypothesis properties of quantization, and the unbiasedness of stochastic rounding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxmx
from tests import reference

FORMATS = reference.OCP_FORMATS
BLOCK = 8
# Every float32 bit pattern: NaN payloads, Infs, subnormals, -0.0.
any_f32 = hnp.arrays(np.uint32, (4, 2 * BLOCK), elements=st.integers(0, 2**32 - 1)).map(
    lambda b: b.view(np.float32)
)
finite_f32 = hnp.arrays(
    np.float32,
    (4, 2 * BLOCK),
    elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
)
formats = st.sampled_from(FORMATS)
nearest = st.sampled_from(["nearest_even", "nearest_away"])


@given(x=any_f32, fmt=formats)
def test_any_bit_pattern_quantizes(x, fmt):
    t = jaxmx.quantize(x, fmt, block_size=BLOCK)
    y = np.asarray(jaxmx.dequantize(t))
    blocks = x.reshape(4, 2, BLOCK)
    bad = ~np.isfinite(blocks).all(axis=-1)
    # NaN exactly in the blocks that held NaN or Inf, nowhere else.
    np.testing.assert_array_equal(np.isnan(y.reshape(4, 2, BLOCK)).any(-1), bad)
    np.testing.assert_array_equal(np.isnan(y.reshape(4, 2, BLOCK)).all(-1), bad)


@given(x=finite_f32, fmt=formats)
def test_requantizing_is_identity(x, fmt):
    t = jaxmx.quantize(x, fmt, block_size=BLOCK)
    y = jaxmx.dequantize(t)
    t2 = jaxmx.quantize(y, fmt, block_size=BLOCK)
    np.testing.assert_array_equal(np.asarray(jaxmx.dequantize(t2)), np.asarray(y))
    np.testing.assert_array_equal(
        np.asarray(jax.lax.bitcast_convert_type(t2.scale, jnp.uint8)),
        np.asarray(jax.lax.bitcast_convert_type(t.scale, jnp.uint8)),
    )


@given(x=finite_f32, fmt=formats, rounding=nearest)
def test_error_is_at_most_half_a_step(x, fmt, rounding):
    """Within the element range, |q - x| <= step / 2 of the block's grid."""
    elem = jaxmx.get_format(fmt).element
    y = np.asarray(jaxmx.fake_quantize(x, fmt, block_size=BLOCK, rounding=rounding), np.float64)
    t = jaxmx.quantize(x, fmt, block_size=BLOCK)
    e = np.asarray(jax.lax.bitcast_convert_type(t.scale, jnp.uint8)).astype(np.int64) - 127
    scale = np.repeat(np.exp2(e.astype(np.float64)), BLOCK, axis=-1)
    xa = np.abs(x.astype(np.float64)) / scale
    in_range = xa <= elem.max_normal
    # Grid step at |x|: 2^(max(floor(log2 |x|), emin) - mantissa_bits).
    with np.errstate(divide="ignore"):
        lg = np.floor(np.log2(np.where(xa > 0, xa, 1.0)))
    step = np.exp2(np.maximum(lg, elem.emin) - elem.mantissa_bits) * scale
    err = np.abs(y - x.astype(np.float64))
    assert np.all(err[in_range] <= step[in_range] / 2)
    # Out of range (the floor rule can clip the block max): saturated.
    np.testing.assert_array_equal(np.abs(y[~in_range]), (elem.max_normal * scale)[~in_range])


@given(x=finite_f32, fmt=formats, mode=st.sampled_from(["floor", "rceil", "ceil", "even"]))
def test_matches_float64_model(x, fmt, mode):
    got = np.asarray(jaxmx.fake_quantize(x, fmt, block_size=BLOCK, scale_mode=mode))
    want, _ = reference.fake_quantize(x, fmt, block_size=BLOCK, scale_mode=mode)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("fmt", ["mxfp4_e2m1", "mxfp6_e3m2", "mxint8", "mxint2"])
def test_stochastic_rounding_is_unbiased(fmt):
    """E[q] = x: the mean of many draws lies within 5 standard errors of x."""
    elem = jaxmx.get_format(fmt).element
    rng = np.random.default_rng(0)
    # One block: its max fixes the scale; the others sit between grid points.
    x = rng.uniform(-elem.max_normal, elem.max_normal, 32).astype(np.float32)
    x[0] = elem.max_normal
    x[1] = elem.min_subnormal * 0.3  # below the smallest step: rounds to 0 or up
    n = 4000
    keys = jax.random.split(jax.random.key(0), n)
    draws = jax.vmap(lambda k: jaxmx.fake_quantize(x, fmt, rounding="stochastic", key=k))(keys)
    draws = np.asarray(draws, np.float64)
    mean, sd = draws.mean(0), draws.std(0)
    step = np.exp2(np.maximum(np.floor(np.log2(np.abs(x) + 1e-30)), elem.emin) - elem.mantissa_bits)
    stderr = np.maximum(sd, step / 8) / np.sqrt(n)
    z = np.abs(mean - x) / stderr
    assert np.all(z < 5), z.max()
    # and it is really stochastic: values between grid points take both neighbours
    assert (draws.min(0) < draws.max(0)).sum() > 20
    nearest = np.asarray(jaxmx.fake_quantize(x, fmt))
    assert np.abs(mean - x).mean() < np.abs(nearest - x).mean() / 4


@given(x=any_f32, fmt=formats, rounding=nearest)
def test_fused_fake_quantize_equals_quantize_then_dequantize(x, fmt, rounding):
    """fake_quantize skips the element codes; it must give the same bits."""
    fq = np.asarray(jaxmx.fake_quantize(x, fmt, block_size=BLOCK, rounding=rounding))
    t = jaxmx.quantize(x, fmt, block_size=BLOCK, rounding=rounding)
    dq = np.asarray(jaxmx.dequantize(t))
    np.testing.assert_array_equal(fq, dq)  # NaN == NaN, and exact values otherwise
    same_bits = (fq.view(np.uint32) == dq.view(np.uint32)) | np.isnan(fq)
    assert same_bits.all()  # -0.0 included
