"""jaxmx.ptq: scale search, Hadamard rotation and GPTQ against direct cast."""

import flax.linen as nn
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxmx
from jaxmx import ptq
from tests._params import covering

EPS32 = float(np.finfo(np.float32).eps)  # 2^-23


def _block_sse(x, t, block):
    """float64 squared error of each block of a 2-D array quantized along axis -1."""
    err = (np.asarray(jaxmx.dequantize(t), np.float64) - np.asarray(x, np.float64)) ** 2
    return err.reshape(err.shape[0], -1, block).sum(-1)


def _exponents(t):
    return np.asarray(jax.lax.bitcast_convert_type(t.scale, jnp.uint8)).astype(int) - 127


# --- per-block scale search ----------------------------------------------------------------

_FORMATS = ["mxfp4_e2m1", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp8_e4m3", "mxint8"]


@settings(max_examples=25)
@given(
    x=hnp.arrays(
        np.float32,
        (3, 64),
        elements=st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_subnormal=False),
    ),
    fmt=st.sampled_from(_FORMATS),
    scale_mode=st.sampled_from(["floor", "rceil"]),
)
def test_search_never_increases_block_error(x, fmt, scale_mode):
    direct = jaxmx.quantize(x, fmt, scale_mode=scale_mode)
    searched = ptq.quantize_search(x, fmt, scale_mode=scale_mode)
    e_direct, e_search = _block_sse(x, direct, 32), _block_sse(x, searched, 32)
    # The choice compares float32 block sums: each within 32 * eps of its float64 value.
    assert np.all(e_search <= e_direct * (1 + 64 * EPS32))


# Not MXFP8 with rceil: its grid has the same relative step in every binade
# and rceil never clips, so no other power of two does better on these weights.
@pytest.mark.parametrize(
    "fmt, scale_mode",
    [("mxfp4_e2m1", "floor"), ("mxfp4_e2m1", "rceil"), ("mxfp8_e4m3", "floor"),
     ("mxint8", "floor"), ("mxint8", "rceil")],
)  # fmt: skip
def test_search_improves_heavy_tailed_weights_and_stays_a_valid_mx_tensor(fmt, scale_mode):
    w = jax.random.t(jax.random.key(0), 3.0, (256, 64))
    direct = jaxmx.quantize(w, fmt, axis=0, scale_mode=scale_mode, packed=True)
    t = ptq.quantize_search(w, fmt, axis=0, scale_mode=scale_mode, packed=True)
    assert (t.shape, t.axis, t.block_size, t.packed, t.format) == (
        direct.shape, direct.axis, direct.block_size, direct.packed, direct.format
    )  # fmt: skip
    assert t.data.shape == direct.data.shape and t.scale.shape == direct.scale.shape
    err = lambda q: float(jnp.sum((jaxmx.dequantize(q) - w) ** 2))  # noqa: E731
    assert err(t) < err(direct)  # the search did something
    assert np.any(_exponents(t) != _exponents(direct))
    v = jaxmx.dequantize(t)
    np.testing.assert_array_equal(
        ptq.fake_quantize_search(w, fmt, axis=0, scale_mode=scale_mode), v
    )


@pytest.mark.parametrize("fmt", ["mxfp4_e2m1", "mxfp8_e4m3", "mxint8"])
def test_a_direct_recast_reproduces_searched_values_rceil_or_smaller_exponents(fmt):
    # What a model that re-quantizes float weights at run time sees: rceil
    # recasts any grid exactly; floor only exponents at or below its own
    # (e + 1 can hold a block max whose significand floor would clip).
    w = jax.random.t(jax.random.key(0), 3.0, (256, 64))
    for mode, offsets in [("rceil", (0, 1, -1, -2)), ("floor", (0, -1, -2))]:
        v = jaxmx.dequantize(ptq.quantize_search(w, fmt, axis=0, scale_mode=mode, offsets=offsets))
        np.testing.assert_array_equal(jaxmx.fake_quantize(v, fmt, axis=0, scale_mode=mode), v)


@pytest.mark.parametrize("scale_mode", ["floor", "rceil"])
def test_importance_weighted_search_never_increases_the_weighted_block_error(scale_mode):
    kx, ki = jax.random.split(jax.random.key(7))
    w = jax.random.t(kx, 3.0, (128, 32))
    imp = np.asarray(jnp.exp(2 * jax.random.normal(ki, (128,))), np.float64)
    direct = jaxmx.quantize(w, "mxfp4", axis=0, scale_mode=scale_mode)
    t = ptq.quantize_search(w, "mxfp4", axis=0, scale_mode=scale_mode, importance=imp)
    plain = ptq.quantize_search(w, "mxfp4", axis=0, scale_mode=scale_mode)

    def werr(q):  # weighted error of each block of 32 rows, float64
        sq = (np.asarray(jaxmx.dequantize(q), np.float64) - np.asarray(w, np.float64)) ** 2
        return (imp[:, None] * sq).reshape(4, 32, 32).sum(1)

    assert np.all(werr(t) <= werr(direct) * (1 + 64 * EPS32))
    assert werr(t).sum() < werr(plain).sum()  # the weights changed the choice


def test_importance_must_match_the_axis():
    with pytest.raises(ValueError, match=r"importance must be .* shape \(64,\).*got shape \(32,\)"):
        ptq.quantize_search(jnp.ones((64, 4)), "mxfp4", axis=0, importance=np.ones(32))


def test_search_with_offset_zero_only_is_the_direct_cast():
    x = jax.random.normal(jax.random.key(1), (4, 96)) * 10
    a = ptq.quantize_search(x, "mxfp4", offsets=(0,), packed=True)
    b = jaxmx.quantize(x, "mxfp4", packed=True)
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_array_equal(a.scale.view(jnp.uint8), b.scale.view(jnp.uint8))


def test_search_keeps_nan_blocks_and_zero_blocks():
    x = jnp.zeros((2, 32)).at[0, 3].set(jnp.nan)
    v = jaxmx.dequantize(ptq.quantize_search(x, "mxfp8"))
    assert np.all(np.isnan(v[0])) and np.all(v[1] == 0)


@pytest.mark.parametrize("offsets", [(), (-1, -2), (0, 0), (0, 1.5), "0", (True, 0)], ids=repr)
def test_search_refuses_bad_offsets(offsets):
    with pytest.raises(ValueError, match="offsets must be distinct ints that include 0"):
        ptq.quantize_search(jnp.ones(32), "mxfp4", offsets=offsets)


# --- Hadamard rotation -------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 16, 32])
def test_hadamard_is_orthonormal_and_symmetric(n):
    h = ptq.hadamard(n).astype(np.float64)
    np.testing.assert_array_equal(h, h.T)
    np.testing.assert_allclose(np.abs(h), 1 / np.sqrt(n), rtol=EPS32)
    # Each entry of H H^T sums n products of 1/n, each off by at most eps (the
    # float32 rounding of 1/sqrt(n), twice): at most eps in all; 2 eps allowed.
    np.testing.assert_allclose(h @ h.T, np.eye(n), rtol=0, atol=2 * EPS32)


@pytest.mark.parametrize("n", [0, 3, 24, -4, 2.0, True])
def test_hadamard_refuses_orders_that_are_not_powers_of_two(n):
    with pytest.raises(ValueError, match="power of two"):
        ptq.hadamard(n)


@pytest.mark.parametrize("size", [16, 32])
def test_rotated_product_equals_the_original(size):
    kx, kw = jax.random.split(jax.random.key(2))
    x = jax.random.normal(kx, (8, 96))
    w = jax.random.normal(kw, (96, 24))
    xr, wr = ptq.rotate(x, size=size), ptq.rotate(w, axis=0, size=size)
    assert not np.allclose(xr, x) and not np.allclose(wr, w)  # they really rotate
    got = np.asarray(xr @ wr, np.float64)
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    # float32 rounding of H (1 ulp), of both rotations (size terms each) and of
    # the product (96 terms): a Cauchy-Schwarz bound on |x|.|w| per entry.
    norms = np.linalg.norm(np.asarray(x), axis=1)[:, None] * np.linalg.norm(np.asarray(w), axis=0)
    assert np.all(np.abs(got - want) <= (2 * size + 96 + 4) * EPS32 * norms)
    # Rotating twice is the identity (H is symmetric and orthonormal).
    back = np.asarray(ptq.rotate(xr, size=size))
    row = np.linalg.norm(np.asarray(x), axis=1, keepdims=True)
    assert np.all(np.abs(back - np.asarray(x)) <= 2 * (size + 2) * EPS32 * row)


def test_rotation_spreads_a_block_outlier_and_cuts_mxfp4_error():
    w = jax.random.normal(jax.random.key(3), (128, 64)).at[5, :].mul(30.0)  # an outlier row
    wr = ptq.rotate(w, axis=0, size=32)
    err = lambda a: float(jnp.sum((jaxmx.fake_quantize(a, "mxfp4", axis=0) - a) ** 2))  # noqa: E731
    assert err(wr) < err(w)  # rotation is orthonormal: errors compare in one norm


def test_rotate_weights_rotates_kernels_only():
    p = {"dense": {"kernel": jnp.eye(64), "bias": jnp.ones(64)}, "emb": {"embedding": jnp.eye(64)}}
    r = ptq.rotate_weights(p, size=32)
    np.testing.assert_array_equal(r["dense"]["bias"], p["dense"]["bias"])
    np.testing.assert_array_equal(r["emb"]["embedding"], p["emb"]["embedding"])
    np.testing.assert_allclose(r["dense"]["kernel"][:32, :32], ptq.hadamard(32), atol=EPS32)


def test_rotate_refuses_a_length_the_size_does_not_divide():
    with pytest.raises(ValueError, match="length 48, not a multiple of the Hadamard size 32"):
        ptq.rotate(jnp.ones((2, 48)), size=32)


# --- GPTQ ------------------------------------------------------------------------------------


def _correlated_layer(n_in=128, n_out=48, tokens=512, seed=4):
    kz, ka, kw = jax.random.split(jax.random.key(seed), 3)
    # Correlated inputs: a few latent directions plus noise, with uneven scales.
    z = jax.random.normal(kz, (tokens, 16))
    mix = jax.random.normal(ka, (16, n_in))
    x = z @ mix + 0.1 * jax.random.normal(kz, (tokens, n_in))
    x = x * jnp.linspace(0.2, 3.0, n_in)
    w = jax.random.normal(kw, (n_in, n_out)) / np.sqrt(n_in)
    return x, w


@pytest.mark.parametrize(
    "fmt,act_order",
    covering(
        [
            (f, a)
            for f in ("mxfp4_e2m1", "mxfp6_e2m3", "mxfp8_e4m3", "mxint8")
            for a in (False, True)
        ],
        every=2,
        salt=1,
    ),
)
def test_gptq_reduces_output_error_with_the_direct_cast_scales(fmt, act_order):
    x, w = _correlated_layer()
    direct = jaxmx.quantize(w, fmt, axis=0, packed=True)
    t = ptq.quantize_gptq(w, fmt, np.asarray(x.T @ x), axis=0, packed=True, act_order=act_order)
    out = lambda q: float(jnp.linalg.norm(x @ w - x @ jaxmx.dequantize(q)))  # noqa: E731
    assert out(t) < 0.8 * out(direct)
    # Scales are fixed from the original weights: the direct cast's.
    np.testing.assert_array_equal(_exponents(t), _exponents(direct))
    assert (t.shape, t.axis, t.packed) == (w.shape, direct.axis, direct.packed)
    v = jaxmx.dequantize(t)
    np.testing.assert_array_equal(jaxmx.fake_quantize(v, fmt, axis=0), v)


def test_gptq_with_search_scales_and_a_contraction_axis_of_one():
    x, w = _correlated_layer(n_in=96, n_out=40)
    wt = w.T  # PyTorch layout (out, in): contraction along axis 1
    s = ptq.ScaleSearch(scale_mode="rceil")
    h = np.asarray(x.T @ x)
    t = ptq.quantize_gptq(wt, "mxfp4", h, axis=1, search=s)
    searched = ptq.quantize_search(wt, "mxfp4", axis=1, scale_mode="rceil", importance=np.diag(h))
    np.testing.assert_array_equal(_exponents(t), _exponents(searched))
    out = lambda q: float(jnp.linalg.norm(x @ w - x @ jaxmx.dequantize(q).T))  # noqa: E731
    assert out(t) < out(searched)


def test_gptq_zeroes_inputs_the_calibration_never_saw():
    x, w = _correlated_layer(n_in=64, n_out=8)
    x = x.at[:, 10].set(0.0)
    v = jaxmx.dequantize(ptq.quantize_gptq(w, "mxfp8", np.asarray(x.T @ x)))
    assert np.all(v[10] == 0) and np.any(v[11] != 0)


def test_gptq_argument_errors():
    w = jnp.ones((64, 8))
    with pytest.raises(ValueError, match=r"hessian must have shape \(64, 64\).*got \(32, 32\)"):
        ptq.quantize_gptq(w, "mxfp4", np.eye(32))
    with pytest.raises(ValueError, match="damp must be a float in"):
        ptq.quantize_gptq(w, "mxfp4", np.eye(64), damp=2.0)
    with pytest.raises(ValueError, match="not positive definite"):
        ptq.quantize_gptq(w, "mxfp4", -np.eye(64))


# --- quantize_params(method=...) and calibration ------------------------------------------


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(64, name="up")(x))
        return nn.Dense(32, name="down")(h)


@pytest.fixture(scope="module")
def mlp():
    model = MLP()
    kz, ka = jax.random.split(jax.random.key(5))
    x = jax.random.normal(kz, (256, 16)) @ jax.random.normal(ka, (16, 64))
    return model, model.init(jax.random.key(6), x), x


def test_collect_hessians_is_the_gram_matrix_of_each_dense_input(mlp):
    model, v, x = mlp
    h = ptq.collect_hessians(model, v, [x[:128], x[128:]])
    assert sorted(h) == ["params/down/kernel", "params/up/kernel"]
    want = np.asarray(x, np.float64).T @ np.asarray(x, np.float64)
    np.testing.assert_allclose(h["params/up/kernel"], want, rtol=1e-5, atol=1e-3)
    assert h["params/down/kernel"].shape == (64, 64)


def test_quantize_params_methods_run_and_beat_direct_cast(mlp):
    model, v, x = mlp
    ref = model.apply(v, x)
    hess = ptq.collect_hessians(model, v, [x])

    def err(method):
        q = jaxmx.quantize_params(v, "mxfp4", method=method)
        kernels = [q["params"][k]["kernel"] for k in ("up", "down")]
        assert all(isinstance(k, jaxmx.MXTensor) and k.packed for k in kernels)
        rules = [("params/", jaxmx.DotConfig(lhs=None, rhs="mxfp4_e2m1"))]  # weights only
        out = jaxmx.intercept(model.apply, rules, warn=False)(q, x)
        return float(jnp.linalg.norm(out - ref))

    direct = err(None)
    assert err("search") <= direct * (1 + 1e-6)
    assert err(ptq.GPTQ(hessians=hess)) < direct


def test_quantize_params_method_errors(mlp):
    _, v, _ = mlp
    with pytest.raises(ValueError, match="unknown method 'gptq'"):
        jaxmx.quantize_params(v, "mxfp4", method="gptq")
    with pytest.raises(ValueError, match="GPTQ has no Hessian for 'params/down/kernel'"):
        jaxmx.quantize_params(
            v, "mxfp4", method=ptq.GPTQ(hessians={"params/up/kernel": np.eye(64)})
        )


# --- The study's methods on a tiny Llama (examples/ptq_study.py) ---------------------------


@pytest.fixture(scope="module")
def tiny_llama():
    from models.llama import Llama, LlamaConfig

    cfg = LlamaConfig(vocab_size=64, width=64, depth=2, heads=2, kv_heads=1, mlp_width=128)
    model = Llama(cfg)
    tokens = jax.random.randint(jax.random.key(8), (2, 16), 0, 64)
    return model, model.init(jax.random.key(9), tokens), tokens


def test_collect_hessians_sees_the_tied_head(tiny_llama):
    model, params, tokens = tiny_llama
    h = ptq.collect_hessians(model, params, [tokens])
    assert h["params/embed_tokens/embedding"].shape == (64, 64)
    assert len(h) == 7 * 2 + 1  # q, k, v, o, gate, up, down per layer; the head


def test_study_methods_are_quantize_model_calls(tiny_llama):
    # The study's PTQ methods are jaxmx.ptq.quantize_model on model.apply: the tied
    # head gets a quantized copy, every weight and its activations the rotation
    # (tests/test_quantize_model.py checks that the rotations cancel).
    from examples import ptq_study as S

    model, params, tokens = tiny_llama
    calibration = np.asarray(jax.random.randint(jax.random.key(10), (2, 32), 0, 64))
    r = S.Recipe(fmt="mxfp4_e2m1", mode="w", scope="all", method="hadamard")
    q = S.apply_recipe(model, params, r, calibration=calibration)
    report = q.apply_fn.report
    assert report["params/embed_tokens/embedding"].action == "tied"
    assert len(report.quantized) == 7 * 2 + 1
    assert all(report[p].hadamard == 32 for p in report.quantized)
    # The weights were quantized, not only rotated: an MXTensor whose values differ from
    # the rotated float kernel's.
    down = "params/layers_0/mlp/down_proj/kernel"
    t = q.params["params"]["layers_0"]["mlp"]["down_proj"]["kernel"]
    assert isinstance(t, jaxmx.MXTensor) and t.format.name == "mxfp4_e2m1"
    w = params["params"]["layers_0"]["mlp"]["down_proj"]["kernel"]
    w = ptq.rotate(w, axis=report[down].axis, size=report[down].hadamard)
    assert not np.array_equal(np.asarray(jaxmx.dequantize(t)), np.asarray(w))
    assert q.apply_fn(q.params, tokens).shape == (2, 16, 64)
    with pytest.raises(NotImplementedError, match="needs calibration"):
        S.apply_recipe(model, params, r)


def test_study_gptq_beats_direct_cast_on_held_out_tokens(tiny_llama):
    from examples import ptq_study as S

    model, params, tokens = tiny_llama
    calibration = np.asarray(jax.random.randint(jax.random.key(10), (16, 32), 0, 64))
    ref = model.apply(params, tokens)

    def err(method):
        r = S.Recipe(fmt="mxfp4_e2m1", mode="w", scope="all", method=method)
        q = S.apply_recipe(model, params, r, calibration=calibration)
        return float(jnp.linalg.norm(q.apply_fn(q.params, tokens) - ref))

    assert err("gptq") < err("direct")
    with pytest.raises(NotImplementedError, match="run in scope 'all'"):
        S.apply_recipe(model, params, S.Recipe(fmt="mxfp4_e2m1", method="gptq"),
                       calibration=calibration)  # fmt: skip
