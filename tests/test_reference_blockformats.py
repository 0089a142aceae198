"""The NumPy block-format models against the reference vectors and hand-checked cases.

tests/data/vectors_turn2 holds what TransformerEngine's NVFP4 arithmetic,
torchao's NVFP4Tensor and AMD Quark's shared-microexponent code computed on
16x128 inputs. Every array of every file must match the models bit for bit
(NaN equal to NaN, signed zeros distinguished). The hand-checked cases cover
what the vectors do not: ties, saturation, specials, subnormals, axes and
partial blocks, each worked out from the formulas in the models' docstrings.
"""

import json
import pathlib

import ml_dtypes
import numpy as np
import pytest

from tests import reference_blockformats as ref

DATA = pathlib.Path(__file__).parent / "data" / "vectors_turn2"
NVFP4_FILES = sorted(p.name for p in (DATA / "nvfp4").glob("*.npz"))
BDR_FILES = sorted(p.name for p in (DATA / "bdr").glob("*.npz"))
F32 = np.float32


def assert_bits_equal(actual, expected, what=""):
    """Equal bit for bit, except that any NaN equals any NaN."""
    a, e = np.asarray(actual), np.asarray(expected)
    assert a.shape == e.shape, (what, a.shape, e.shape)
    if a.dtype.kind == "f" or e.dtype.kind == "f":
        assert a.dtype == e.dtype, (what, a.dtype, e.dtype)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(e), err_msg=f"{what}: NaN positions")
        keep = ~np.isnan(a)
        bits = np.dtype(f"u{a.dtype.itemsize}")
        np.testing.assert_array_equal(a[keep].view(bits), e[keep].view(bits), err_msg=what)
    else:
        np.testing.assert_array_equal(a, e, err_msg=what)


def _load(folder, name):
    f = np.load(DATA / folder / name)
    return json.loads(str(f["meta"])), {k: f[k] for k in f.files if k != "meta"}


# --------------------------------------------------------------------------
# The vectors.
# --------------------------------------------------------------------------


def test_every_file_is_indexed_and_tested():
    for folder, files in (("nvfp4", NVFP4_FILES), ("bdr", BDR_FILES)):
        index = json.loads((DATA / folder / "index.json").read_text())
        assert sorted(f["file"] for f in index["files"]) == files
    sets = {n.split("__")[0] for n in NVFP4_FILES}
    assert sets == {"te_1x16", "te_16x16", "torchao_2level", "torchao_1level"}
    formats = {n.split("__")[0] for n in BDR_FILES}
    assert formats == set(ref.QUARK_FORMATS) | {"quark_bfp16"}
    assert len(NVFP4_FILES) == 4 * 5 and len(BDR_FILES) == 6 * 3


@pytest.mark.parametrize("name", NVFP4_FILES)
def test_nvfp4_vectors(name):
    meta, d = _load("nvfp4", name)
    x = d["x"]
    if meta["semantics"] == "te":
        r = ref.nvfp4_te(x, tile=meta["block_layout"])
        assert_bits_equal(r.global_amax, d["global_amax"], "global_amax")
        assert_bits_equal(r.s_enc, d["s_enc"], "s_enc")
        assert_bits_equal(r.s_dec_global, d["s_dec_global"], "s_dec_global")
        assert_bits_equal(r.encode_scale, d["encode_scale"], "encode_scale")
        assert_bits_equal(r.scaled, d["scaled"], "scaled")
        assert_bits_equal(r.dequant_enc, d["dequant_enc"], "dequant_enc")
        if meta["block_layout"] == "16x16":
            assert_bits_equal(r.tile_scales, d["tile_scales_e4m3"], "tile scales")
    else:
        two = name.startswith("torchao_2level")
        r = ref.nvfp4_torchao(x, two_level=two)
        if two:
            assert_bits_equal(r.global_amax, d["global_amax"], "global_amax")
    assert_bits_equal(r.codes, d["codes"], "codes")
    assert_bits_equal(ref.pack_fp4(r.codes), d["codes_packed"], "packed codes")
    assert_bits_equal(r.scales, d["scales_e4m3"], "scales")
    assert_bits_equal(r.dequant, d["dequant"], "dequant")
    if meta["case"] != "zeros":
        assert not np.array_equal(r.dequant, x), "quantization changed nothing"


@pytest.mark.parametrize("name", BDR_FILES)
def test_bdr_vectors(name):
    meta, d = _load("bdr", name)
    x = d["x"]
    if meta["format"] == "quark_bfp16":
        assert_bits_equal(ref.quark_bfp16(x), d["y"], "y")
        return
    r = ref.quark_mx(x, meta["format"], axis=meta["axis"], block_size=meta["block_size"])
    assert (meta["quant_bit"], meta["sub_block_size"]) == ref.QUARK_FORMATS[meta["format"]]
    assert_bits_equal(r.y, d["y"], "y")
    assert_bits_equal(r.codes, d["codes"], "codes")
    assert_bits_equal(r.step_exp, d["step_exp"], "step_exp")
    assert_bits_equal(r.block_exp, d["block_exp"], "block_exp")
    if "micro" in d:
        assert_bits_equal(r.micro, d["micro"], "micro")
    else:  # MSFP: one "sub-block" per block, never shifted
        assert r.micro.shape == (16, 8, 1) and not r.micro.any()
    if meta["case"] != "zeros":
        assert not np.array_equal(r.y, x)


@pytest.mark.parametrize("fmt", ["mx9", "mx6", "mx4"])
def test_y_legacy_differs_only_where_a_shifted_pair_rounds_up(fmt):
    # The older Quark let an element of a shifted pair that rounds past the
    # top code reach 2^block_exp; 0.13 clips it to the top code of the finer
    # grid. In the vectors that is the only difference.
    qbit, _ = ref.QUARK_FORMATS[fmt]
    top = 2 ** (qbit - 1) - 1
    seen = 0
    for case in ("normal", "zero_blocks"):
        _, d = _load("bdr", f"{fmt}__axlast__{case}__16x128.npz")
        r = ref.quark_mx(d["x"], fmt)
        diff = r.y.view(np.uint32) != d["y_legacy"].view(np.uint32)
        micro = np.repeat(r.micro.reshape(16, -1), 2, axis=1)
        block_pow = np.exp2(np.repeat(r.block_exp, 16, axis=1).astype(np.float64))
        np.testing.assert_array_equal(micro[diff], 1)
        np.testing.assert_array_equal(np.abs(r.codes[diff]), top)
        np.testing.assert_array_equal(np.abs(d["y_legacy"][diff]), block_pow[diff])
        seen += diff.sum()
    assert seen > 0


# --------------------------------------------------------------------------
# NVFP4 by hand.
# --------------------------------------------------------------------------


def test_fp4_code_ties_and_grid():
    mids = F32([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    np.testing.assert_array_equal(ref.fp4_code(mids), [0, 2, 2, 4, 4, 6, 6])
    np.testing.assert_array_equal(ref.fp4_code(-mids), [8, 10, 10, 12, 12, 14, 14])
    np.testing.assert_array_equal(ref.fp4_code(ref.E2M1_VALUES), np.arange(16))
    # Everywhere else in [-8, 8], including saturation: the RNE cast of ml_dtypes.
    v = np.linspace(-8, 8, 20001, dtype=F32)
    expect = np.clip(v, -6, 6).astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF
    np.testing.assert_array_equal(ref.fp4_code(v), expect)
    # NaN gets what torchao's helper computes from the payload bits.
    nans = np.array([0x7FC00000, 0xFFF00000, 0x7F800001], np.uint32).view(F32)
    np.testing.assert_array_equal(ref.fp4_code(nans), [3, 12, 2])


def _te_tensor(*blocks):
    """A (1, 16 * len(blocks)) tensor, each block padded with zeros."""
    rows = [np.pad(F32(b), (0, 16 - len(b))) for b in blocks]
    return np.concatenate(rows)[None, :].astype(F32)


def test_te_ties_at_unit_scale():
    # amax 2688 makes S_enc exactly 1; a block with max 6 gets s8 = 1 and
    # encode 1, so its elements are rounded as they are.
    ties = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0, -0.0]
    r = ref.nvfp4_te(_te_tensor([2688.0], ties))
    assert r.s_enc == 1 and r.scales.view(ml_dtypes.float8_e4m3fn)[0, 1] == 1
    np.testing.assert_array_equal(r.codes[0, 16:27], [7, 0, 2, 2, 4, 4, 6, 6, 8, 14, 8])
    expect = F32([6, 0, 1, 1, 2, 2, 4, 4, -0.0, -4, -0.0])
    assert_bits_equal(r.dequant_enc[0, 16:27], expect)
    assert_bits_equal(r.dequant[0, 16:27], expect)  # (1 * 2688) * f32(1/2688) == 1


def test_te_saturation_when_the_scale_rounds_down():
    # block amax 80.4: 80.4 / 6 = 13.4 rounds to the E4M3 scale 13, and
    # 80.4 / 13 = 6.18 clamps to 6: the element saturates to 6 * 13 = 78.
    r = ref.nvfp4_te(_te_tensor([2688.0], [80.4, -80.4, 13.0]))
    assert r.scales.view(ml_dtypes.float8_e4m3fn)[0, 1] == 13
    assert F32(80.4) * r.encode_scale[0, 1] > 6
    np.testing.assert_array_equal(r.codes[0, 16:19], [7, 15, 2])
    assert_bits_equal(r.dequant_enc[0, 16:19], F32([78, -78, 13]))


def test_te_scale_is_one_product_rounding():
    # 0.002197265625 * 896 / 6 is exactly 0.328125, the midpoint of the E4M3
    # values 0.3125 (0x2A) and 0.34375 (0x2B). TE's block_amax * (S_enc *
    # f32(1/6)) lands just above it; (block_amax / 6) * S_enc lands on it
    # and would round to even, 0x2A.
    b = F32(0.002197265625)
    r = ref.nvfp4_te(_te_tensor([3.0], [b]))
    assert r.s_enc == 896
    assert F32(b * F32(F32(896) * (F32(1) / F32(6)))) > 0.328125
    assert F32(F32(b / F32(6)) * F32(896)) == 0.328125
    assert r.scales[0, 1] == 0x2B


def test_te_all_zero_tensor_and_zero_blocks():
    r = ref.nvfp4_te(np.zeros((16, 32), F32), tile="16x16")
    assert r.s_enc == 1 and r.global_amax == 0
    assert not r.codes.any() and not r.scales.any() and not r.tile_scales.any()
    assert_bits_equal(r.dequant, np.zeros((16, 32), F32))
    assert np.all(r.encode_scale == np.finfo(F32).max)
    # -0.0 keeps its sign through the code (8) and the dequantized value.
    r = ref.nvfp4_te(_te_tensor([1.0], [-0.0]))
    assert r.codes[0, 16] == 8 and np.signbit(r.dequant[0, 16])
    # torchao gives an all-zero block the scale 2^-6 and an all-zero tensor NaN.
    assert ref.nvfp4_torchao(np.zeros((1, 16), F32), two_level=False).scales[0, 0] == 0x08
    assert np.isnan(ref.nvfp4_torchao(np.zeros((1, 16), F32)).dequant).all()


def test_te_nan_and_inf():
    x = _te_tensor([1.0, 2.0], [np.nan, 3.0], [4.0])
    r = ref.nvfp4_te(x)
    # NaN reaches the tensor amax: every scale and value is NaN.
    assert np.isnan(r.global_amax) and np.all(r.scales == 0x7F) and np.isnan(r.dequant).all()
    # With a finite tensor amax given, only the NaN's block is lost.
    r = ref.nvfp4_te(x, tensor_amax=4.0)
    assert r.scales[0, 1] == 0x7F and r.scales[0, 0] != 0x7F and r.scales[0, 2] != 0x7F
    assert np.isnan(r.dequant[0, 16:32]).all()
    assert np.isfinite(np.delete(r.dequant[0], np.s_[16:32])).all()
    # Inf: amax Inf makes S_enc = 2688 / Inf = 0, which falls back to 1; the
    # Inf element saturates to code 15 (-6) under scale 448. TE's decode
    # multiplies by amax = Inf (so zero codes give NaN); the encode-side
    # decode stays finite.
    r = ref.nvfp4_te(_te_tensor([1.0, -np.inf], [3.0]))
    assert r.s_enc == 1 and r.scales.view(ml_dtypes.float8_e4m3fn)[0, 0] == 448
    assert r.codes[0, 1] == 15 and r.dequant_enc[0, 1] == -6 * 448
    assert r.codes[0, 16] == 7 and r.dequant_enc[0, 16] == 3.0
    assert r.dequant[0, 1] == -np.inf and r.dequant[0, 16] == np.inf
    assert np.isnan(r.dequant[0, [0, 2, 17]]).all()


def test_te_subnormal_blocks_are_kept_but_their_encode_scale_clamps():
    # amax 2^-112: S_enc = 2688 * 2^112 and S_enc * f32(1/6) rounds to exactly
    # 448 * 2^112. A block of float32 subnormals with amax 1.5 * 2^-127 gets
    # 672 * 2^-15 = 10.5 * 2^-9, an E4M3 tie that goes to the even 1.25 * 2^-6.
    sub = F32([2.0**-127, -(2.0**-127), 2.0**-128, 1.5 * 2.0**-127, 2.0**-129])
    r = ref.nvfp4_te(_te_tensor([2.0**-112], sub))
    assert r.s_enc == F32(2688 * 2.0**112)
    assert r.scales.view(ml_dtypes.float8_e4m3fn)[0, 1] == 1.25 * 2.0**-6
    # Its encode scale 1 / (s8 / S_enc) is about 6 / block_amax, which exceeds
    # FLT_MAX for any block amax below 6 / FLT_MAX (~2^-125.6): TE clamps it.
    # The subnormals are not flushed (x * FLT_MAX gives codes 2, -2, 1, 3,
    # 0.5) but decode to a fixed fraction, 2 * s8 / S_enc / 2^-127 = 0.476, of
    # their value.
    assert r.encode_scale[0, 1] == np.finfo(F32).max
    np.testing.assert_array_equal(r.codes[0, 16:21], [4, 12, 2, 5, 1])
    step = F32(F32(1.25 * 2.0**-6) * r.s_dec_global)
    assert_bits_equal(r.dequant_enc[0, 16:21], F32([2, -2, 1, 3, 0.5]) * step)
    np.testing.assert_allclose(r.dequant_enc[0, 16:21] / sub, 0.476, atol=1e-3)
    # A tensor of only these subnormals clamps S_enc at FLT_MAX: s8 = 0.5,
    # 1 / S_enc = 2^-128, the encode scale clamps again, and every element
    # decodes to exactly half its value.
    r = ref.nvfp4_te(_te_tensor(sub))
    assert r.s_enc == np.finfo(F32).max and r.s_dec_global == 2.0**-128
    assert r.scales[0, 0] == 0x30  # 0.5
    np.testing.assert_array_equal(r.codes[0, :5], [4, 12, 2, 5, 1])
    assert_bits_equal(r.dequant_enc[0, :5], sub / F32(2))


def test_te_axes_tiles_and_partial_blocks():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((32, 48)).astype(F32)
    along0 = ref.nvfp4_te(x, axis=0)
    along1 = ref.nvfp4_te(x.T, axis=-1)
    assert_bits_equal(along0.dequant, along1.dequant.T)
    assert_bits_equal(along0.scales, along1.scales.T)
    assert along0.scales.shape == (2, 48)
    # 16x16 tiles are symmetric in the two axes.
    t0, t1 = ref.nvfp4_te(x, axis=0, tile="16x16"), ref.nvfp4_te(x, tile="16x16")
    assert_bits_equal(t0.dequant, t1.dequant)
    assert t1.tile_scales.shape == (2, 3) and t1.scales.shape == (32, 3)
    # A 3-D tensor flattens its leading axes into rows, as TE does.
    x3 = x.reshape(2, 16, 48)
    assert_bits_equal(ref.nvfp4_te(x3, tile="16x16").dequant.reshape(32, 48), t1.dequant)
    # The per-tile scale sets every 1x16 block of the tile: coarser, never better.
    assert np.sum((t1.dequant - x) ** 2) >= np.sum((ref.nvfp4_te(x).dequant - x) ** 2)
    with pytest.raises(ValueError, match="multiple of 16"):
        ref.nvfp4_te(np.ones((2, 40), F32))
    with pytest.raises(ValueError, match="16 rows"):
        ref.nvfp4_te(np.ones((8, 32), F32), tile="16x16")
    with pytest.raises(ValueError, match="tile"):
        ref.nvfp4_te(np.ones((16, 32), F32), tile="32x32")
    with pytest.raises(TypeError, match="float64"):
        ref.nvfp4_te(np.ones((1, 16)))


def test_pack_fp4_layout():
    codes = np.array([[1, 2, 3, 4], [15, 0, 8, 7]], np.uint8)
    np.testing.assert_array_equal(ref.pack_fp4(codes), [[0x21, 0x43], [0x0F, 0x78]])
    np.testing.assert_array_equal(ref.pack_fp4(codes, axis=0), [[0xF1, 0x02, 0x83, 0x74]])


# --------------------------------------------------------------------------
# MX9 / MX6 / MX4 / MSFP by hand.
# --------------------------------------------------------------------------


def _row(*v):
    return np.pad(F32(v), (0, 16 - len(v)))[None, :]


def test_mx_shifted_pair_that_rounds_up_is_clipped():
    # block_exp 0 (from 1.0); the pair (0.999, 0.999) is below it, so it is
    # shifted: step 2^-7, 0.999 * 128 = 127.9 rounds to 128, clipped to 127.
    # The older Quark returned 2^block_exp = 1.0 here (y_legacy).
    r = ref.quark_mx(_row(1.0, 0.0, 0.999, 0.999), "mx9")
    assert r.block_exp[0, 0] == 0
    np.testing.assert_array_equal(r.micro[0, 0, :2], [0, 1])
    np.testing.assert_array_equal(r.step_exp[0, :4], [-6, -6, -7, -7])
    np.testing.assert_array_equal(r.codes[0, :4], [64, 0, 127, 127])
    np.testing.assert_array_equal(r.y[0, :4], [1.0, 0.0, 127 / 128, 127 / 128])


def test_mx_ties_round_half_to_even():
    # mx4 (3-bit codes): block_exp 1 (from 2.0); a pair holding a 2.x stays
    # on step 2^0, a pair wholly below 2^1 is shifted to step 2^-1.
    x = _row(2.0, 2.5, 0.5, 2.0, -1.5, 2.0, -0.5, 2.0, 0.25, 0.75, 1.25, 0.0)
    r = ref.quark_mx(x, "mx4")
    np.testing.assert_array_equal(r.micro[0, 0, :6], [0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(r.step_exp[0, :12], [0] * 8 + [-1] * 4)
    # 2.5 -> 2, 0.5 -> 0, -1.5 -> -2, -0.5 -> -0; shifted: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2.
    assert_bits_equal(r.codes[0, :12], F32([2, 2, 0, 2, -2, 2, -0.0, 2, 0, 2, 2, 0]))
    assert_bits_equal(r.y[0, :12], F32([2, 2, 0, 2, -2, 2, -0.0, 2, 0, 1, 1, 0]))


def test_mx_saturation_at_the_top_code():
    # mx4 codes stop at 3: in the top binade [2, 4), 3.5 and 3.9 clip to 3.
    r = ref.quark_mx(_row(3.9, -3.5, 3.0), "mx4")
    np.testing.assert_array_equal(r.y[0, :3], [3, -3, 3])
    # msfp12 (4-bit codes, no microexponent): top binade [4, 8) at step 2^0.
    r = ref.quark_mx(_row(7.9, 0.4, 0.6), "msfp12")
    np.testing.assert_array_equal(r.step_exp[0, :3], [0, 0, 0])
    np.testing.assert_array_equal(r.y[0, :3], [7, 0, 1])
    assert not r.micro.any()


def test_mx_all_zero_tensor():
    for fmt, (qbit, sub) in ref.QUARK_FORMATS.items():
        x = np.zeros((3, 32), F32)
        x[1, 5] = -0.0
        r = ref.quark_mx(x, fmt)
        assert_bits_equal(r.y, np.zeros((3, 32), F32), fmt)  # -0.0 becomes +0.0
        assert np.all(r.block_exp == -127) and not r.micro.any()
        assert np.all(r.step_exp == -127 - qbit + 2)
        assert r.micro.shape == (3, 2, 16 // sub)


def test_mx_nan_inf_pass_through_and_subnormals_flush():
    x = _row(np.nan, 1.5, np.inf, 0.25, -np.inf, 1e-40, -1e-40, 0.5)
    r = ref.quark_mx(x, "mx6")
    # NaN/Inf do not choose the exponent (1.5 does: block_exp 0) and keep their value.
    assert r.block_exp[0, 0] == 0
    assert_bits_equal(r.y[0, [0, 2, 4]], x[0, [0, 2, 4]])
    assert np.isnan(r.codes[0, 0]) and r.codes[0, 2] == 15 and r.codes[0, 4] == -15
    # NaN/Inf count as zero when the microexponents are chosen: the pairs
    # (inf, 0.25), (-inf, 1e-40), (-1e-40, 0.5) are all below 2^0, shifted.
    np.testing.assert_array_equal(r.micro[0, 0, :4], [0, 1, 1, 1])
    # mx6 (5-bit codes): step 2^(0 - 3) for 1.5 (code 12), 2^-4 when shifted.
    assert r.y[0, 1] == 1.5 and r.codes[0, 1] == 12
    assert r.y[0, 3] == 0.25 and r.codes[0, 3] == 4 and r.codes[0, 7] == 8
    # Subnormals become +0 before anything else, whatever their sign.
    assert_bits_equal(r.y[0, [5, 6]], F32([0.0, 0.0]))


def test_mx_block_of_subnormals_only():
    r = ref.quark_mx(np.full((1, 16), 1e-39, F32), "mx9")
    assert r.block_exp[0, 0] == -127 and not r.y.any()


def test_mx_axes_and_partial_blocks():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((20, 6)).astype(F32)
    r0 = ref.quark_mx(x, "mx6", axis=0)
    r1 = ref.quark_mx(x.T, "mx6")
    assert_bits_equal(r0.y, r1.y.T)
    assert r0.block_exp.shape == (2, 6) and r0.micro.shape == (2, 8, 6)
    # The partial last block (20 = 16 + 4) behaves as if zero-padded.
    padded = ref.quark_mx(np.pad(x.T, ((0, 0), (0, 12))), "mx6")
    assert_bits_equal(r1.y, padded.y[:, :20])
    assert_bits_equal(r1.block_exp, padded.block_exp)
    assert_bits_equal(r1.micro, padded.micro)
    # Explicit parameters equal the named format.
    assert_bits_equal(ref.quark_mx(x, quant_bit=5, sub_block_size=2).y, ref.quark_mx(x, "mx6").y)
    with pytest.raises(ValueError, match="unknown format"):
        ref.quark_mx(x, "mx7")
    with pytest.raises(ValueError, match="divide"):
        ref.quark_mx(x, quant_bit=8, sub_block_size=3)
    with pytest.raises(ValueError, match="required"):
        ref.quark_mx(x)


def test_mx_coarser_formats_lose_more():
    x = np.random.default_rng(3).standard_normal((64, 256)).astype(F32)
    err = {f: np.sum((ref.quark_mx(x, f).y - x) ** 2.0) for f in ref.QUARK_FORMATS}
    assert err["mx9"] < err["msfp16"] < err["mx6"] < err["msfp12"] < err["mx4"]
    assert err["mx9"] > 0


# --------------------------------------------------------------------------
# Per-tensor FP8 by hand.
# --------------------------------------------------------------------------


def test_tensor_fp8_rounding_and_ties():
    # amax 448 gives scale 1: values round as they are, ties to the even mantissa.
    x = F32([448.0, 1.0625, 1.1875, -1.0625, 464.0 - 448.0, 0.0009765625])
    r = ref.tensor_fp8(x)
    assert r.scale == 1
    # 2^-10 is the midpoint of 0 and 2^-9: ties to 0.
    np.testing.assert_array_equal(r.y, [448.0, 1.0, 1.25, -1.0, 16.0, 0.0])
    assert r.codes.dtype == ml_dtypes.float8_e4m3fn


def test_tensor_fp8_scale_and_saturation():
    x = np.random.default_rng(4).standard_normal(1000).astype(F32) * F32(3.7)
    for element, top in (("e4m3", 448.0), ("e5m2", 57344.0)):
        r = ref.tensor_fp8(x, element)
        amax = np.abs(x).max()
        assert r.scale == F32(amax / F32(top))
        assert np.abs(r.codes.astype(F32)).max() == top  # the amax lands on max normal
        assert np.isfinite(r.y).all() and (r.y != x).any()
        rel = np.abs(r.y - x)[np.abs(x) > amax / 64] / np.abs(x)[np.abs(x) > amax / 64]
        assert rel.max() <= 2.0 ** -(4 if element == "e4m3" else 3) * 1.0001


def test_tensor_fp8_degenerate_amax():
    r = ref.tensor_fp8(F32([0.0, -0.0]))
    assert r.scale == 1
    assert_bits_equal(r.y, F32([0.0, -0.0]))
    # amax / 448 underflows: the scale becomes 2^-149 and the value survives.
    tiny = np.array([1], np.uint32).view(F32)  # 2^-149
    r = ref.tensor_fp8(np.concatenate([tiny, -tiny]))
    assert r.scale == tiny[0]
    assert_bits_equal(r.y, np.concatenate([tiny, -tiny]))
    for bad in (np.nan, np.inf, -np.inf):
        r = ref.tensor_fp8(F32([1.0, bad]), "e5m2")
        assert np.isnan(r.scale) and np.isnan(r.y).all() and np.isnan(r.codes.astype(F32)).all()
    with pytest.raises(ValueError, match="element"):
        ref.tensor_fp8(F32([1.0]), "e3m4")
    with pytest.raises(ValueError, match="empty"):
        ref.tensor_fp8(np.zeros((0, 3), F32))
