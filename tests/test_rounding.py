"""round_to: elementwise rounding to narrower floats, against ml_dtypes and a grid model."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxmx
from jaxmx import formats
from tests import reference


def _inputs(seed=0, n=50000):
    rng = np.random.default_rng(seed)
    v = np.clip(rng.standard_normal(n) * np.exp2(rng.integers(-150, 128, n)), -3e38, 3e38)
    v = v.astype(np.float32)
    v[:12] = [
        0.0,
        -0.0,
        1e-45,
        -1e-45,
        1.1754942e-38,
        65504,
        65520,
        65519.99,
        -70000,
        3.4e38,
        448,
        464,
    ]
    return v


CASTS = {
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
}


@pytest.mark.parametrize("fmt", list(CASTS))
def test_nearest_even_matches_ml_dtypes_casts(fmt):
    v = _inputs()
    got = np.asarray(jaxmx.round_to(v, fmt))
    with np.errstate(over="ignore", invalid="ignore"):
        want = v.astype(CASTS[fmt]).astype(np.float32)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, v)


def test_specials_follow_the_format():
    x = jnp.array([np.nan, np.inf, -np.inf, 1e30], jnp.float32)
    bf = np.asarray(jaxmx.round_to(x, "bfloat16"))
    assert np.isnan(bf[0]) and bf[1] == np.inf and bf[2] == -np.inf and bf[3] != np.inf
    e4 = np.asarray(jaxmx.round_to(x, "fp8_e4m3"))  # only NaN: overflow is NaN
    assert np.isnan(e4).all()
    f4 = np.asarray(jaxmx.round_to(x, "fp4_e2m1"))  # NaN kept, never a silent zero
    assert np.isnan(f4[0]) and list(f4[1:]) == [6.0, -6.0, 6.0]
    sat = np.asarray(jaxmx.round_to(x, "fp8_e5m2", saturate=True))
    assert list(sat[1:]) == [57344.0, -57344.0, 57344.0]
    tz = np.asarray(jaxmx.round_to(jnp.float32(1e30), "float16", rounding="toward_zero"))
    assert tz == 65504.0  # IEEE: toward zero never overflows to Inf


@pytest.mark.parametrize("rounding", ["nearest_even", "nearest_away", "toward_zero"])
@pytest.mark.parametrize("ebits,mbits", [(8, 3), (4, 3), (3, 2)])
def test_custom_formats_against_grid_model(ebits, mbits, rounding):
    """float_format (e.g. a 12-bit bfloat) vs rounding in the enumerated grid."""
    fmt = formats.float_format(ebits, mbits)
    codes = np.arange(fmt.max_code + 1)
    e, m = codes >> mbits, codes & ((1 << mbits) - 1)
    grid = np.where(
        e == 0, m * 2.0 ** (1 - fmt.bias - mbits), (1 + m / 2**mbits) * 2.0 ** (e - fmt.bias)
    )
    rng = np.random.default_rng(1)
    v = rng.uniform(-1, 1, 20000) * fmt.max_normal * 2.0 ** -rng.integers(0, 40, 20000)
    v = v.astype(np.float32)
    got = np.asarray(jaxmx.round_to(v, fmt, rounding=rounding), np.float64)
    want = np.copysign(reference.round_to_grid(np.abs(v.astype(np.float64)), grid, rounding), v)
    np.testing.assert_array_equal(got, want)


def test_bf16_input_and_stochastic_rounding_unbiased():
    x = jnp.full((20000,), 1.0 + 2.0**-10, jnp.float32)  # between bf16 neighbours 1 and 1+2^-7
    draws = np.asarray(jaxmx.round_to(x, "bfloat16", rounding="stochastic", key=jax.random.key(0)))
    assert set(np.unique(draws)) == {1.0, 1.0 + 2.0**-7}
    assert abs(draws.mean() - (1 + 2.0**-10)) < 5 * draws.std() / np.sqrt(len(draws))
    y = jaxmx.round_to(jnp.ones(4, jnp.bfloat16) * 1.5, "fp4_e2m1")
    assert y.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="needs a PRNG key"):
        jaxmx.round_to(x, "bfloat16", rounding="stochastic")


def test_subnormals_flag():
    x = jnp.array([2.0**-130, 2.0**-127, 2.0**-126, 3e-5], jnp.float32)
    kept = np.asarray(jaxmx.round_to(x, "bfloat16"))
    assert kept[0] != 0 and kept[1] == 2.0**-127
    ftz = np.asarray(jaxmx.round_to(x, "bfloat16", subnormals=False))
    assert list(ftz[:2]) == [0.0, 0.0] and ftz[2] == 2.0**-126
    h = np.asarray(jaxmx.round_to(x, "float16", subnormals=False))
    assert h[3] == 0.0 and np.asarray(jaxmx.round_to(x, "float16"))[3] != 0.0


def test_format_arguments():
    x = jnp.ones(3)
    np.testing.assert_array_equal(np.asarray(jaxmx.round_to(x, jnp.bfloat16)), np.ones(3))
    np.testing.assert_array_equal(np.asarray(jaxmx.round_to(x * 5.1, "mxfp4")), np.full(3, 6.0))
    with pytest.raises(ValueError, match="unknown float format 'fp5'.*bfloat16"):
        jaxmx.round_to(x, "fp5")
    with pytest.raises(ValueError, match="float_format needs"):
        formats.float_format(1, 3)


@pytest.mark.parametrize("fmt", ["bfloat16", "float16"])
def test_fast_paths_equal_round_to(fmt):
    # round_to's float32 nearest-even integer-op paths for these two formats
    # (what vector-op emulation runs) are its general path bit for bit: ties
    # both ways and the carries at every dropped-bit boundary, subnormals,
    # overflow to Inf, Inf, NaN of either sign, and random patterns.
    from jaxmx.rounding import _FAST, _fast_path, _round_general, _RoundSpec

    spec = _RoundSpec(
        formats.BF16 if fmt == "bfloat16" else formats.FP16, "nearest_even", True, False
    )
    assert _fast_path(spec, jnp.float32) is _FAST[spec.elem]
    hi = np.arange(0, 1 << 19, 5, dtype=np.uint32) << 13
    low = np.array([0, 1, 0xFFF, 0x1000, 0x1001, 0x1FFF, 0x7FFF, 0x8000, 0x8001, 0xFFFF], np.uint32)
    edges = (hi[:, None] | low[None, :]).ravel()
    special = np.array(
        [0x7F7FFFFF, 0x7F800000, 0x7FC00001, 0x7FFFFFFF, 1, 0x477FEFFF, 0x477FF000, 0x387FFFFF],
        np.uint32,
    )
    rand = np.random.default_rng(0).integers(0, 1 << 32, 1 << 16, dtype=np.uint32)
    bits = np.concatenate([edges, special, special | 0x80000000, rand])
    x = jnp.asarray(bits.view(np.float32))
    general = jax.jit(_round_general, static_argnums=2)
    want = np.asarray(general(x, None, spec)).view(np.uint32)
    np.testing.assert_array_equal(np.asarray(jax.jit(_FAST[spec.elem])(x)).view(np.uint32), want)
    np.testing.assert_array_equal(np.asarray(jaxmx.round_to(x, fmt)).view(np.uint32), want)


@pytest.mark.slow  # 2**32 patterns: about 2 min per format on 2 CPUs at load average 10
@pytest.mark.parametrize("fmt", ["bfloat16", "float16"])
def test_fast_paths_equal_general_path_on_every_float32(fmt):
    # Every one of the 2**32 float32 bit patterns, in 256 chunks of 2**24:
    # the fast path and the general path give the same bits.
    from jaxmx.rounding import _FAST, _round_general, _RoundSpec

    spec = _RoundSpec(
        formats.BF16 if fmt == "bfloat16" else formats.FP16, "nearest_even", True, False
    )
    chunk = 1 << 24

    @jax.jit
    def mismatches(start):
        x = jax.lax.bitcast_convert_type(start + jnp.arange(chunk, dtype=jnp.uint32), jnp.float32)
        fast = jax.lax.bitcast_convert_type(_FAST[spec.elem](x), jnp.uint32)
        general = jax.lax.bitcast_convert_type(_round_general(x, None, spec), jnp.uint32)
        differ = fast != general
        return jnp.sum(differ), jnp.argmax(differ)

    for start in range(0, 1 << 32, chunk):
        n, first = mismatches(jnp.uint32(start))
        assert int(n) == 0, (
            f"{int(n)} patterns differ from 0x{start:08X}, first 0x{start + int(first):08X}"
        )
