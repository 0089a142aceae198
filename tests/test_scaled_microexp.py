"""MX9 / MX6 / MX4 and MSFP16 / MSFP12 (jaxmx/families/microexp/_kernels.py) against Quark.

Ground truth: the AMD Quark 0.13 vectors in tests/data/vectors_turn2/bdr (bit
for bit: y, codes, step exponents, block exponents, micro bits) and the
independent NumPy model ``tests.reference_blockformats.quark_mx`` on inputs
the vectors do not cover (zeros, all-zero blocks, subnormals, huge values,
NaN/Inf, ties, saturation, partial blocks, other axes, bfloat16/float16),
under jit and vmap. Plus packing round trips, storage sizes and the BDR
paper's QSNR ordering.
"""

import json
import pathlib

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxmx import analysis, bitstream
from jaxmx.blocks import packed_length
from jaxmx.families.microexp import _kernels as me
from tests import _microexp_storage as storage
from tests import reference_blockformats as ref
from tests._params import covering

DATA = pathlib.Path(__file__).parent / "data" / "vectors_turn2" / "bdr"
MX_FILES = sorted(p.name for p in DATA.glob("*.npz") if not p.name.startswith("quark_bfp16"))
BFP16_FILES = sorted(p.name for p in DATA.glob("quark_bfp16__*.npz"))
FORMATS = list(me.SPECS)
F32 = np.float32


def bits_equal(actual, expected, what=""):
    """Equal bit for bit (signed zeros distinguished), any NaN equal to any NaN."""
    a, e = np.asarray(actual), np.asarray(expected)
    assert a.shape == e.shape, (what, a.shape, e.shape)
    assert a.dtype == e.dtype, (what, a.dtype, e.dtype)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(e), err_msg=f"{what}: NaN positions")
    keep = ~np.isnan(a)
    u = np.dtype(f"u{a.dtype.itemsize}")
    np.testing.assert_array_equal(a[keep].view(u), e[keep].view(u), err_msg=what)


def signed_codes(mantissas, spec):
    """Sign-magnitude uint8 codes -> (magnitude, sign bit) as int arrays."""
    c = np.asarray(mantissas).astype(np.int32)
    return c & spec.max_code, (c >> spec.mantissa_bits) & 1


def check_against_model(x, fmt, axis=-1):
    """Every output of jaxmx against ``ref.quark_mx`` on the same input."""
    spec = me.get_spec(fmt)
    r = ref.quark_mx(np.asarray(x), fmt, axis=axis)
    y = me.fake_quantize(x, fmt, axis=axis)
    assert y.dtype == jnp.asarray(x).dtype
    bits_equal(np.asarray(y).astype(F32), r.y, f"{fmt} fake_quantize")
    q = me.quantize(x, fmt, axis=axis)
    assert q.mantissas.dtype == jnp.uint8 and q.shared_exponent.dtype == jnp.uint8
    mag, sign = signed_codes(q.mantissas, spec)
    known = ~np.isnan(r.codes)  # Quark's NaN elements have a NaN code; ours are +0
    np.testing.assert_array_equal(mag[known], np.abs(r.codes[known]).astype(np.int32))
    np.testing.assert_array_equal(sign[known], np.signbit(r.codes[known]).astype(np.int32))
    np.testing.assert_array_equal(mag[~known] | sign[~known], 0)
    # A block holding NaN or Inf: exponent byte 0xFF; else block_exp + 127.
    xm = np.moveaxis(np.asarray(x, F32), axis, -1)
    n, bs = xm.shape[-1], spec.block_size
    pad = np.concatenate([xm, np.zeros((*xm.shape[:-1], -n % bs), F32)], -1)
    block_finite = np.isfinite(pad.reshape(*xm.shape[:-1], -1, bs)).all(-1)
    nonfinite = np.moveaxis(~block_finite, -1, axis)
    se = np.asarray(q.shared_exponent).astype(np.int32)
    np.testing.assert_array_equal(se, np.where(nonfinite, 255, r.block_exp.astype(np.int32) + 127))
    if spec.sub_block_size is None:
        assert q.micro is None
    else:
        rm = np.moveaxis(r.micro, (axis % np.ndim(x), axis % np.ndim(x) + 1), (-2, -1))
        rm = np.moveaxis(rm.reshape(*rm.shape[:-2], -1), -1, axis)
        np.testing.assert_array_equal(np.asarray(q.micro), rm)
    # The step exponents follow from the stored exponent and micro bits.
    step = np.repeat(np.moveaxis(se, axis, -1), bs, -1)[..., :n] - 127 - spec.element_bits + 2
    if q.micro is not None:
        m = np.moveaxis(np.asarray(q.micro), axis, -1).astype(np.int32)
        step = step - np.repeat(m, spec.sub_block_size, -1)[..., :n]
    finite_block = ~np.repeat(np.moveaxis(nonfinite, axis, -1), bs, -1)[..., :n]
    np.testing.assert_array_equal(
        step[finite_block], np.moveaxis(r.step_exp, axis, -1)[finite_block]
    )
    # dequantize(quantize(x)) is fake_quantize(x) on finite blocks, NaN on the rest.
    dq = np.asarray(me.dequantize(*q, fmt, axis=axis))
    want = np.where(np.moveaxis(finite_block, -1, axis), r.y, np.nan).astype(F32)
    bits_equal(dq, want, f"{fmt} dequantize")
    return r


# --------------------------------------------------------------------------
# The Quark vectors, bit for bit.
# --------------------------------------------------------------------------


def test_every_vector_file_is_used():
    index = json.loads((DATA / "index.json").read_text())
    assert sorted(f["file"] for f in index["files"]) == sorted(MX_FILES + BFP16_FILES)
    assert {n.split("__")[0] for n in MX_FILES} == set(me.SPECS)
    assert len(MX_FILES) == 5 * 3 and len(BFP16_FILES) == 3


# Every Quark file also runs through jaxmx.quantize in test_families (the
# public path); here half of them run in make test, all in make test-slow.
@pytest.mark.parametrize("name", covering(MX_FILES))
def test_quark_vectors(name):
    f = np.load(DATA / name)
    meta = json.loads(str(f["meta"]))
    spec = me.get_spec(meta["format"])
    assert spec.element_bits == meta["quant_bit"] and spec.block_size == meta["block_size"]
    assert (spec.sub_block_size or spec.block_size) == meta["sub_block_size"]
    x, y = f["x"], f["y"]

    bits_equal(me.fake_quantize(x, spec), y, "fake_quantize")
    bits_equal(jax.jit(lambda v: me.fake_quantize(v, spec))(x), y, "fake_quantize under jit")
    q = me.quantize(x, spec)
    mag, sign = signed_codes(q.mantissas, spec)
    np.testing.assert_array_equal(mag, np.abs(f["codes"]).astype(np.int32))
    np.testing.assert_array_equal(sign, np.signbit(f["codes"]).astype(np.int32))
    np.testing.assert_array_equal(
        np.asarray(q.shared_exponent).astype(np.int32) - 127, f["block_exp"]
    )
    step = np.repeat(np.asarray(q.shared_exponent).astype(np.int32), 16, -1) - 127
    step = step - spec.element_bits + 2
    if "micro" in f.files:
        np.testing.assert_array_equal(np.asarray(q.micro), f["micro"].reshape(16, -1))
        step = step - np.repeat(np.asarray(q.micro).astype(np.int32), 2, -1)
    else:
        assert q.micro is None
    np.testing.assert_array_equal(step, f["step_exp"])
    bits_equal(me.dequantize(*q, spec), y, "dequantize(quantize)")
    # Quantization did something: on normal data every element moved.
    if meta["case"] != "zeros":
        assert np.mean(np.asarray(me.fake_quantize(x, spec)) != x) > 0.9


@pytest.mark.parametrize("name", BFP16_FILES)
def test_quark_bfp16_is_msfp16_in_blocks_of_8_until_it_bumps(name):
    # Quark's registered bfp16 is not one of the five formats: blocks of 8,
    # two's complement codes [-128, 127], and a doubled scale when a code
    # would fall outside. Where neither happens it is MSFP16 in blocks of 8.
    f = np.load(DATA / name)
    x, y = f["x"], f["y"]
    bfp8 = me.MicroexpSpec(name="msfp16_b8", mantissa_bits=7, block_size=8, sub_block_size=None)
    # Two's complement has no -0: a negative rounding to zero gives +0 there.
    ours = np.asarray(me.fake_quantize(x, bfp8)) + F32(0.0)
    r = ref.quark_mx(x, quant_bit=8, sub_block_size=8, block_size=8)
    codes = r.codes.reshape(16, -1, 8)
    plain = (np.abs(codes).max(-1) < 127) | np.all(x.reshape(16, -1, 8) == 0, -1)
    plain = np.repeat(plain, 8, -1)
    bits_equal(ours[plain], y[plain], "plain blocks")
    assert plain.mean() > 0.5


# --------------------------------------------------------------------------
# Against the NumPy model: specials, edges, axes, dtypes.
# --------------------------------------------------------------------------


def _edge_rows(rng, n=64):
    """Rows of n values mixing every case the vectors leave out."""
    normal = rng.standard_normal((12, n)).astype(F32)
    rows = [
        normal[0],
        np.zeros(n, F32),  # all-zero blocks
        -np.zeros(n, F32),  # -0.0 -> +0.0
        normal[1] * F32(2.0**-120),  # near the bottom of the normal range
        np.where(rng.random(n) < 0.5, normal[2] * F32(2.0**-130), normal[2] * F32(2.0**-125)),
        (rng.integers(1, 2**23, n) * 2.0**-149).astype(F32),  # all subnormal
        normal[3] * F32(2.0**126),  # huge
        np.full(n, np.finfo(F32).max, F32) * np.sign(normal[4]),  # FLT_MAX: codes clip
        np.where(rng.random(n) < 0.8, F32(0.0), normal[5]),  # sparse
        np.where(rng.random(n) < 0.1, np.nan, normal[6]).astype(F32),
        np.where(rng.random(n) < 0.1, np.inf * np.sign(normal[7]), normal[7]).astype(F32),
        np.where(np.arange(n) % 16 < 8, normal[8] * F32(1e-3), normal[8]),  # mixed binades
        normal[9] * np.exp2(rng.integers(-20, 20, n)).astype(F32),  # wide spread
    ]
    return np.stack(rows)


@pytest.mark.parametrize("fmt", FORMATS)
def test_edge_cases_against_model(fmt, rng):
    x = _edge_rows(rng)
    r = check_against_model(x, fmt)
    y = np.asarray(me.fake_quantize(x, fmt))
    # The subnormal and -0.0 rows flush to +0.0; NaN/Inf pass through.
    assert np.all(y[5] == 0) and not np.any(np.signbit(y[2]))
    assert np.all(np.isnan(y[9]) == np.isnan(x[9]))
    assert np.all(y[10][np.isinf(x[10])] == x[10][np.isinf(x[10])])
    # FLT_MAX clips to max_code * 2^(127 - element_bits + 2), finite.
    spec = me.get_spec(fmt)
    top = F32(spec.max_code * 2.0 ** (127 - spec.element_bits + 2))
    np.testing.assert_array_equal(np.abs(y[7]), top)
    assert np.mean(r.y[0] != x[0]) > 0.9  # quantization did something


@pytest.mark.parametrize(
    "fmt,length", covering([(f, n) for f in FORMATS for n in (1, 7, 17, 40)], every=2)
)
def test_partial_blocks(fmt, length, rng):
    x = (rng.standard_normal((3, length)) * 4).astype(F32)
    check_against_model(x, fmt)
    q = me.quantize(x, fmt)
    assert q.mantissas.shape == (3, length)
    assert q.shared_exponent.shape == (3, -(-length // 16))


@pytest.mark.parametrize("fmt", ["mx6", "msfp12"])
@pytest.mark.parametrize("axis", [0, 1, -3])
def test_other_axes(fmt, axis, rng):
    x = (rng.standard_normal((20, 33, 3)) * np.exp2(rng.integers(-5, 5, (20, 33, 3)))).astype(F32)
    x[0, :, 0] = np.nan
    check_against_model(x, fmt, axis=axis)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("fmt", ["mx9", "mx4", "msfp16"])
def test_low_precision_inputs(dtype, fmt, rng):
    x = rng.standard_normal((4, 48)) * np.exp2(rng.integers(-16, 12, (4, 48)))
    x[1] *= 2.0**-10  # float16: subnormal inputs, normal in float32
    x = jnp.asarray(x.astype(F32)).astype(dtype)
    y = me.fake_quantize(x, fmt)
    assert y.dtype == dtype
    # Every result is exact in the input dtype, so x's dtype loses nothing.
    r = ref.quark_mx(np.asarray(x.astype(jnp.float32)), fmt)
    bits_equal(np.asarray(y.astype(jnp.float32)), r.y)
    bits_equal(np.asarray(me.dequantize(*me.quantize(x, fmt), fmt, dtype=dtype)), np.asarray(y))


_FLOATS = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)


@hypothesis.settings(max_examples=40)
@given(
    x=hnp.arrays(np.float32, st.sampled_from([(2, 16), (1, 37), (3, 8)]), elements=_FLOATS),
    fmt=st.sampled_from(FORMATS),
)
def test_property_any_float32(x, fmt):
    check_against_model(x, fmt)


@hypothesis.settings(max_examples=40)
@given(
    mant=hnp.arrays(np.int32, (2, 32), elements=st.integers(-(2**24), 2**24)),
    shift=st.integers(-150, 100),
    fmt=st.sampled_from(FORMATS),
)
def test_property_short_significands(mant, shift, fmt):
    # Integers times a power of two: exact midpoints (ties), values on the
    # grid and values that round up into the next binade are common here.
    x = (mant.astype(np.float64) * 2.0**shift).astype(F32)
    check_against_model(x, fmt)


# --------------------------------------------------------------------------
# Hand-checked rules.
# --------------------------------------------------------------------------


def test_ties_round_half_to_even():
    # MX9, block exponent 0 (from 1.0): the pair (1.0, v) is unshifted, grid
    # 2^-6; the pair (a, b) below 1 is shifted, grid 2^-7.
    g = 2.0**-6
    x = np.zeros(16, F32)
    x[:4] = [1.0, 2.5 * g, 0.5 * (2.5 * g), 0.5 * (3.5 * g)]
    x[4:6] = [-(0.25 * g), 1.25 * g]  # shifted: -0.5 -> -0, 2.5 -> 2
    y = np.asarray(me.fake_quantize(x, "mx9"))
    np.testing.assert_array_equal(y[:6], [1.0, 2 * g, 1 * g, 2 * g, -0.0, 1 * g])
    assert np.signbit(y[4])


def test_shifted_pair_clips_instead_of_reaching_the_block_exponent():
    # MX4, block exponent 1 (from 2.0). The pair (1.9, 0) is below 2^1, so
    # its grid is 0.5 and 1.9 / 0.5 = 3.8 rounds to 4, clipped to code 3:
    # 1.5 (Quark's older revision gave 2.0). 3.9 rounds to 4 and clips to 3.
    x = np.array([2.0, 0.0, 1.9, 0.0, 3.9] + [0.0] * 11, F32)
    y = np.asarray(me.fake_quantize(x, "mx4"))
    np.testing.assert_array_equal(y[:5], [2.0, 0.0, 1.5, 0.0, 3.0])
    q = me.quantize(x, "mx4")
    np.testing.assert_array_equal(np.asarray(q.micro)[:3], [0, 1, 0])


def test_micro_bit_per_pair():
    # One element at the block exponent keeps its pair unshifted; a pair of
    # zeros in a nonzero block is shifted; an all-zero block has no shifts.
    x = np.zeros((2, 16), F32)
    x[0, 3] = 1.5  # block exponent 0, pair 1 unshifted
    x[0, 8] = 0.7  # pair 4: below, shifted
    q = me.quantize(x, "mx6")
    want = np.ones(8, np.uint8)
    want[1] = 0
    np.testing.assert_array_equal(np.asarray(q.micro)[0], want)
    np.testing.assert_array_equal(np.asarray(q.micro)[1], 0)
    np.testing.assert_array_equal(np.asarray(q.shared_exponent), [[127], [0]])
    # Microexponents off: MSFP12 on the same block uses one grid, 2^-2.
    np.testing.assert_array_equal(np.asarray(me.fake_quantize(x, "msfp12"))[0, [3, 8]], [1.5, 0.75])
    np.testing.assert_array_equal(np.asarray(me.fake_quantize(x, "mx6"))[0, [3, 8]], [1.5, 0.6875])


def test_nonfinite_blocks():
    x = np.array([[1.0, np.nan] + [0.25] * 14, [np.inf, 3.0] + [0.5] * 14, [1.0] * 16], F32)
    y = np.asarray(me.fake_quantize(x, "mx9"))
    assert np.isnan(y[0, 1]) and y[0, 0] == 1.0 and y[1, 0] == np.inf and y[1, 1] == 3.0
    q = me.quantize(x, "mx9")
    np.testing.assert_array_equal(np.asarray(q.shared_exponent)[:, 0], [255, 255, 127])
    dq = np.asarray(me.dequantize(*q, "mx9"))
    assert np.isnan(dq[:2]).all() and (dq[2] == 1.0).all()
    # Inf's code saturates with its sign (Quark clips x / 2^step); NaN's is +0.
    assert int(q.mantissas[1, 0]) == 127 and int(q.mantissas[0, 1]) == 0
    assert int(me.quantize(-x, "mx9").mantissas[1, 0]) == 0x80 | 127


def test_dequantize_arbitrary_codes_exactly():
    # Exponent byte 0 with nonzero codes gives float32 subnormals (down to
    # 2^-134 for MX9 shifted pairs): built exactly, not flushed.
    spec = me.MX9
    codes = np.arange(256, dtype=np.uint8).reshape(16, 16)
    for se in (0, 1, 100, 254):
        se_arr = np.full((16, 1), se, np.uint8)
        micro = np.tile(np.array([0, 1] * 4, np.uint8), (16, 1))
        got = np.asarray(me.dequantize(codes, se_arr, micro, spec)).astype(np.float64)
        k = (codes & 127).astype(np.float64) * np.where(codes & 128, -1.0, 1.0)
        step = se - 127 - 6 - np.repeat(micro, 2, -1).astype(np.float64)
        want = (k * np.exp2(step)).astype(F32)
        bits_equal(got.astype(F32), want, f"exponent byte {se}")
    assert np.asarray(me.dequantize(codes, np.zeros((16, 1), np.uint8), micro, spec))[0, 1] > 0


# --------------------------------------------------------------------------
# jit, vmap, gradient.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["mx9", "mx6", "msfp12"])
def test_vmap_and_jit(fmt, rng):
    x = jnp.asarray((rng.standard_normal((3, 5, 40)) * 3).astype(F32))
    y = me.fake_quantize(x, fmt)
    bits_equal(jax.vmap(lambda v: me.fake_quantize(v, fmt))(x), y)
    # Blocks along the vmapped function's axis 0, batched over another axis.
    along0 = jax.vmap(lambda v: me.fake_quantize(v, fmt, axis=0), in_axes=1, out_axes=1)
    bits_equal(along0(jnp.moveaxis(x, 2, 0)), jnp.moveaxis(y, 2, 0))
    q = me.quantize(x, fmt)
    qv = jax.jit(jax.vmap(lambda v: me.quantize(v, fmt)))(x)
    for a, b in zip(q, qv, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    dq = jax.jit(jax.vmap(lambda *a: me.dequantize(*a, fmt)))(*qv)
    bits_equal(dq, y)


def test_straight_through_gradient():
    x = jnp.linspace(-3.0, 3.0, 32)
    g = jax.grad(lambda v: jnp.sum(me.fake_quantize(v, "mx6") * v))(x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(me.fake_quantize(x, "mx6") + x))


# --------------------------------------------------------------------------
# Packing and storage.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,axis", covering([(f, a) for f in FORMATS for a in (-1, 0)], every=2))
def test_pack_round_trip(fmt, axis, rng):
    spec = me.get_spec(fmt)
    x = (rng.standard_normal((37, 24)) * 2).astype(F32)
    q = me.quantize(x, fmt, axis=axis)
    pc, pm = storage.pack(q.mantissas, q.micro, fmt, axis=axis)
    n = x.shape[axis]
    assert pc.dtype == jnp.uint8 and pc.shape[axis] == packed_length(n, spec.element_bits)
    # The same little-endian bit stream as jaxmx.bitstream.
    neg = axis if axis < 0 else axis - x.ndim
    np.testing.assert_array_equal(
        np.asarray(pc), np.asarray(bitstream.pack_codes(q.mantissas, spec.element_bits, neg))
    )
    m, mi = storage.unpack(pc, pm, fmt, axis=axis, length=n)
    np.testing.assert_array_equal(np.asarray(m), np.asarray(q.mantissas))
    if spec.sub_block_size is None:
        assert pm is None and mi is None
    else:
        np.testing.assert_array_equal(np.asarray(mi), np.asarray(q.micro))
        np.testing.assert_array_equal(
            np.asarray(pm), np.asarray(bitstream.pack_codes(q.micro, 1, neg))
        )
    bits_equal(
        me.dequantize(m, q.shared_exponent, mi, fmt, axis=axis), me.fake_quantize(x, fmt, axis=axis)
    )
    stored = pc.size + q.shared_exponent.size + (0 if pm is None else pm.size)
    assert stored == storage.nbytes(x.shape, fmt, axis=axis)


@pytest.mark.parametrize("bits", [1, 3, 4, 5, 8])
def test_element_and_micro_widths_pack_densely_and_round_trip(bits, rng):
    # the widths MX9/6/4 and MSFP store (micro bits 1; mantissas 3, 4, 5, 8)
    codes = jnp.asarray(rng.integers(0, 2**bits, (5, 67)).astype(np.uint8))
    packed = bitstream.pack_codes(codes, bits, -1)
    assert packed.shape == (5, packed_length(67, bits))
    got = bitstream.unpack_codes(packed, bits, -1, 67)
    assert got.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(got), np.asarray(codes))


def test_bits_per_element():
    got = {name: s.bits_per_element for name, s in me.SPECS.items()}
    assert got == {"mx9": 9.0, "mx6": 6.0, "mx4": 4.0, "msfp16": 8.5, "msfp12": 4.5}
    for name, s in me.SPECS.items():
        assert storage.nbytes((16, 128), name) * 8 == s.bits_per_element * 16 * 128
        assert storage.nbytes((128, 16), name, axis=0) * 8 == s.bits_per_element * 16 * 128


# --------------------------------------------------------------------------
# Accuracy: the BDR paper's ordering.
# --------------------------------------------------------------------------


def test_qsnr_ordering_on_gaussian_data():
    x = jax.random.normal(jax.random.key(0), (256, 256))
    q = {f: analysis.snr_db(x, me.fake_quantize(x, f)) for f in FORMATS}
    # MX9 above MSFP16 (the microexponent buys ~half a bit per element),
    # MX6 above MSFP12, and each format ~6 dB per mantissa bit apart.
    assert q["mx9"] > q["msfp16"] + 1.0
    assert q["mx6"] > q["msfp12"]
    assert q["mx9"] > q["mx6"] > q["mx4"]
    assert 35 < q["mx9"] < 50 and 15 < q["mx6"] < 35 and 5 < q["mx4"] < 20


# --------------------------------------------------------------------------
# Argument checks.
# --------------------------------------------------------------------------


def test_errors():
    x = jnp.ones((2, 16))
    with pytest.raises(ValueError, match="unknown format"):
        me.fake_quantize(x, "mx5")
    with pytest.raises(TypeError, match="dtype"):
        me.quantize(jnp.ones((2, 16), jnp.int32), "mx9")
    with pytest.raises(ValueError, match="out of range"):
        me.fake_quantize(x, "mx9", axis=2)
    with pytest.raises(ValueError, match="scalar"):
        me.fake_quantize(jnp.float32(1.0), "mx9")
    with pytest.raises(ValueError, match="sub_block_size"):
        me.MicroexpSpec(name="bad", mantissa_bits=4, sub_block_size=16)
    with pytest.raises(ValueError, match="mantissa_bits"):
        me.MicroexpSpec(name="bad", mantissa_bits=8)
    with pytest.raises(ValueError, match="exponent_bits"):
        me.MicroexpSpec(name="bad", mantissa_bits=4, exponent_bits=5)
    q = me.quantize(x, "mx6")
    with pytest.raises(ValueError, match="micro"):
        me.dequantize(q.mantissas, q.shared_exponent, None, "mx6")
    with pytest.raises(ValueError, match="shared_exponent has shape"):
        me.dequantize(q.mantissas, q.shared_exponent[:1], q.micro, "mx6")
    with pytest.raises(ValueError, match="no microexponents"):
        me.dequantize(q.mantissas, q.shared_exponent, q.micro, "msfp12")
    pc, pm = storage.pack(q.mantissas, q.micro, "mx6")
    with pytest.raises(ValueError, match="take"):
        storage.unpack(pc, pm, "mx6", length=17)
