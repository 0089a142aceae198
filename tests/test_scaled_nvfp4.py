"""NVFP4 numerics (jaxmx.families.nvfp4) against the vectors and the NumPy reference.

tests/data/vectors_turn2/nvfp4 holds what TransformerEngine's arithmetic and
torchao's NVFP4Tensor computed on 16x128 inputs; every array must match bit
for bit (torchao's scale rule, tests/_torchao_nvfp4.py, runs through jaxmx's
kernels). tests/reference_blockformats.py models the same arithmetic
independently in NumPy (no flushing of subnormals), so on random inputs,
zeros, tiny and huge scales, NaN/Inf, other axes and 2-D tiles jaxmx must
agree with it bit for bit as well, under jit and vmap. The exact integer
float32 helpers (jaxmx.families._f32) are checked against NumPy's IEEE
arithmetic on random bit patterns.
"""

import json
import pathlib

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxmx import numerics
from jaxmx.families import _f32 as f32
from jaxmx.families.nvfp4 import _layout, _scales
from jaxmx.families.nvfp4._kernels import nvfp4_dequantize, nvfp4_fake_quantize, nvfp4_quantize
from tests import _torchao_nvfp4 as torchao
from tests import reference_blockformats as ref
from tests._params import covering

DATA = pathlib.Path(__file__).parent / "data" / "vectors_turn2" / "nvfp4"
FILES = sorted(p.name for p in DATA.glob("*.npz"))
TE_FILES = [n for n in FILES if n.startswith("te_")]
TORCHAO_FILES = [n for n in FILES if n.startswith("torchao_")]
F32 = np.float32


def bits_equal(actual, expected, what=""):
    """Equal bit for bit, except that any NaN equals any NaN."""
    a, e = np.asarray(actual), np.asarray(expected)
    assert a.shape == e.shape, (what, a.shape, e.shape)
    if a.dtype.kind == "f" or e.dtype.kind == "f" or a.dtype.itemsize != e.dtype.itemsize:
        a = a.astype(F32) if a.dtype != e.dtype else a
        np.testing.assert_array_equal(np.isnan(a), np.isnan(e), err_msg=f"{what}: NaN positions")
        keep = ~np.isnan(a)
        u = np.dtype(f"u{a.dtype.itemsize}")
        np.testing.assert_array_equal(a[keep].view(u), e[keep].view(u), err_msg=what)
    else:
        np.testing.assert_array_equal(a, e, err_msg=what)


def scale_bytes(s):
    return np.asarray(s).view(np.uint8)


def load(name):
    f = np.load(DATA / name)
    return json.loads(str(f["meta"])), {k: f[k] for k in f.files if k != "meta"}


# --------------------------------------------------------------------------
# The vectors.
# --------------------------------------------------------------------------


def test_every_vector_file_is_tested():
    assert len(TE_FILES) == 10 and len(TORCHAO_FILES) == 10


# Every TE file also runs through jaxmx.quantize in test_families (the public
# path); here a third of them run in make test, all in make test-slow.
@pytest.mark.parametrize("name", covering(TE_FILES, every=3))
def test_te_vectors(name):
    meta, d = load(name)
    x = d["x"]
    tiles = meta["block_layout"] == "16x16"
    bs = (16, 16) if tiles else 16
    codes, scales, ts = nvfp4_quantize(x, block_size=bs)
    assert codes.dtype == jnp.uint8 and scales.dtype == jnp.float8_e4m3fn
    bits_equal(codes, d["codes"], "codes")
    bits_equal(ref.pack_fp4(np.asarray(codes)), d["codes_packed"], "packed codes")
    if tiles:
        assert scales.shape == (1, 8)
        bits_equal(scale_bytes(scales), d["tile_scales_e4m3"], "tile scales")
        bits_equal(np.repeat(scale_bytes(scales), 16, axis=0), d["scales_e4m3"], "scales")
    else:
        bits_equal(scale_bytes(scales), d["scales_e4m3"], "scales")
    bits_equal(ts, d["s_dec_global"], "tensor scale = 1 / S_enc")
    # Both TE decodes: the stored tensor scale, and the kernel's amax formula.
    bits_equal(nvfp4_dequantize(codes, scales, ts, block_size=bs), d["dequant_enc"], "dequant_enc")
    bits_equal(nvfp4_fake_quantize(x, block_size=bs), d["dequant_enc"], "fake dequant_enc")
    bits_equal(
        nvfp4_dequantize(codes, scales, ts, block_size=bs, tensor_amax=d["global_amax"]),
        d["dequant"],
        "dequant (TE kernel)",
    )
    bits_equal(nvfp4_fake_quantize(x, block_size=bs, decode="amax"), d["dequant"], "fake dequant")
    # The per-tensor and per-block chain, both forms (float and integer).
    xb, _ = _layout.split(f32.bits(jnp.asarray(x)), *_layout.layout(x.shape, -1, bs))
    within = (2,) if not tiles else (1, 3)
    block_amax = jnp.max(xb & jnp.uint32(0x7FFFFFFF), axis=within, keepdims=True)
    t = _scales.TE.tensor(block_amax, None)
    bits_equal(f32.from_bits(t.amax), d["global_amax"], "global amax")
    bits_equal(f32.from_bits(t.s_enc), d["s_enc"], "S_enc")
    for exact in (False, True):
        b = _scales.TE.blocks(block_amax, t, exact)
        enc = np.asarray(f32.from_bits(b.enc)).squeeze(within)
        bits_equal(enc, d["encode_scale"], f"encode scale (exact={exact})")
    if meta["case"] != "zeros":
        assert not np.array_equal(np.asarray(nvfp4_fake_quantize(x)), x)


@pytest.mark.parametrize("name", TORCHAO_FILES)
def test_torchao_vectors(name):
    _, d = load(name)
    x = d["x"]
    two_level = name.startswith("torchao_2level")
    codes, scales, ts = torchao.quantize(x, two_level=two_level)
    s8 = scale_bytes(scales)
    bits_equal(s8, d["scales_e4m3"], "scales")
    # Codes under a NaN scale come from NaN payload bits in torchao; jaxmx
    # gives signed zeros there (nothing reads them: the block decodes to NaN).
    finite = np.repeat((s8 & 0x7F) != 0x7F, 16, axis=1)
    bits_equal(np.asarray(codes)[finite], d["codes"][finite], "codes")
    assert not (np.asarray(codes)[~finite] & 7).any()
    bits_equal(nvfp4_dequantize(codes, scales, ts), d["dequant"], "dequant")
    bits_equal(torchao.fake_quantize(x, two_level=two_level), d["dequant"], "fake")
    if "global_amax" in d:
        bits_equal(ts, d["per_tensor_scale"], "per-tensor scale")


# --------------------------------------------------------------------------
# Against the NumPy reference.
# --------------------------------------------------------------------------


def check_te(x, *, axis=-1, tile="1x16", tensor_amax=None):
    """jaxmx == ref.nvfp4_te on x, bit for bit, for every output."""
    bs = 16 if tile == "1x16" else (16, 16)
    ax = axis if tile == "1x16" else -1
    r = ref.nvfp4_te(x, axis=ax, tile=tile, tensor_amax=tensor_amax)
    codes, scales, ts = nvfp4_quantize(x, axis=ax, block_size=bs, tensor_amax=tensor_amax)
    s8 = scale_bytes(scales)
    if tile == "1x16":
        bits_equal(s8, r.scales, "scales")
        nan = np.repeat((s8 & 0x7F) == 0x7F, 16, axis=ax)
    else:
        bits_equal(s8.reshape(-1, s8.shape[-1]), r.tile_scales, "tile scales")
        nan = np.repeat(np.repeat((s8 & 0x7F) == 0x7F, 16, axis=-1), 16, axis=-2)
    c = np.asarray(codes)
    bits_equal(c[~nan], r.codes[~nan], "codes")
    # NaN-scale blocks: the signed zero code.
    np.testing.assert_array_equal(c[nan], (np.signbit(np.asarray(x, F32)[nan]) * 8))
    bits_equal(ts, r.s_dec_global, "tensor scale")
    bits_equal(nvfp4_dequantize(codes, scales, ts, axis=ax, block_size=bs), r.dequant_enc)
    fq = nvfp4_fake_quantize(x, axis=ax, block_size=bs, tensor_amax=tensor_amax)
    bits_equal(fq, r.dequant_enc, "fake_quantize")
    fqa = nvfp4_fake_quantize(x, axis=ax, block_size=bs, tensor_amax=tensor_amax, decode="amax")
    bits_equal(fqa, r.dequant, "fake_quantize, TE kernel decode")
    return r


def check_torchao(x, two_level=True):
    r = ref.nvfp4_torchao(x, two_level=two_level)
    codes, scales, ts = torchao.quantize(x, two_level=two_level)
    s8 = scale_bytes(scales)
    bits_equal(s8, r.scales, "scales")
    nan = np.repeat((s8 & 0x7F) == 0x7F, 16, axis=-1)
    bits_equal(np.asarray(codes)[~nan], r.codes[~nan], "codes")
    bits_equal(nvfp4_dequantize(codes, scales, ts), r.dequant, "dequant")
    bits_equal(torchao.fake_quantize(x, two_level=two_level), r.dequant, "fake")


def random_tensor(rng, shape, log2_scale):
    """Normal data times 2^log2_scale with zero, tiny and tied elements mixed in."""
    x = rng.standard_normal(shape) * 2.0**log2_scale
    flat = x.reshape(-1)
    n = flat.size
    flat[rng.integers(0, n, n // 10)] = 0.0
    flat[rng.integers(0, n, n // 20)] = -0.0
    flat[rng.integers(0, n, n // 20)] *= 2.0**-30
    x = x.astype(F32)
    x.reshape(-1)[:16] = 0.0  # an all-zero block
    return x


@pytest.mark.parametrize(
    "log2_scale",
    # The fast (float) path, its edge, the exact (integer) path and overflow in
    # make test; every magnitude in make test-slow.
    covering([0, -20, -60, -100, -110, -118, -126, -135, 40, 100, 125], every=4, always=(0, -118)),
)
def test_te_matches_reference_across_magnitudes(log2_scale):
    # Scales below 2^-100 take the integer (exact) path; subnormals appear
    # from -100 on. Above 2^116 the amax clamps S_enc from below.
    rng = np.random.default_rng(abs(log2_scale))
    x = random_tensor(rng, (32, 64), log2_scale)
    r = check_te(x)
    if log2_scale > -130:
        assert not np.array_equal(r.dequant_enc, x)  # quantization did something
    check_te(x, tile="16x16")
    check_te(x, axis=0)


@pytest.mark.parametrize("log2_scale", [0, -20, -60, -100, 40, 100])
@pytest.mark.parametrize("two_level", [True, False])
def test_torchao_matches_reference(log2_scale, two_level):
    # torchao's arithmetic stays finite for tensor amax >= ~2^-110 (module docstring).
    x = random_tensor(np.random.default_rng(7), (8, 64), log2_scale)
    check_torchao(x, two_level)


def test_subnormal_blocks_under_a_normal_amax():
    # A block of float32 subnormals next to a normal block: its scale rounds
    # to 0, the encode factor is FLT_MAX, and the subnormals still get
    # nonzero codes (x * FLT_MAX), which decode to 0.
    x = np.zeros((1, 48), F32)
    x[0, 0] = 1.0
    x[0, 16:24] = F32([1e-39, -2e-39, 3e-40, 1.4e-45, -1e-38, 5e-39, 0.0, -0.0])
    x[0, 32:36] = F32([2.0**-120, 1e-40, -3e-39, 2.0**-126])  # normal max, subnormal neighbours
    r = check_te(x)
    assert r.scales[0, 1] == 0 and r.codes[0, 16:22].any()
    check_te(x, tensor_amax=2.0**-110)  # now the subnormal block gets a real scale


def test_all_zero_tensor_and_signed_zeros():
    x = np.zeros((16, 32), F32)
    x[3, 5] = -0.0
    for tile in ("1x16", "16x16"):
        r = check_te(x, tile=tile)
        assert r.s_enc == 1
    codes, scales, ts = nvfp4_quantize(x)
    assert codes[3, 5] == 8 and not np.asarray(scales).view(np.uint8).any() and ts == 1
    assert np.signbit(np.asarray(nvfp4_fake_quantize(x))[3, 5])
    # torchao: zero blocks get 2^-6; an all-zero tensor NaN scales (byte 0xFF).
    _, s, _ = torchao.quantize(x, two_level=False)
    assert np.all(scale_bytes(s) == 0x08)
    _, s, ts = torchao.quantize(x)
    assert np.all(scale_bytes(s) == 0xFF) and ts == 0
    assert np.isnan(np.asarray(torchao.fake_quantize(x))).all()


def test_nan_and_inf():
    x = np.zeros((2, 48), F32)
    x[0, :3] = [1.0, -2.0, 0.5]
    x[0, 16:19] = [np.nan, 3.0, -1.0]
    x[1, 40] = -4.0
    r = check_te(x)  # NaN in x: every scale NaN, everything NaN
    assert np.all(r.scales == 0x7F)
    r = check_te(x, tensor_amax=4.0)  # only the NaN's block is lost
    assert r.scales[0, 1] == 0x7F and (r.scales != 0x7F).sum() == 5
    codes, _, _ = nvfp4_quantize(x, tensor_amax=4.0)
    np.testing.assert_array_equal(np.asarray(codes)[0, 16:20], [0, 0, 8, 0])
    y = np.where(np.isnan(x), F32(-np.inf), x)
    r = check_te(y)  # Inf: S_enc falls back to 1, the Inf saturates
    assert r.s_enc == 1 and r.codes[0, 16] == 15
    fq = np.asarray(nvfp4_fake_quantize(y))
    assert fq[0, 16] == -6 * 448 and np.isfinite(fq).all()
    fqa = np.asarray(nvfp4_fake_quantize(y, decode="amax"))
    assert np.isinf(fqa[0, 0]) and np.isnan(fqa[0, 5])


def test_ties_and_saturation_at_unit_scale():
    # amax 2688 makes S_enc = 1; a block with max 6 has scale 1.
    ties = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0, -0.0, 5.9, 1e-30]
    x = np.zeros((1, 32), F32)
    x[0, 0] = 2688.0
    x[0, 16 : 16 + len(ties)] = ties
    check_te(x)
    c = np.asarray(nvfp4_quantize(x)[0])[0, 16 : 16 + len(ties)]
    np.testing.assert_array_equal(c, [7, 0, 2, 2, 4, 4, 6, 6, 8, 14, 8, 7, 0])
    # Saturation when the E4M3 scale rounds down: 80.4 / 13 > 6.
    x[0, 16:19] = [80.4, -80.4, 13.0]
    x[0, 19:] = 0
    check_te(x)
    np.testing.assert_array_equal(np.asarray(nvfp4_fake_quantize(x))[0, 16:19], [78, -78, 13])


def test_scale_is_one_product_rounding():
    # From the reference's hand check: TE's block_amax * (S_enc * f32(1/6))
    # lands above the E4M3 midpoint 0.328125 (-> 0x2B); two roundings would not.
    x = np.zeros((1, 32), F32)
    x[0, 0], x[0, 16] = 3.0, 0.002197265625
    assert scale_bytes(nvfp4_quantize(x)[1])[0, 1] == 0x2B
    check_te(x)


@hypothesis.settings(max_examples=40)
@hypothesis.given(
    st.integers(0, 2**32 - 1),
    st.sampled_from([0, -40, -105, -125, -140, 60, 110]),
    st.booleans(),
    st.booleans(),
)
def test_property_te_and_torchao(seed, log2_scale, specials, given_amax):
    rng = np.random.default_rng(seed)
    x = random_tensor(rng, (16, 32), log2_scale)
    if specials:
        x[rng.integers(0, 16), rng.integers(0, 32)] = rng.choice([np.nan, np.inf, -np.inf])
    amax = None
    if given_amax:
        amax = F32(np.nanmax(np.abs(np.where(np.isfinite(x), x, 0))) * rng.uniform(0.25, 4))
    check_te(x, tensor_amax=amax)
    check_te(x, tile="16x16", tensor_amax=amax)
    if log2_scale >= -40 and not specials:
        check_torchao(x, two_level=True)
        check_torchao(x, two_level=False)


# --------------------------------------------------------------------------
# Axes, tiles, jit, vmap, dtypes, errors.
# --------------------------------------------------------------------------


def test_axes_and_tiles():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((32, 48)).astype(F32)
    a0 = nvfp4_quantize(x, axis=0)
    a1 = nvfp4_quantize(x.T)
    bits_equal(a0.codes, np.asarray(a1.codes).T)
    assert a0.block_scales.shape == (2, 48)
    # 16x16 tiles: a weight and its transpose share codes and scales.
    t = nvfp4_quantize(x, block_size=(16, 16))
    tt = nvfp4_quantize(x.T, block_size=(16, 16))
    bits_equal(t.codes, np.asarray(tt.codes).T)
    bits_equal(scale_bytes(t.block_scales), scale_bytes(tt.block_scales).T)
    assert t.block_scales.shape == (2, 3)
    # Explicit tile axes, and a 3-D tensor (the reference flattens rows).
    x3 = rng.standard_normal((2, 16, 48)).astype(F32)
    bits_equal(
        nvfp4_fake_quantize(x3, block_size=(16, 16)),
        ref.nvfp4_te(x3, tile="16x16").dequant_enc,
    )
    swapped = np.swapaxes(x3, 0, 2)  # (48, 16, 2): tiles over axes 0 and 1
    bits_equal(
        nvfp4_fake_quantize(swapped, axis=(0, 1), block_size=(16, 16)),
        np.swapaxes(np.asarray(nvfp4_fake_quantize(x3, block_size=(16, 16))), 0, 2),
    )
    # Coarser tiles lose at least as much as 1x16 blocks.
    err = lambda y: np.sum((np.asarray(y) - x) ** 2)  # noqa: E731
    assert err(nvfp4_fake_quantize(x, block_size=(16, 16))) >= err(nvfp4_fake_quantize(x)) > 0


def test_jit_and_traced_tensor_amax():
    x = random_tensor(np.random.default_rng(5), (16, 64), 0)
    amax = F32(2.5)
    r = ref.nvfp4_te(x, tensor_amax=amax)
    q = jax.jit(lambda v, a: nvfp4_quantize(v, tensor_amax=a))(x, amax)
    bits_equal(q.codes, r.codes)
    fq = jax.jit(lambda v, a: nvfp4_fake_quantize(v, tensor_amax=a))(x, amax)
    bits_equal(fq, r.dequant_enc)
    dq = jax.jit(lambda c, s, t: nvfp4_dequantize(c, s, t))(*q)
    bits_equal(dq, r.dequant_enc)


def test_vmap_is_per_instance():
    # Each instance has its own tensor amax; a tiny one takes the exact path
    # while its neighbour takes the float one (the cond becomes a select).
    rng = np.random.default_rng(6)
    xs = np.stack([random_tensor(rng, (16, 32), s) for s in (0, -120, 30)])
    fq = jax.vmap(nvfp4_fake_quantize)(xs)
    q = jax.vmap(nvfp4_quantize)(xs)
    dq = jax.vmap(nvfp4_dequantize)(*q)
    for i, x in enumerate(xs):
        r = ref.nvfp4_te(x)
        bits_equal(fq[i], r.dequant_enc)
        bits_equal(q.codes[i], r.codes)
        bits_equal(q.tensor_scale[i], r.s_dec_global)
        bits_equal(dq[i], r.dequant_enc)
    fq0 = jax.vmap(lambda v: nvfp4_fake_quantize(v, axis=0), in_axes=2, out_axes=2)(
        np.moveaxis(xs, 0, 2)
    )
    for i, x in enumerate(xs):
        bits_equal(fq0[..., i], ref.nvfp4_te(x, axis=0).dequant_enc)


def test_input_and_output_dtypes():
    x = random_tensor(np.random.default_rng(8), (4, 32), 0)
    for dt in (jnp.bfloat16, jnp.float16):
        xd = jnp.asarray(x, dt)
        wide = np.asarray(xd.astype(jnp.float32))
        r = ref.nvfp4_te(wide)
        y = nvfp4_fake_quantize(xd)
        assert y.dtype == dt
        bits_equal(np.asarray(y), r.dequant_enc.astype(dt), str(dt))
        bits_equal(nvfp4_quantize(xd).codes, r.codes)
        q = nvfp4_quantize(wide)
        bits_equal(np.asarray(nvfp4_dequantize(*q, dtype=dt)), r.dequant_enc.astype(dt))


def test_errors():
    x = np.ones((2, 32), F32)
    with pytest.raises(ValueError, match="multiple of the block size"):
        nvfp4_quantize(np.ones((2, 40), F32))
    with pytest.raises(ValueError, match="multiple of the block size"):
        nvfp4_quantize(np.ones((8, 32), F32), block_size=(16, 16))
    with pytest.raises(ValueError, match="out of range"):
        nvfp4_quantize(x, axis=2)
    with pytest.raises(ValueError, match=">= 0"):
        nvfp4_quantize(x, tensor_amax=-1.0)
    with pytest.raises(ValueError, match="decode"):
        nvfp4_fake_quantize(x, decode="max")
    with pytest.raises(TypeError, match="dtype"):
        nvfp4_quantize(np.ones((2, 32), np.int32))
    with pytest.raises(TypeError, match="block_size"):
        nvfp4_quantize(x, block_size=16.0)
    q = nvfp4_quantize(x)
    with pytest.raises(ValueError, match="block_scales has shape"):
        nvfp4_dequantize(q.codes, q.block_scales[:, :1], q.tensor_scale)
    with pytest.raises(TypeError, match="uint8"):
        nvfp4_dequantize(q.codes.astype(jnp.int32), q.block_scales, q.tensor_scale)


# --------------------------------------------------------------------------
# The exact float32 helpers.
# --------------------------------------------------------------------------


def _random_patterns(rng, n):
    b = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    kind = rng.integers(0, 5, n)
    b = np.where(kind == 0, b & np.uint32(0x807FFFFF), b)  # subnormals
    b = np.where(kind == 1, (b & np.uint32(0x80FFFFFF)) | np.uint32(0x01000000), b)  # tiny normals
    b = np.where(kind == 2, (b & np.uint32(0x81FFFFFF)) | np.uint32(0x7E000000), b)  # huge
    specials = [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F7FFFFF, 1, 0x00800000]
    b[: len(specials)] = specials
    return b


def test_f32_mul_div_match_ieee():
    rng = np.random.default_rng(9)
    a, b = _random_patterns(rng, 200_000), _random_patterns(rng, 200_000)
    a = np.concatenate([a, np.repeat(a[:8], 8)])
    b = np.concatenate([b, np.tile(b[:8], 8)])
    af, bf = a.view(F32), b.view(F32)
    with np.errstate(all="ignore"):
        for fn, expect in ((f32.mul, af * bf), (f32.div, af / bf)):
            got = np.asarray(jax.jit(fn)(a, b))
            # Bit for bit, NaN payloads included (first NaN operand, x86's default NaN).
            np.testing.assert_array_equal(got, expect.view(np.uint32), err_msg=fn.__name__)


def test_bits_to_bfloat16():
    rng = np.random.default_rng(10)
    b = _random_patterns(rng, 100_000)
    got = np.asarray(numerics.bits_to_dtype(jnp.asarray(b), jnp.bfloat16)).astype(F32)
    with np.errstate(invalid="ignore"):
        want = b.view(F32).astype(ml_dtypes.bfloat16).astype(F32)
    bits_equal(got, want)
