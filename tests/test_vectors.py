"""Bit-exactness against the reference vectors of the MX paper's emulator.

tests/data/vectors holds, for every format x block size {16, 32} x axis
{-1, 0} x rounding {nearest_even, nearest_away, toward_zero}, eleven input
cases (normal, heavy tails, float32 subnormals, FLT_MAX, zeros, exact ties,
NaN/Inf) with the dequantized values and unbiased scale exponents that
microxcaling produced. Every value and every exponent must match.
"""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxmx
from tests._params import covering

DATA = pathlib.Path(__file__).parent / "data" / "vectors"
FILES = sorted(p.name for p in DATA.glob("*.npz"))


def _load(name):
    f = np.load(DATA / name)
    meta = json.loads(str(f["meta"]))
    return meta, {c: (f["x__" + c], f["y__" + c], f["scale_exp__" + c]) for c in meta["cases"]}


def _exponents(t):
    b = np.asarray(lax.bitcast_convert_type(t.scale, jnp.uint8)).astype(np.float64)
    return np.where(b == 255, np.nan, b - 127)


def test_all_formats_have_vectors():
    covered = {json.loads(str(np.load(DATA / f)["meta"]))["format"] for f in FILES}
    assert covered == {
        "mxfp8_e4m3",
        "mxfp8_e5m2",
        "mxfp6_e3m2",
        "mxfp6_e2m3",
        "mxfp4_e2m1",
        "mxint8",
        "mxint4",
        "mxint2",
    }
    assert len(FILES) == 8 * 2 * 2 * 3


# Files are format-major (block size, axis, rounding within): make test runs
# every third file, so every format and every rounding, block size and axis
# run; make test-slow runs all 96.
@pytest.mark.parametrize("name", covering(FILES, every=3))
def test_vectors(name):
    meta, cases = _load(name)
    opts = dict(
        axis=meta["axis"],
        block_size=meta["block_size"],
        rounding=meta["rounding"],
        scale_mode=meta["scale_mode"],
    )
    for case, (x, y, exps) in cases.items():
        t = jaxmx.quantize(x, meta["format"], **opts)
        np.testing.assert_array_equal(_exponents(t), exps, err_msg=f"{name}:{case} exponents")
        # assert_array_equal treats NaN == NaN and -0.0 == 0.0, as the vectors ask.
        np.testing.assert_array_equal(np.asarray(jaxmx.dequantize(t)), y, err_msg=f"{name}:{case}")
        fq = jaxmx.fake_quantize(x, meta["format"], **opts)
        np.testing.assert_array_equal(np.asarray(fq), y, err_msg=f"{name}:{case} fake_quantize")
        packed = jaxmx.quantize(x, meta["format"], packed=True, **opts)
        np.testing.assert_array_equal(
            np.asarray(jaxmx.dequantize(packed)), y, err_msg=f"{name}:{case} packed"
        )
        if case not in ("zeros",):
            # The vectors are not a no-op: quantization changed something.
            assert not np.array_equal(y, x, equal_nan=True), case
