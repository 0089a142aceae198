"""jaxmx.ptq on NVFP4 and the shared-microexponent formats, against NumPy models.

* NVFP4's scale search is Four Over Six (Cook et al. 2025): checked code for
  code against a float32-step NumPy model built on the TE reference helpers.
* The BDR search (shared exponent offsets, each pair's micro bit by error)
  is checked against a brute force over every exponent offset and every
  combination of micro bits of a block, in float64.
* The fixed-scale encoders reproduce the direct cast, and GPTQ on these
  families keeps the direct cast's scales and lowers the layer's output error.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmx
from jaxmx import ptq
from jaxmx.families.microexp import _kernels as microexp
from jaxmx.families.nvfp4 import _kernels as nvfp4
from tests import reference_blockformats as ref
from tests._params import covering

F32 = np.float32


def _heavy(shape, seed=0, df=3.0):
    return np.random.default_rng(seed).standard_t(df, size=shape).astype(np.float32)


# --- NVFP4: Four Over Six ------------------------------------------------------------------


def _four_over_six_model(x):
    """(codes, E4M3 scale bytes, tensor scale, ambiguous, four) of 1x16 blocks along -1.

    Each step one float32 operation as TE's chain, with 1536 = 6 * 256 for
    the tensor scale; block errors in float64. ``ambiguous`` marks blocks
    whose two candidate errors are so close that float32 summation order
    could pick either.
    """
    x = np.asarray(x, F32)
    blocks = x.reshape(*x.shape[:-1], -1, 16)
    bamax = np.max(np.abs(blocks), axis=-1)
    amax = F32(np.max(np.abs(x)))
    s_enc = F32(np.minimum(F32(1536.0) / amax, ref.FLT_MAX)) if amax > 0 else F32(1.0)
    s_dec = F32(F32(1.0) / s_enc)
    out = []
    for t in (6.0, 4.0):
        s8 = ref._e4m3(np.minimum(bamax * F32(s_enc * (F32(1.0) / F32(t))), ref.E4M3_MAX))
        dec = (ref._e4m3_to_f32(s8) * s_dec).astype(F32)
        enc = np.minimum(F32(1.0) / dec, ref.FLT_MAX).astype(F32)
        codes = ref.fp4_code(np.clip(blocks * enc[..., None], -6, 6))
        vals = (ref.E2M1_VALUES[codes] * dec[..., None]).astype(F32)
        err = np.sum((vals.astype(np.float64) - blocks) ** 2, axis=-1)
        out.append((codes, ref._e4m3_bits(s8), err))
    (c6, s6, e6), (c4, s4, e4) = out
    four = e4 < e6
    codes = np.where(four[..., None], c4, c6).reshape(x.shape)
    scales = np.where(four, s4, s6)
    ambiguous = np.abs(e4 - e6) <= 1e-5 * np.maximum(e4, e6)
    return codes, scales, s_dec, ambiguous, four


@pytest.mark.parametrize("seed", [0, 1])
def test_four_over_six_matches_the_numpy_model(seed):
    x = _heavy((24, 256), seed)
    got = nvfp4.nvfp4_quantize_4over6(x)
    codes, scales, s_dec, ambiguous, four = _four_over_six_model(x)
    assert float(got.tensor_scale) == s_dec
    sure = ~ambiguous
    assert sure.mean() > 0.99
    got_scales = np.asarray(got.block_scales).view(np.uint8)
    np.testing.assert_array_equal(got_scales[sure], scales[sure])
    got_codes = np.asarray(got.codes).reshape(*codes.shape[:-1], -1, 16)
    np.testing.assert_array_equal(got_codes[sure], codes.reshape(got_codes.shape)[sure])
    # Both targets occur: the search is not a constant choice.
    assert 0.05 < four.mean() < 0.95


def test_four_over_six_picks_four_for_near_maximal_blocks_and_lowers_the_error():
    x = _heavy((32, 512), 3)
    direct = jaxmx.quantize(x, "nvfp4", axis=-1)
    searched = ptq.quantize_search(x, "nvfp4", axis=-1)
    err = lambda t: float(np.sum((np.asarray(jaxmx.dequantize(t), np.float64) - x) ** 2))  # noqa: E731
    assert err(searched) < 0.95 * err(direct)
    # The result is ordinary NVFP4, with the tensor scale 1 / (1536 / amax).
    assert float(searched.tensor_scale) == F32(F32(1.0) / F32(F32(1536.0) / np.abs(x).max()))
    assert searched.format.name == "nvfp4"


def test_four_over_six_importance_weights_the_block_error():
    x = _heavy((4, 64), 5)
    heavy_first = np.ones(64, F32)
    heavy_first[:16] = 1e3
    plain = nvfp4.nvfp4_quantize_4over6(x)
    weighted = nvfp4.nvfp4_quantize_4over6(x, importance=heavy_first)
    # Only blocks' choices can change; blocks of equal weight choose as before.
    np.testing.assert_array_equal(
        np.asarray(plain.block_scales).view(np.uint8),
        np.asarray(weighted.block_scales).view(np.uint8),
    )
    scaled = nvfp4.nvfp4_quantize_4over6(x, importance=np.full(64, 7.0, F32))
    np.testing.assert_array_equal(np.asarray(plain.codes), np.asarray(scaled.codes))


@pytest.mark.parametrize("block", [16, (16, 16)])
def test_nvfp4_encode_onto_its_own_scales_is_the_direct_cast(block):
    x = _heavy((32, 64), 7) * F32(1e-3)
    q = nvfp4.nvfp4_quantize(x, block_size=block)
    codes = nvfp4.nvfp4_encode(x, q.block_scales, q.tensor_scale, block_size=block)
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(q.codes))
    # And onto other scales: nearest on that grid.
    y = _heavy((32, 64), 8) * F32(1e-3)
    c = nvfp4.nvfp4_encode(y, q.block_scales, q.tensor_scale, block_size=block)
    assert not np.array_equal(np.asarray(c), np.asarray(q.codes))


def test_nvfp4_encode_refuses_mismatched_scales():
    q = nvfp4.nvfp4_quantize(np.ones((2, 32), F32))
    with pytest.raises(ValueError, match="block_scales must be float8_e4m3fn of shape"):
        nvfp4.nvfp4_encode(np.ones((2, 48), F32), q.block_scales, q.tensor_scale)


# --- BDR: exponent and micro bits by error ---------------------------------------------------


def _bdr_values(x, block_exp, micro, mbits):
    """float64 values of one block (16,) onto exponent block_exp and per-pair micro bits."""
    step = np.repeat(block_exp - np.asarray(micro) - (mbits + 1) + 2, 2).astype(np.float64)
    top = 2**mbits - 1
    k = np.clip(np.round(x / 2.0**step), -top, top)  # numpy rounds half to even
    return k * 2.0**step


def _brute_force_best(block, mbits, offsets=(0, 1, -1, -2)):
    e = np.floor(np.log2(np.max(np.abs(block)))).astype(int)
    best = np.inf
    for d in offsets:
        for micro in itertools.product((0, 1), repeat=8):
            err = np.sum((_bdr_values(block, e + d, micro, mbits) - block) ** 2)
            best = min(best, err)
    return best


@pytest.mark.parametrize("name", ["mx4", "mx6"])
def test_bdr_search_is_the_best_exponent_and_micro_bits(name):
    spec = microexp.get_spec(name)
    x = _heavy((12, 16), 11).astype(np.float64).astype(F32)
    got = microexp.quantize_search(x, spec)
    vals = np.asarray(microexp.dequantize(*got, spec), np.float64)
    direct = np.asarray(microexp.dequantize(*microexp.quantize(x, spec), spec), np.float64)
    x64 = x.astype(np.float64)
    for i in range(x.shape[0]):
        err = np.sum((vals[i] - x64[i]) ** 2)
        best = _brute_force_best(x64[i], spec.mantissa_bits)
        assert err <= best * (1 + 1e-6) + 1e-30, (i, err, best)
        assert err <= np.sum((direct[i] - x64[i]) ** 2) * (1 + 1e-6)
    assert np.sum((vals - x64) ** 2) < np.sum((direct - x64) ** 2)


@pytest.mark.parametrize("name", ["mx9", "mx6", "mx4", "msfp12"])
def test_bdr_fixed_onto_its_own_exponents_is_the_direct_cast(name):
    x = _heavy((8, 48), 13)
    q = microexp.quantize(x, name)
    again = microexp.quantize_fixed(x, q.shared_exponent, q.micro, name)
    np.testing.assert_array_equal(np.asarray(again.mantissas), np.asarray(q.mantissas))
    np.testing.assert_array_equal(np.asarray(again.shared_exponent), np.asarray(q.shared_exponent))


def test_bdr_fixed_refuses_missing_micro_bits():
    q = microexp.quantize(np.ones((2, 32), F32), "mx6")
    with pytest.raises(ValueError, match="needs micro bits"):
        microexp.quantize_fixed(np.ones((2, 32), F32), q.shared_exponent, None, "mx6")


# --- the public methods on every block family ------------------------------------------------


@pytest.mark.parametrize("fmt", covering(["nvfp4", "mx9", "mx6", "mx4", "msfp12"]))
def test_search_through_the_public_api_beats_the_direct_cast(fmt):
    x = _heavy((16, 128), 17)
    direct = jaxmx.quantize(x, fmt, axis=0)
    searched = ptq.quantize_search(x, fmt, axis=0, packed=True)
    assert searched.format == direct.format and searched.packed
    err = lambda t: float(np.sum((np.asarray(jaxmx.dequantize(t), np.float64) - x) ** 2))  # noqa: E731
    assert err(searched) < err(direct)
    fake = ptq.fake_quantize_search(x, fmt, axis=0)
    np.testing.assert_array_equal(np.asarray(fake), np.asarray(jaxmx.dequantize(searched)))


def _correlated_layer(n_in=128, n_out=48, tokens=512, seed=4):
    kz, ka, kn, kw = jax.random.split(jax.random.key(seed), 4)
    # Inputs on a few latent directions plus noise, with uneven scales:
    # what GPTQ's error feedback exploits (independent inputs leave it little).
    z = jax.random.normal(kz, (tokens, 16))
    x = z @ jax.random.normal(ka, (16, n_in)) + 0.1 * jax.random.normal(kn, (tokens, n_in))
    x = x * jnp.linspace(0.2, 3.0, n_in)
    w = jax.random.normal(kw, (n_in, n_out)) / np.sqrt(n_in)
    return x, w


@pytest.mark.parametrize("fmt", covering(["nvfp4", "mx6", "mx9"]))
def test_gptq_keeps_the_fixed_scales_and_lowers_output_error(fmt):
    x, w = _correlated_layer()
    direct = jaxmx.quantize(w, fmt, axis=0)
    t = ptq.quantize_gptq(w, fmt, np.asarray(x.T @ x, np.float64), axis=0, packed=True)
    assert t.packed == direct.format.packable
    np.testing.assert_array_equal(
        np.asarray(t.scale).view(np.uint8), np.asarray(direct.scale).view(np.uint8)
    )
    if direct.micro is not None:
        np.testing.assert_array_equal(np.asarray(jaxmx.unpack(t).micro), np.asarray(direct.micro))
    out_err = lambda t: float(jnp.linalg.norm(x @ w - x @ jaxmx.dequantize(t)))  # noqa: E731
    assert out_err(t) < 0.8 * out_err(direct)
    # Its values are on the fixed grids: a direct cast of them is the identity.
    v = jaxmx.dequantize(t)
    np.testing.assert_array_equal(np.asarray(jaxmx.fake_quantize(v, fmt, axis=0)), np.asarray(v))


def test_gptq_with_four_over_six_scales():
    x = jax.random.normal(jax.random.key(1), (256, 32))
    w = jnp.asarray(_heavy((32, 16), 23))
    h = np.asarray(x.T @ x, np.float64)
    t = ptq.quantize_gptq(w, "nvfp4", h, axis=0, search=ptq.ScaleSearch())
    searched = ptq.quantize_search(w, "nvfp4", axis=0, importance=np.diag(h))
    np.testing.assert_array_equal(
        np.asarray(t.scale).view(np.uint8), np.asarray(searched.scale).view(np.uint8)
    )
    assert float(t.tensor_scale) == float(searched.tensor_scale)


def test_quantize_params_methods_on_nvfp4_and_mx6():
    x = jax.random.normal(jax.random.key(2), (128, 64))
    params = {"d": {"kernel": jnp.asarray(_heavy((64, 32), 29)), "bias": jnp.zeros(32)}}
    for fmt in ("nvfp4", "mx6"):
        for method in (
            ptq.ScaleSearch(),
            ptq.GPTQ(hessians={"d/kernel": x.T @ x}),
        ):
            q = jaxmx.quantize_params(params, fmt, method=method)
            k = q["d"]["kernel"]
            assert isinstance(k, jaxmx.MXTensor) and k.format.name == fmt and k.shape == (64, 32)


def test_per_tensor_formats_and_offsets_on_nvfp4_are_refused():
    with pytest.raises(ValueError, match="one scale per tensor"):
        ptq.quantize_search(np.ones((4, 32), F32), "tensor_fp8_e4m3")
    with pytest.raises(ValueError, match="Four Over Six"):
        ptq.quantize_search(np.ones((4, 32), F32), "nvfp4", offsets=(0, -1))
    with pytest.raises(ValueError, match="does not apply"):
        ptq.quantize_search(np.ones((4, 32), F32), "mx6", scale_mode="rceil")


@pytest.mark.parametrize("fmt", ["nvfp4", "mx6", "mx4"])
def test_importance_weighted_search_lowers_the_weighted_error(fmt):
    x = _heavy((64, 32), 31)
    imp = np.random.default_rng(1).uniform(0.0, 1.0, 64).astype(F32) ** 4
    plain = ptq.quantize_search(x, fmt, axis=0)
    weighted = ptq.quantize_search(x, fmt, axis=0, importance=imp)

    def werr(t):
        d = np.asarray(jaxmx.dequantize(t), np.float64) - x
        return float(np.sum(imp[:, None] * d**2))

    # Per block, both searches choose among the same candidates; the weighted
    # one minimizes this very sum (up to float32 summation).
    assert werr(weighted) <= werr(plain) * (1 + 1e-5)
    assert werr(weighted) < werr(plain)
