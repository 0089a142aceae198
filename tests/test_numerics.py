"""Exhaustive tests of the element numerics, against ml_dtypes and a float64 model.

Every code of every element format is enumerated; every midpoint between
neighbouring codes is a tie; every scale exponent of E8M0 is exercised.
"""

import itertools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxmx
from jaxmx import numerics
from tests import reference
from tests._params import covering

FORMATS = reference.OCP_FORMATS
ELEMS = {f: jaxmx.get_format(f).element for f in FORMATS}
ROUNDINGS = ("nearest_even", "nearest_away", "toward_zero")


def _bits(x):
    return jnp.asarray(np.asarray(x, np.float32).view(np.uint32))


def _f32(bits):
    return np.asarray(bits, np.uint32).view(np.float32)


@pytest.mark.parametrize("fmt", FORMATS)
def test_card_matches_ml_dtypes_and_grid(fmt):
    elem = ELEMS[fmt]
    g = reference.grid(elem)
    assert g[-1] == elem.max_normal
    assert g[1] == elem.min_subnormal
    assert elem.min_normal == (2.0**elem.emin)
    assert np.all(np.diff(g) > 0)  # codes are ordered like their values
    if elem.kind == "float":
        fi = ml_dtypes.finfo(reference._ML_DTYPES[elem.name])
        assert float(fi.max) == elem.max_normal
        assert float(fi.smallest_normal) == elem.min_normal
        assert float(fi.smallest_subnormal) == elem.min_subnormal
        assert fi.nmant == elem.mantissa_bits
        assert elem.storage_dtype.itemsize == 1
    else:
        assert elem.max_normal == (2 ** (elem.bits - 1) - 1) * 2.0**-elem.mantissa_bits


@pytest.mark.parametrize(
    "fmt,e",
    covering([(f, e) for f in FORMATS for e in (-127, -120, -3, 0, 5, 100, 127 - 8)]),
)
def test_every_code_decodes_and_reencodes_to_itself(fmt, e):
    elem = ELEMS[fmt]
    codes = jnp.arange(elem.max_code + 1, dtype=jnp.uint32)
    bits = numerics.decode_magnitude(codes, e, elem)
    # Exact value, float32 subnormals included: compare with the float64 grid.
    want = reference.grid(elem) * 2.0**e
    if np.all(want < 2.0**128):
        np.testing.assert_array_equal(_f32(bits).astype(np.float64), want)
        for r in ROUNDINGS:
            back = numerics.encode_magnitude(bits, e, elem, r)
            np.testing.assert_array_equal(np.asarray(back), np.asarray(codes))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_ties_at_every_midpoint(fmt, rounding):
    elem = ELEMS[fmt]
    g = reference.grid(elem)
    mid = (g[:-1] + g[1:]) / 2  # exact in float64 and in float32
    assert np.all(mid.astype(np.float32) == mid)
    code = np.asarray(numerics.encode_magnitude(_bits(mid), 0, elem, rounding))
    lo = np.arange(len(mid))
    want = {
        "nearest_even": np.where(lo % 2 == 0, lo, lo + 1),
        "nearest_away": lo + 1,
        "toward_zero": lo,
    }[rounding]
    np.testing.assert_array_equal(code, want)
    # One float32 ulp either side of the midpoint breaks the tie.
    below = np.nextafter(mid.astype(np.float32), np.float32(0))
    above = np.nextafter(mid.astype(np.float32), np.float32(np.inf))
    up = {"toward_zero": lo}.get(rounding, lo + 1)
    np.testing.assert_array_equal(
        np.asarray(numerics.encode_magnitude(_bits(above), 0, elem, rounding)), up
    )
    np.testing.assert_array_equal(
        np.asarray(numerics.encode_magnitude(_bits(below), 0, elem, rounding)), lo
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_nearest_even_matches_ml_dtypes_casts(fmt, rng):
    """ml_dtypes' casts round to nearest even: an independent reference."""
    elem = ELEMS[fmt]
    x = np.concatenate(
        [
            rng.uniform(0, elem.max_normal, 20000),
            rng.uniform(0, 4 * elem.min_subnormal, 5000),
        ]
    ).astype(np.float32)
    code = np.asarray(numerics.encode_magnitude(_bits(x), 0, elem))
    got = reference.grid(elem)[code]
    if elem.kind == "float":
        want = x.astype(reference._ML_DTYPES[elem.name]).astype(np.float64)
    else:
        steps = np.minimum(np.round(x.astype(np.float64) * 2**elem.mantissa_bits), elem.max_code)
        want = steps / 2**elem.mantissa_bits
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("fmt", FORMATS)
def test_saturation(fmt):
    elem = ELEMS[fmt]
    big = np.array(
        [
            elem.max_normal,
            elem.max_normal * 1.01,
            elem.max_normal * 1.5,
            elem.max_normal * 1e6,
            3.0e38,
        ],
        np.float32,
    )
    for r in ROUNDINGS:
        code = np.asarray(numerics.encode_magnitude(_bits(big), 0, elem, r))
        assert np.all(code == elem.max_code), (r, code)
    # In a block, the element above the floor-rule range saturates; the sign stays.
    fmt_ = jaxmx.get_format(fmt)
    x = jnp.array([-(2.0**elem.emax) * 1.999, 1.0], jnp.float32)
    y = np.asarray(jaxmx.fake_quantize(x, fmt_, block_size=2))
    assert y[0] == -elem.max_normal


def test_e8m0_every_exponent():
    """Each of the 255 finite scale bytes is reached and decodes exactly.

    MXINT8 has emax 0, so a block whose max is 2^k gets the exponent k itself.
    """
    k = np.arange(-127, 128)
    x = np.ldexp(np.ones(k.shape), k).astype(np.float32)  # 2^-127 is a subnormal
    t = jaxmx.quantize(x[:, None], "mxint8", block_size=1)
    b = np.asarray(jax.lax.bitcast_convert_type(t.scale, jnp.uint8))[:, 0]
    np.testing.assert_array_equal(b, k + 127)
    np.testing.assert_array_equal(np.asarray(jaxmx.dequantize(t))[:, 0], x)


@pytest.mark.parametrize("fmt", FORMATS)
def test_special_values(fmt):
    x = np.ones((4, 8), np.float32)
    x[0, 3] = np.nan
    x[1, 0] = np.inf
    x[2, 7] = -np.inf
    x[3] = -0.0
    t = jaxmx.quantize(x, fmt, block_size=8)
    b = np.asarray(jax.lax.bitcast_convert_type(t.scale, jnp.uint8))[:, 0]
    assert list(b[:3]) == [0xFF] * 3 and b[3] == 0
    y = np.asarray(jaxmx.dequantize(t))
    assert np.isnan(y[:3]).all()  # the whole block, not only the bad element
    assert (y[3] == 0).all()
    fq = np.asarray(jaxmx.fake_quantize(x, fmt, block_size=8))
    assert np.isnan(fq[:3]).all() and (fq[3] == 0).all()


@pytest.mark.parametrize("fmt", ["mxfp8_e4m3", "mxint8", "mxfp4_e2m1"])
def test_subnormal_inputs_kept_or_flushed(fmt):
    x = np.array([[2.0**-149, 2.0**-140, -(2.0**-130), 2.0**-127]], np.float32)
    kept = np.asarray(jaxmx.fake_quantize(x, fmt, block_size=4))
    want, _ = reference.fake_quantize(x, fmt, block_size=4)
    np.testing.assert_array_equal(kept, want)
    assert kept[0, -1] != 0  # a subnormal block max survives
    flushed = np.asarray(jaxmx.fake_quantize(x, fmt, block_size=4, flush_subnormals=True))
    assert (flushed == 0).all()  # the block max is subnormal: the whole block goes


@pytest.mark.parametrize("fmt", ["mxfp8_e4m3", "mxfp8_e5m2", "mxint8", "mxfp4_e2m1"])
def test_flush_subnormals_zeroes_whole_blocks_only(fmt):
    # The MX emulator zeroes a block when floor(log2(max|x|)) <= -127; a block
    # with a normal max keeps its subnormal neighbours (here quantized with
    # the block's scale, 2^-126 - emax: E5M2 and INT8 keep some of them).
    x = np.array(
        [
            [2.0**-126, 2.0**-127, 2.0**-130, -(2.0**-135)],  # normal max, subnormal rest
            [2.0**-127, 2.0**-149, 0.0, -(2.0**-128)],  # subnormal max: zeroed
        ],
        np.float32,
    )
    got = np.asarray(jaxmx.fake_quantize(x, fmt, block_size=4, flush_subnormals=True))
    want, _ = reference.fake_quantize(x, fmt, block_size=4, flush_subnormals=True)
    np.testing.assert_array_equal(got, want)
    assert (got[1] == 0).all() and got[0, 0] == 2.0**-126
    t = jaxmx.quantize(x, fmt, block_size=4, flush_subnormals=True)
    np.testing.assert_array_equal(jaxmx.dequantize(t), got)
    if fmt in ("mxfp8_e5m2", "mxint8"):
        assert got[0, 1] != 0  # a subnormal element of a normal block survives


@pytest.mark.parametrize(
    ("fmt", "mode", "rounding"),
    # A third of the product in make test (every format, mode and rounding
    # still runs), all of it in make test-slow.
    covering(
        list(itertools.product(FORMATS, ("floor", "rceil", "ceil", "even"), ROUNDINGS)), every=3
    ),
)
def test_against_float64_model(fmt, mode, rounding):
    rng = np.random.default_rng(abs(hash((fmt, mode, rounding))) % 2**32)
    x = rng.standard_normal((6, 70)) * np.exp2(rng.integers(-30, 30, (6, 1)))
    x[0, :5] = [7.9, 7.5, 6.0, 448.0 * 1.02, 3.0]  # block maxima near the clip points
    x = x.astype(np.float32)
    for axis in (-1, 0):
        got = np.asarray(
            jaxmx.fake_quantize(
                x, fmt, axis=axis, block_size=16, scale_mode=mode, rounding=rounding
            )
        )
        want, _ = reference.fake_quantize(
            x, fmt, axis=axis, block_size=16, scale_mode=mode, rounding=rounding
        )
        np.testing.assert_array_equal(got, want)


def test_rceil_never_clips_and_floor_can():
    # Block max 7.9 in FP4: floor gives 2^(2 - 2) = 1, so 7.9 saturates to 6;
    # rceil gives 2^ceil(log2(7.9 / 6)) = 2, and 7.9 / 2 rounds to 4.
    x = jnp.array([7.9, 1.0], jnp.float32)
    assert float(jaxmx.fake_quantize(x, "mxfp4", block_size=2)[0]) == 6.0
    assert float(jaxmx.fake_quantize(x, "mxfp4", block_size=2, scale_mode="rceil")[0]) == 8.0


def test_values_beyond_float32_decode_to_inf():
    # rceil may pick a scale whose grid rounds a value near FLT_MAX up to 2^128:
    # a valid MX value (256 * 2^120) that float32 cannot hold.
    x = jnp.array([3.2964854e38, 1.0], jnp.float32)
    t = jaxmx.quantize(x, "mxfp8", block_size=2, scale_mode="rceil")
    assert np.isposinf(np.asarray(jaxmx.dequantize(t))[0])
    # The floor rule never goes there: it saturates below FLT_MAX.
    assert np.isfinite(np.asarray(jaxmx.fake_quantize(x, "mxfp8", block_size=2))).all()
    # A hand-made tensor holding the largest MX value, 448 * 2^127.
    big = jaxmx.MXTensor(
        data=jnp.array([[448.0, -448.0]], jnp.float8_e4m3fn),
        scale=jax.lax.bitcast_convert_type(jnp.array([[254]], jnp.uint8), jnp.float8_e8m0fnu),
        format=jaxmx.get_format("mxfp8"),
        axis=-1,
        block_size=32,
        length=2,
        dtype=np.dtype(np.float32),
    )
    np.testing.assert_array_equal(np.asarray(jaxmx.dequantize(big)), [[np.inf, -np.inf]])


def test_element_specials_in_hand_made_tensors_decode():
    codes = jnp.array([[0x7F, 0xFF, 0x7E, 0x01]], jnp.uint8)
    for fmt, data, want in [
        ("mxfp8_e4m3", codes, [np.nan, np.nan, 448.0, 2.0**-9]),
        (
            "mxfp8_e5m2",
            jnp.array([[0x7C, 0xFC, 0x7D, 0x7B]], jnp.uint8),
            [np.inf, -np.inf, np.nan, 57344.0],
        ),
    ]:
        fmt = jaxmx.get_format(fmt)
        t = jaxmx.MXTensor(
            data=jax.lax.bitcast_convert_type(data, fmt.element.storage_dtype),
            scale=jax.lax.bitcast_convert_type(jnp.array([[127]], jnp.uint8), jnp.float8_e8m0fnu),
            format=fmt,
            axis=-1,
            block_size=32,
            length=4,
            dtype=np.dtype(np.float32),
        )
        np.testing.assert_array_equal(np.asarray(jaxmx.dequantize(t))[0], want)


def test_even_scale_mode_with_no_mantissa_bits():
    """'even' rounds amax to the element's mantissa width; for INT2 that is the
    implicit bit alone, so 3 = 1.5 * 2 is a tie that rounds up to 4 (found by
    hypothesis)."""
    x = jnp.full((1, 4), 3.0, jnp.float32)
    t = jaxmx.quantize(x, "mxint2", block_size=4, scale_mode="even")
    assert int(jax.lax.bitcast_convert_type(t.scale, jnp.uint8)[0, 0]) == 127 + 2
    np.testing.assert_array_equal(np.asarray(jaxmx.dequantize(t)), np.full((1, 4), 4.0))
