"""quantize_params: matmul weights to packed MXTensors; models run from them under intercept."""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import jaxmx


def _is_mx(t):
    return isinstance(t, jaxmx.MXTensor)


def _decoded(tree):
    return jax.tree.map(lambda t: jaxmx.dequantize(t) if _is_mx(t) else t, tree, is_leaf=_is_mx)


class ConvMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(32, (3, 3))(x)
        x = nn.relu(x).reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(96)(x))
        return nn.Dense(10, dtype=jnp.bfloat16)(x)


@pytest.fixture(scope="module")
def linen_model():
    m = ConvMLP()
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    return m, m.init(jax.random.key(1), x), x


def test_weights_become_packed_mx_tensors_along_their_contraction(linen_model):
    _, variables, _ = linen_model
    q = jaxmx.quantize_params(variables, "mxfp4")
    p = q["params"]
    assert _is_mx(p["Conv_0"]["kernel"]) and p["Conv_0"]["kernel"].block_axis() == -2  # HWIO: I
    assert _is_mx(p["Dense_0"]["kernel"]) and p["Dense_0"]["kernel"].block_axis() == -2  # (in, out)
    assert all(p[k]["kernel"].packed for k in ("Conv_0", "Dense_0", "Dense_1"))
    for k in ("Conv_0", "Dense_0", "Dense_1"):  # biases untouched
        assert p[k]["bias"] is variables["params"][k]["bias"]
    # Bytes: the big kernel holds 4.25 of 32 bits per element.
    dense = variables["params"]["Dense_0"]["kernel"]
    assert p["Dense_0"]["kernel"].nbytes * 32 == dense.nbytes * 4.25
    assert jaxmx.param_bytes(q) < jaxmx.param_bytes(variables) * 0.2
    # Quantization did something, along the contraction axis.
    want = jaxmx.fake_quantize(dense, "mxfp4", axis=0)
    np.testing.assert_array_equal(jaxmx.dequantize(p["Dense_0"]["kernel"]), want)
    assert not np.array_equal(want, dense)


def test_weight_only_runs_bit_exact_from_the_mx_weights(linen_model):
    m, variables, x = linen_model
    q = jaxmx.quantize_params(variables, "mxfp4")
    f = jaxmx.intercept(m.apply, None)  # weight-only: activations stay high precision
    got = jax.jit(f)(q, x)
    want = m.apply(_decoded(q), x)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, m.apply(variables, x))


def test_weights_and_activations_use_the_mx_weights_as_they_are():
    # Weights in MXINT8, activations by a rule in MXFP4: were the weights
    # quantized again by the rule, they would be rounded to MXFP4.
    x = jax.random.normal(jax.random.key(2), (4, 64))
    params = {"w": {"kernel": jax.random.normal(jax.random.key(3), (64, 32))}}
    q = jaxmx.quantize_params(params, "mxint8")

    def model(p, x):
        return x @ p["w"]["kernel"]

    f = jaxmx.intercept(model, "mxfp4")
    got = f(q, x)
    assert "MXTensor rhs mxint8" in f.coverage.sites[0].reason
    x_hat = jaxmx.fake_quantize(x, "mxfp4", axis=1)
    w_hat = jaxmx.dequantize(q["w"]["kernel"])
    want = x_hat @ w_hat
    bound = (jnp.abs(x_hat) @ jnp.abs(w_hat)) * (2 * 63 * 2.0**-24)
    assert np.all(np.abs(np.asarray(got - want)) <= np.asarray(bound))
    requantized = x_hat @ jaxmx.fake_quantize(w_hat, "mxfp4", axis=0)
    assert np.abs(np.asarray(got - requantized)).max() > np.asarray(bound).max()


def test_nnx_model():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(64, 64, rngs=rngs)
            self.b = nnx.Linear(64, 8, rngs=rngs)

        def __call__(self, x):
            return self.b(nnx.relu(self.a(x)))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    q = jaxmx.quantize_params(state, "mxfp6_e2m3")
    kernels = [t for t in jax.tree.leaves(q, is_leaf=_is_mx) if _is_mx(t)]
    assert len(kernels) == 2 and all(t.packed and t.block_axis() == -2 for t in kernels)

    def run(state, x):
        return nnx.merge(graphdef, state)(x)

    x = jax.random.normal(jax.random.key(4), (4, 64))
    np.testing.assert_array_equal(jaxmx.intercept(run, None)(q, x), run(_decoded(q), x))


def test_equinox_model_weight_axis_is_its_input_axis():
    mlp = eqx.nn.MLP(64, 8, 64, 2, key=jax.random.key(5))
    q = jaxmx.quantize_params(mlp, "mxfp4")
    assert _is_mx(q.layers[0].weight) and q.layers[0].weight.block_axis() == -1  # (out, in)
    f = jaxmx.intercept(lambda m, x: jax.vmap(m)(x), "mxfp8")
    x = jax.random.normal(jax.random.key(6), (4, 64))
    y = f(q, x)
    assert f.coverage.counts == "3 of 3 matmuls in MX" and y.shape == (4, 8)


def test_rules_axes_and_errors():
    params = {
        "attn": {"query": {"kernel": jnp.ones((64, 4, 16))}},  # DenseGeneral (in, heads, dim)
        "head": {"kernel": jnp.ones((64, 8))},
        "w": jnp.ones((64, 64)),
    }
    with pytest.raises(ValueError, match=r"no contraction axis known.*w \(64, 64\)"):
        jaxmx.quantize_params(params, [("attn|head", "mxfp8"), ("w", "mxfp8")])
    q = jaxmx.quantize_params(
        params, [("head", None), (".*", "mxfp8")], axes={"query": 0, "^w$": 0}
    )
    assert not _is_mx(q["head"]["kernel"])
    assert q["attn"]["query"]["kernel"].block_axis() == -3
    assert q["w"].block_axis() == -2 and not q["w"].packed  # 8-bit formats do not pack
    with pytest.warns(UserWarning, match="rule 'nothing' matched no parameter"):
        jaxmx.quantize_params(params, [("nothing", "mxfp8"), ("head", "mxfp8")])
    with pytest.raises(TypeError, match="axes must be a dict"):
        jaxmx.quantize_params(params, "mxfp8", axes=3)


def test_a_weight_blocked_along_another_axis_is_decoded_not_misused():
    # The DenseGeneral-style kernel below is contracted over axis 0, but the
    # convention blocks it along axis 1: intercept decodes it and the rule
    # quantizes the decoded values; jaxmx.dot_general itself refuses it.
    w = jax.random.normal(jax.random.key(7), (64, 4, 16))
    q = jaxmx.quantize_params({"kernel": w}, "mxfp8")
    assert q["kernel"].block_axis() == -2
    x = jax.random.normal(jax.random.key(8), (2, 64))
    dims = (((1,), (0,)), ((), ()))
    with pytest.raises(ValueError, match="blocked along axis 1"):
        jaxmx.dot_general(x, q["kernel"], dims, config="mxfp8")
    f = jaxmx.intercept(lambda p, x: lax.dot_general(x, p["kernel"], dims), "mxfp8")
    got = f(q, x)
    w_hat = jaxmx.fake_quantize(jaxmx.dequantize(q["kernel"]), "mxfp8", axis=0)
    want = lax.dot_general(jaxmx.fake_quantize(x, "mxfp8", axis=1), w_hat, dims)
    # Same products in possibly another order: within 2 (K - 1) 2^-24 sum |a b|.
    x_hat = jaxmx.fake_quantize(x, "mxfp8", axis=1)
    bound = lax.dot_general(jnp.abs(x_hat), jnp.abs(w_hat), dims) * (2 * 63 * 2.0**-24)
    assert np.all(np.abs(np.asarray(got - want)) <= np.asarray(bound))


@pytest.mark.parametrize("fmt", ["mxfp8", "mxint8", "mxfp4"])
def test_save_load_roundtrip_of_quantized_params(tmp_path, fmt):
    m = ConvMLP()
    x = jax.random.normal(jax.random.key(9), (2, 8, 8, 3))
    q = jaxmx.quantize_params(m.init(jax.random.key(10), x), fmt)
    jaxmx.save(tmp_path / "ckpt", q)
    back = jaxmx.load(tmp_path / "ckpt")
    f = jaxmx.intercept(m.apply, None)
    np.testing.assert_array_equal(f(back, x), f(q, x))


def test_param_bytes_counts_plain_arrays_and_mx_tensors():
    tree = {"a": jnp.ones((32, 32)), "b": jaxmx.quantize(jnp.ones((32, 32)), "mxfp8")}
    assert jaxmx.param_bytes(tree) == 32 * 32 * 4 + 32 * 32 + 32


def test_mx_tensors_are_nnx_data():
    import jaxmx.flax

    class Held(nnx.Module):
        def __init__(self):
            self.w = jaxmx.quantize(jnp.linspace(-1, 1, 64 * 8).reshape(64, 8), "mxfp4", axis=0)
            self.p = nnx.Param(jaxmx.quantize(jnp.ones((64, 8)), "mxfp8", axis=0))

        def __call__(self, x):
            dims = (((1,), (0,)), ((), ()))
            return jaxmx.dot_general(x, self.w, dims, config="fp32") + jaxmx.dot_general(
                x, self.p[...], dims, config="fp32"
            )

    m = Held()
    assert nnx.is_data(m.w)
    graphdef, state = nnx.split(m)
    assert len(jax.tree.leaves(state)) == 4  # codes and scales of both
    x = jnp.ones((2, 64))
    w = jaxmx.dequantize(m.w)
    want = x @ (w + 1.0)  # p decodes to exactly 1
    # Two float32 sums of 64 products plus their sum, against one sum of
    # rounded (w + 1): within (2 * 64 + 2) 2^-24 sum |x| (|w| + 1).
    bound = (jnp.abs(x) @ (jnp.abs(w) + 1.0)) * (130 * 2.0**-24)
    got = nnx.jit(lambda m, x: m(x))(m, x)
    assert np.all(np.abs(np.asarray(got - want)) <= np.asarray(bound))
    np.testing.assert_array_equal(nnx.merge(graphdef, state)(x), m(x))
