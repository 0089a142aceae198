"""NVFP4, MX9/MX6/MX4, MSFP16/12 and per-tensor FP8 through jaxmx's public API.

The standalone numerics are tested against the reference vectors in
test_scaled_*.py; here the same vectors go through ``jaxmx.quantize`` and the
resulting MXTensor leaves are compared, and every family is used where any
format can be: spec checks, gradients, DotConfig roles, checkpoints.
"""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmx
from tests import reference_blockformats as ref
from tests._params import covering

DATA = pathlib.Path(__file__).parent / "data" / "vectors_turn2"
TE = sorted(p.name for p in (DATA / "nvfp4").glob("te_*.npz"))
BDR = sorted(p.name for p in (DATA / "bdr").glob("*.npz") if not p.name.startswith("quark_bfp16"))
NEW = ["nvfp4", "mx9", "mx6", "mx4", "msfp16", "msfp12", "tensor_fp8_e4m3", "tensor_fp8_e5m2"]


def _bits(a):
    a = np.asarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def _same_bits(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_array_equal(_bits(a[~np.isnan(a)]), _bits(b[~np.isnan(b)]))


def _x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def test_every_new_format_is_registered():
    assert set(NEW) <= set(jaxmx.list_formats())
    assert len(TE) == 10 and len(BDR) == 15


@pytest.mark.parametrize("name", TE)
def test_nvfp4_te_vectors_through_quantize(name):
    f = np.load(DATA / "nvfp4" / name)
    meta = json.loads(str(f["meta"]))
    x = f["x"]
    bs = (16, 16) if meta["block_layout"] == "16x16" else 16
    t = jaxmx.quantize(x, "nvfp4", block_size=bs)
    assert t.scale.dtype == jnp.float8_e4m3fn and t.tensor_scale.dtype == jnp.float32
    raw = np.asarray(jaxmx.codes.storage_to_raw(t.data, t.format.element))
    np.testing.assert_array_equal(raw, f["codes"])
    scales = np.asarray(t.scale).view(np.uint8)
    if bs == 16:
        np.testing.assert_array_equal(scales, f["scales_e4m3"])
    else:  # one scale per 16x16 tile; the vectors repeat it over the tile's rows
        np.testing.assert_array_equal(np.repeat(scales, 16, axis=0), f["scales_e4m3"])
    _same_bits(t.tensor_scale, f["s_dec_global"])
    _same_bits(jaxmx.dequantize(t), f["dequant_enc"])
    _same_bits(jaxmx.fake_quantize(x, "nvfp4", block_size=bs), f["dequant_enc"])
    p = jaxmx.quantize(x, "nvfp4", block_size=bs, packed=True)
    np.testing.assert_array_equal(np.asarray(p.data), f["codes_packed"])
    assert p.nbytes == x.size // 2 + scales.size + 4
    _same_bits(jaxmx.dequantize(p), f["dequant_enc"])


@pytest.mark.parametrize("name", BDR)
def test_bdr_vectors_through_quantize(name):
    f = np.load(DATA / "bdr" / name)
    meta = json.loads(str(f["meta"]))
    fmt = meta["format"]
    x, y = f["x"], f["y"]
    t = jaxmx.quantize(x, fmt)
    _same_bits(jaxmx.dequantize(t), y)
    _same_bits(jaxmx.fake_quantize(x, fmt), y)
    np.testing.assert_array_equal(
        np.asarray(t.scale).view(np.uint8).astype(np.int32) - 127, f["block_exp"]
    )
    mag = np.asarray(t.data) & ((1 << (t.format.element.bits - 1)) - 1)
    np.testing.assert_array_equal(mag, np.abs(f["codes"]).astype(np.int64))
    if "micro" in f.files:
        np.testing.assert_array_equal(np.asarray(t.micro), f["micro"].reshape(16, -1))
    else:
        assert t.micro is None
    p = jaxmx.quantize(x, fmt, packed=True)
    assert p.nbytes * 8 == x.size * t.format.bits_per_element
    _same_bits(jaxmx.dequantize(p), y)
    if meta["case"] == "normal":
        assert not np.array_equal(y, x)


def test_tensor_fp8_matches_its_model():
    x = np.asarray(_x((8, 96))) * 100
    for fmt, el in (("tensor_fp8_e4m3", "e4m3"), ("tensor_fp8_e5m2", "e5m2")):
        want = ref.tensor_fp8(x, el)
        t = jaxmx.quantize(x, fmt)
        assert t.scale is None and t.block_size is None
        _same_bits(t.tensor_scale, want.scale)
        np.testing.assert_array_equal(_bits(np.asarray(t.data)), _bits(want.codes))
        _same_bits(jaxmx.dequantize(t), want.y)
        assert t.nbytes == x.size + 4


def test_nvfp4_tensor_amax_sets_the_tensor_scale():
    x = _x((4, 32))
    amax = float(jnp.max(jnp.abs(x)))
    default = jaxmx.quantize(x, "nvfp4")
    same = jaxmx.quantize(x, "nvfp4", tensor_amax=amax)
    _same_bits(default.tensor_scale, same.tensor_scale)
    bigger = jaxmx.quantize(x, "nvfp4", tensor_amax=4 * amax)
    want = ref.nvfp4_te(np.asarray(x), tensor_amax=np.float32(4 * amax))
    _same_bits(jaxmx.dequantize(bigger), want.dequant_enc)
    assert not np.array_equal(np.asarray(bigger.tensor_scale), np.asarray(default.tensor_scale))


def test_nvfp4_stochastic_rounding_is_unbiased_and_keyed():
    # 0.3 between the E2M1 values 0 and 0.5 (block max 6 gives scale 1):
    # up with probability 0.6, so the mean is 0.3 within a few standard errors.
    x = jnp.full((8192, 16), 0.3, jnp.float32).at[:, 0].set(6.0)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        jaxmx.fake_quantize(x, "nvfp4", rounding="stochastic")
    a = jaxmx.fake_quantize(x, "nvfp4", rounding="stochastic", key=jax.random.key(0))
    b = jaxmx.fake_quantize(x, "nvfp4", rounding="stochastic", key=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    vals = np.asarray(a[:, 1:])
    assert set(np.unique(vals).tolist()) == {0.0, 0.5}
    se = 0.5 * np.sqrt(0.6 * 0.4 / vals.size)
    assert abs(vals.mean() - 0.3) < 5 * se
    t = jaxmx.quantize(x, "nvfp4", rounding="stochastic", key=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(jaxmx.dequantize(t)), np.asarray(a))


@pytest.mark.parametrize(
    "fmt, kwargs, match",
    [
        ("nvfp4", dict(scale_mode="rceil"), "sets its scales by its own rule"),
        ("mx6", dict(rounding="nearest_away"), "implements rounding nearest_even only"),
        ("mx9", dict(block_size=32), "defined with blocks of 16"),
        ("tensor_fp8_e4m3", dict(block_size=32), "one scale per tensor"),
        ("nvfp4", dict(flush_subnormals=True), "flush_subnormals=True"),
        ("mxfp8", dict(tensor_amax=1.0), "has none to set"),
        ("nvfp4", dict(block_size=(16, 16), axis=0), "cover the last two axes"),
        ("nvfp4", dict(block_size=(16, 0)), "pair of positive ints"),
    ],
)
def test_options_a_family_does_not_define_are_refused(fmt, kwargs, match):
    with pytest.raises(ValueError, match=match):
        jaxmx.quantize(_x((32, 32)), fmt, **kwargs)


@pytest.mark.parametrize("fmt", NEW)
def test_straight_through_gradient(fmt):
    x = _x((16, 32))
    g = jax.grad(lambda v: (jaxmx.fake_quantize(v, fmt) * 3.0).sum())(x)
    np.testing.assert_array_equal(np.asarray(g), np.full(x.shape, 3.0, np.float32))
    with pytest.raises(TypeError, match="not differentiable"):
        jax.grad(lambda v: jaxmx.dequantize(jaxmx.quantize(v, fmt)).sum())(x)


@pytest.mark.parametrize("fmt", covering(NEW, always=("nvfp4",)))
def test_dot_config_role(fmt):
    # Forward: Q(x) @ Q(w) with blocks along the contraction; the gradients
    # run their own quantized matmuls (checked to differ from the FP32 ones).
    x, w = _x((16, 64), 1), _x((64, 32), 2)
    cfg = jaxmx.DotConfig(lhs=fmt, rhs=fmt, grad=fmt)
    dims = (((1,), (0,)), ((), ()))
    y = jaxmx.dot_general(x, w, dims, config=cfg)
    qx = jaxmx.fake_quantize(x, fmt, axis=1)
    qw = jaxmx.fake_quantize(w, fmt, axis=0)
    want = jnp.matmul(qx, qw, precision="highest")
    # Same products, float32 accumulation in possibly another order: within
    # k * eps * sum |a_i b_i| (k = 64 terms).
    bound = 64 * np.finfo(np.float32).eps * (np.abs(qx) @ np.abs(qw))
    assert np.all(np.abs(np.asarray(y) - np.asarray(want)) <= bound)
    assert not np.allclose(np.asarray(y), np.asarray(x @ w))
    gx, gw = jax.grad(lambda a, b: jaxmx.dot_general(a, b, dims, config=cfg).sum(), (0, 1))(x, w)
    gx32, gw32 = jax.grad(lambda a, b: (a @ b).sum(), (0, 1))(x, w)
    assert gx.shape == x.shape and gw.shape == w.shape
    assert np.all(np.isfinite(gx)) and np.all(np.isfinite(gw))
    assert not np.array_equal(np.asarray(gx), np.asarray(gx32))
    assert not np.array_equal(np.asarray(gw), np.asarray(gw32))


@pytest.mark.parametrize("fmt", ["nvfp4", "mx6", "tensor_fp8_e4m3"])
def test_prequantized_operand_and_checkpoint(fmt, tmp_path):
    x, w = _x((8, 64), 3), _x((64, 32), 4)
    tw = jaxmx.quantize(w, fmt, axis=0, packed=True)
    dims = (((1,), (0,)), ((), ()))
    y = jaxmx.dot_general(x, tw, dims, config=jaxmx.DotConfig(lhs=fmt))
    qx, qw = jaxmx.fake_quantize(x, fmt, axis=1), jaxmx.dequantize(tw)
    want = jnp.matmul(qx, qw, precision="highest")
    bound = 64 * np.finfo(np.float32).eps * (np.abs(qx) @ np.abs(qw))
    assert np.all(np.abs(np.asarray(y) - np.asarray(want)) <= bound)
    for path in (tmp_path / "ckpt", tmp_path / "w.safetensors"):
        jaxmx.save(path, {"w": tw})
        back = jaxmx.load(path)["w"]
        assert (back.format, back.packed, back.block_size) == (tw.format, tw.packed, tw.block_size)
        _same_bits(jaxmx.dequantize(back), jaxmx.dequantize(tw))
        assert back.nbytes == tw.nbytes


def test_bits_per_element_of_the_new_formats():
    got = {n: jaxmx.get_format(n).bits_per_element for n in NEW}
    assert got == {
        "nvfp4": 4.5,
        "mx9": 9.0,
        "mx6": 6.0,
        "mx4": 4.0,
        "msfp16": 8.5,
        "msfp12": 4.5,
        "tensor_fp8_e4m3": 8.0,
        "tensor_fp8_e5m2": 8.0,
    }


def test_nvfp4_training_preset():
    """arXiv 2509.25149's recipe, matmul by matmul, against hand-built operands."""
    cfg = jaxmx.preset("nvfp4")
    assert cfg.rhs_block_size == (16, 16) and cfg.wgrad_hadamard == 16
    assert cfg.effective_grad_rounding == "stochastic"
    x, w, g = _x((32, 64), 5), _x((64, 48), 6), _x((32, 48), 7)
    key = jax.random.key(3)
    dims = (((1,), (0,)), ((), ()))
    y, vjp = jax.vjp(lambda a, b: jaxmx.dot_general(a, b, dims, config=cfg, key=key), x, w)
    eps = np.finfo(np.float32).eps

    def close(got, a, b):  # float32 accumulation of the same products, any order
        k = a.shape[-1]
        bound = k * eps * (np.abs(np.asarray(a)) @ np.abs(np.asarray(b)))
        assert np.all(np.abs(np.asarray(got) - np.asarray(a @ b)) <= bound)

    # Forward: activations in 1x16 blocks along K, the weight in 16x16 tiles.
    qx = jaxmx.fake_quantize(x, "nvfp4", axis=1)
    qw = jaxmx.fake_quantize(w, "nvfp4", block_size=(16, 16))
    close(y, qx, qw)
    # The tiles are the same whichever axis of w is contracted: dgrad uses
    # the forward weight's very values (transposed).
    np.testing.assert_array_equal(
        np.asarray(jaxmx.fake_quantize(w.T, "nvfp4", block_size=(16, 16))), np.asarray(qw.T)
    )
    dx, dw = vjp(g)
    # dgrad: g stochastically rounded in 1x16 blocks along N (the bits of
    # the key folded with the role's id, 3), times the tiled weight.
    sr = dict(rounding="stochastic")
    qg = jaxmx.fake_quantize(g, "nvfp4", axis=1, key=jax.random.fold_in(key, 3), **sr)
    close(dx, qg, qw.T)
    # wgrad: x and g rotated along the tokens by the same randomized
    # Hadamard of order 16, then quantized along the tokens (g stochastically).
    from jaxmx import _hadamard

    signs = _hadamard.random_signs(16, cfg.hadamard_seed)
    rx, rg = (_hadamard.rotate(a, 0, 16, signs) for a in (x, g))
    assert not np.allclose(np.asarray(rx), np.asarray(x))
    qrx = jaxmx.fake_quantize(rx, "nvfp4", axis=0)
    qrg = jaxmx.fake_quantize(rg, "nvfp4", axis=0, key=jax.random.fold_in(key, 6), **sr)
    close(dw, qrx.T, qrg)
    # Without the rotation the weight gradient is a different quantization.
    plain = jaxmx.fake_quantize(x, "nvfp4", axis=0).T @ jaxmx.fake_quantize(
        g, "nvfp4", axis=0, key=jax.random.fold_in(key, 6), **sr
    )
    assert not np.allclose(np.asarray(dw), np.asarray(plain))
    with pytest.raises(ValueError, match="not for convolutions"):
        jaxmx.conv_general_dilated(
            jnp.ones((1, 16, 16, 16)), jnp.ones((3, 3, 16, 16)), (1, 1), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"), config=cfg,
        )  # fmt: skip


@pytest.mark.parametrize(
    "fmt",
    [
        "mx6",
        # Slow to compile; NVFP4 and per-tensor weights are served in
        # test_prequantized_operand_and_checkpoint too.
        pytest.param("nvfp4", marks=pytest.mark.slow),
        pytest.param("tensor_fp8_e4m3", marks=pytest.mark.slow),
    ],
)
def test_rules_and_serving_take_every_family(fmt):
    import flax.linen as nn

    from jaxmx.flax import quantize_model

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Dense(64)(x))
            return nn.Dense(32)(h) + jnp.einsum("bd,cd->bc", h, h).mean()

    m, x = MLP(), _x((16, 32), 8)
    p = m.init(jax.random.key(0), x)
    # Training: every matmul (two Dense, one einsum in plain code) in fmt.
    mq = quantize_model(m, {".*": fmt})
    y = mq.apply(p, x)
    want = jaxmx.intercept(lambda v, a: m.apply(v, a), {".*": fmt})(p, x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want))
    assert not np.allclose(np.asarray(y), np.asarray(m.apply(p, x)))
    # Serving: weights quantized once along their contraction axes, packed.
    qp = jaxmx.quantize_params(p, {".*": fmt}, packed=True)
    kernels = [t for t in jax.tree.leaves(qp, is_leaf=lambda v: isinstance(v, jaxmx.MXTensor))
               if isinstance(t, jaxmx.MXTensor)]  # fmt: skip
    assert len(kernels) == 2 and all(t.format.name == fmt for t in kernels)
    assert all(t.block_axis() == -2 for t in kernels)
    served = jaxmx.intercept(lambda v, a: m.apply(v, a), None)(qp, x)
    decoded = jax.tree.map(
        lambda t: t.dequantize() if isinstance(t, jaxmx.MXTensor) else t,
        qp,
        is_leaf=lambda v: isinstance(v, jaxmx.MXTensor),
    )
    # The same float32 matmuls on the same decoded weights.
    np.testing.assert_array_equal(np.asarray(served), np.asarray(m.apply(decoded, x)))


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(family="nvfp4", element="FP8_E4M3", scale="UE4M3", block_size=16, tensor_scale=True),
         "FP4 E2M1 elements"),
        (dict(family="ocp", element="FP8_E4M3", scale="E8M0", tensor_scale=True),
         "no tensor scale"),
        (dict(family="microexp", element="INT8", scale="E8M0", block_size=16), "sign-magnitude"),
        (dict(family="tensor", element="FP4_E2M1", scale=None, block_size=None, tensor_scale=True),
         "FP8 E4M3 or E5M2"),
        (dict(family="bdr", element="SM_INT8", scale="E8M0"), "unknown family 'bdr'"),
    ],
)  # fmt: skip
def test_a_record_must_fit_its_family(fields, match):
    from jaxmx import formats

    kw = {
        k: getattr(formats, v) if k in ("element", "scale") and v else v for k, v in fields.items()
    }
    with pytest.raises(ValueError, match=match):
        jaxmx.MXFormat(name="custom", **kw)
    # The same fields with the family that describes them make a valid format.
    ok = jaxmx.MXFormat(
        name="ok", element=formats.SM_INT5, scale=formats.E8M0, block_size=8,
        micro=formats.MICRO_1X2, family="microexp",
    )  # fmt: skip
    assert ok.block_size == 8


def test_codec_is_a_deprecated_name_of_family():
    from jaxmx import formats

    with pytest.warns(DeprecationWarning, match="family"):
        old = jaxmx.MXFormat(
            name="old", element=formats.SM_INT5, scale=formats.E8M0, block_size=16,
            micro=formats.MICRO_1X2, codec="microexp",
        )  # fmt: skip
    assert old.family == "microexp" and old == dataclasses.replace(old, family="microexp")
    with pytest.warns(DeprecationWarning, match="MXFormat.family"):
        assert old.codec == "microexp"
    with pytest.raises(ValueError, match="disagree"), pytest.warns(DeprecationWarning):
        jaxmx.MXFormat(name="x", element=formats.FP8_E4M3, scale=formats.E8M0, family="ocp",
                       codec="nvfp4")  # fmt: skip


def test_a_grid_below_float32_is_refused():
    # FP16 elements under E8M0's 2^-127 step down to 2^-151: not float32 numbers
    # (found by the fuzzer: a subnormal block came back 4x too large).
    from jaxmx import formats

    with pytest.raises(ValueError, match="below float32's smallest subnormal"):
        jaxmx.MXFormat(name="mxfp16", element=formats.FP16, scale=formats.E8M0)
    assert jaxmx.MXFormat(name="e5m2", element=formats.FP8_E5M2, scale=formats.E8M0)
