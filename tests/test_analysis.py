"""jaxmx.analysis: QSNR against an independent NumPy computation, and its errors."""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxmx
from jaxmx import analysis
from tests import reference


def _numpy_qsnr(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return 10 * np.log10(np.sum(x**2) / np.sum((y - x) ** 2))


@pytest.fixture(scope="module")
def gauss():
    return np.random.default_rng(0).standard_normal((16, 256)).astype(np.float32)


@pytest.mark.parametrize("fmt", ["mxfp8_e4m3", "mxfp6_e3m2", "mxfp4_e2m1", "mxint8"])
@pytest.mark.parametrize("opts", [{}, {"axis": 0, "block_size": 16, "scale_mode": "rceil"}])
def test_matches_the_float64_model(gauss, fmt, opts):
    # Q(x) from tests/reference.py, which shares no code with jaxmx.
    y, _ = reference.fake_quantize(gauss, fmt, **opts)
    expect = _numpy_qsnr(gauss, y)
    assert analysis.qsnr(gauss, fmt, **opts) == pytest.approx(expect, rel=1e-12)
    assert 10 < expect < 60  # quantization did something, and not everything


def test_an_exact_format_gives_inf():
    # Quantized data is on its format's grid: quantizing it again is exact.
    # (bfloat16 elements under E8M0, the exact format this test once used,
    # are refused now: their grid reaches 2^-260, below float32.)
    x = jax.random.normal(jax.random.key(1), (8, 64))
    for fmt in ("mxfp6_e2m3", "nvfp4", "mx6"):
        q = jaxmx.fake_quantize(x, fmt)
        assert analysis.qsnr(x, fmt) < math.inf
        assert analysis.qsnr(q, fmt) == math.inf
    # Data on the grid of a registered format: integers 1..8, scale 2^-5.
    grid = jnp.tile(jnp.arange(1.0, 9.0), (4, 4))
    assert analysis.qsnr(grid, "mxfp8") == math.inf
    assert analysis.qsnr(grid, "mxfp4") < math.inf


def test_coarser_formats_give_lower_qsnr(gauss):
    q = {f: analysis.qsnr(gauss, f) for f in jaxmx.list_formats()}
    assert q["mxint8"] > q["mxfp8_e4m3"] > q["mxfp4_e2m1"]
    assert q["mxfp6_e2m3"] > q["mxfp6_e3m2"] > q["mxfp4_e2m1"]
    assert q["mxint8"] > q["mxint4"] > q["mxint2"]
    # Four fewer bits of an integer mantissa cost about 4 * 6.02 dB.
    assert 20 < q["mxint8"] - q["mxint4"] < 28
    # Finer blocks, with a scale rule that never clips, track the data closer.
    assert analysis.qsnr(gauss, "mxint8", block_size=8) > q["mxint8"]


def test_options_reach_fake_quantize(gauss):
    a = analysis.qsnr(gauss, "mxfp4", axis=0)
    assert a == analysis.qsnr(gauss.T, "mxfp4")
    assert a != analysis.qsnr(gauss, "mxfp4")
    assert analysis.qsnr(gauss, "mxfp4", scale_mode="rceil") != analysis.qsnr(gauss, "mxfp4")
    key = jax.random.key(0)
    sr = analysis.qsnr(gauss, "mxfp4", rounding="stochastic", key=key)
    assert sr < analysis.qsnr(gauss, "mxfp4")  # stochastic rounding adds noise
    assert analysis.qsnr(gauss, jaxmx.get_format("mxfp4")) == analysis.qsnr(gauss, "mxfp4")


def test_qsnr_is_range_safe(gauss):
    # MX is equivariant under power-of-two scaling, and QSNR must not care
    # whether the data lies near FLT_MAX or among the subnormals.
    base = analysis.qsnr(gauss, "mxint8")
    assert analysis.qsnr(gauss * np.float32(2.0**100), "mxint8") == pytest.approx(base, abs=1e-9)
    assert analysis.qsnr(gauss * np.float32(2.0**-100), "mxint8") == pytest.approx(base, abs=1e-9)
    near_max = np.float32([3e38, -2e38, 1e38, 5e37])
    assert analysis.snr_db(near_max, near_max * np.float32(0.5)) == pytest.approx(
        20 * math.log10(2)
    )
    tiny = np.array([3, 5, 7, 9], np.uint32).view(np.float32)  # subnormals, k * 2^-149
    assert analysis.snr_db(tiny, tiny * np.float32(2)) == pytest.approx(0.0, abs=1e-12)


def test_snr_db_special_results():
    x = np.float32([1.0, 2.0, 3.0])
    assert analysis.snr_db(x, x) == math.inf
    assert analysis.snr_db(x, np.float32([1.0, np.inf, 3.0])) == -math.inf
    assert math.isnan(analysis.snr_db(x, np.float32([1.0, np.nan, 3.0])))
    assert analysis.snr_db([1, 1], [1, 0]) == pytest.approx(10 * math.log10(2))
    assert analysis.snr_db(x, x.astype(ml_dtypes.bfloat16)) == math.inf


def test_errors(gauss):
    with pytest.raises(ValueError, match="unknown format 'mxfp5'.*mxfp4_e2m1"):
        analysis.qsnr(gauss, "mxfp5")
    with pytest.raises(TypeError, match="format must be a format name or an MXFormat, got int"):
        analysis.qsnr(gauss, 4)
    with pytest.raises(TypeError, match="unknown option.*'blocksize'.*block_size"):
        analysis.qsnr(gauss, "mxfp4", blocksize=16)
    with pytest.raises(ValueError, match="scale_mode"):
        analysis.qsnr(gauss, "mxfp4", scale_mode="nearest")
    with pytest.raises(ValueError, match="all zeros"):
        analysis.qsnr(np.zeros((2, 32), np.float32), "mxfp4")
    with pytest.raises(ValueError, match="NaN or Inf"):
        analysis.qsnr(np.float32([[1.0, np.nan] * 16]), "mxfp4")
    with pytest.raises(ValueError, match="shape"):
        analysis.snr_db(np.ones(3), np.ones(4))
    with pytest.raises(TypeError, match="real"):
        analysis.snr_db(np.ones(3, np.complex64), np.ones(3))
    with pytest.raises(TypeError, match="outside jit"):
        jax.jit(lambda v: analysis.qsnr(v, "mxfp4"))(gauss)


def test_format_study_runs_small(tmp_path):
    from examples import format_study

    out = format_study.run(
        rows=16, cols=256, minilm=False, out=tmp_path / "fs", png=tmp_path / "fs.png"
    )
    q = out["results"]["gaussian"]
    names = {s.name for s in out["series"]}
    assert set(jaxmx.list_formats()) <= names and set(out["results"]) == {
        "gaussian",
        "laplace",
        "student_t3",
    }
    # Every format of the study is jaxmx's now; the NumPy models are
    # cross-checks, and they agree exactly (the same QSNR to the last bit).
    for s in out["series"]:
        assert s.source == format_study.JAXMX
        assert s.name in q and np.isfinite(q[s.name])
    assert {"mx9", "msfp16", "nvfp4", "nvfp4_16x16", "tensor_fp8_e4m3"} <= names
    assert len(out["checks"]) >= 3 * 9
    assert all("(+0.000)" in c for c in out["checks"]), out["checks"]
    assert [s.bits for s in out["series"] if s.name in ("mx9", "mx6", "mx4")] == [9, 6, 4]
    assert len(out["paper"]) == 3
    assert (tmp_path / "fs.md").read_text().count("\n|") >= len(names) + 1
    assert (tmp_path / "fs.png").stat().st_size > 10_000
