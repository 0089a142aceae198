"""jaxmx.ptq.quantize_model: PTQ of any JAX function (plain JAX, Equinox, a linen Llama).

Checks that can fail: the served function is the float function with the
dequantized weights (weights only: up to float32 rounding); GPTQ's error
under the calibration Hessian is below a direct cast's, and the Hadamard
rotation's below GPTQ's on weights with outliers; the rotation alone
(weights rotated, not quantized, activations rotated inside intercept)
reproduces the function up to float32 rounding; a tied embedding keeps its
float table for the lookup and gets a quantized copy for the head.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmx
from jaxmx._paths import path_string
from jaxmx.rules import parse_rules
from models.llama import Llama, LlamaConfig, generate

# Weights only, products in float32: the served function is the float
# function with dequantized weights.
W4 = jaxmx.DotConfig(rhs="mxfp4", compute_dtype="float32")
# float32 rounding, relative to the outputs' scale. What differs between a served
# function and its float reference, per product term of a matmul: the rotations, each
# within log2(32) + 1 = 6 roundings of exact (jaxmx.ptq.rotate), one on the activation
# and one on the weight (rotated, or rotated back by the test): 12; and the summation
# order (the MX matmul and the reference may add the terms differently): a blocked sum
# of K <= 128 terms is log2(128) = 7 roundings deep, on each side: 14. 26 a matmul, over
# the longest chain of matmuls, the Llama's 13 (q/k/v, q.k, p.v, o, gate/up and down in
# each of 2 layers; the head): 338 roundings of u = 2^-24. Independent roundings of
# either sign grow as the square root of their number (probabilistic rounding error
# analysis): sqrt(338) u ~ 2^-19.8; 2^-17 leaves 2^2.8 for the tail and for terms larger
# than the outputs. (Measured on CPU: at most 2^-19.4, the rotation test.)
F32 = 2.0**-17


def _close(got, want, scale=None):
    scale = float(jnp.max(jnp.abs(want))) if scale is None else scale
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=F32 * scale)


def _dequantized(q):
    """``q`` with each MXTensor leaf dequantized (a TiedWeight left whole)."""
    return jax.tree_util.tree_map(
        lambda t: jaxmx.dequantize(t) if isinstance(t, jaxmx.MXTensor) else t,
        q,
        is_leaf=lambda t: isinstance(t, (jaxmx.MXTensor, jaxmx.ptq.TiedWeight)),
    )


def _effective(q, report, path_get):
    """The weights the quantized model multiplies by (rotated ones rotated back)."""

    def one(path):
        r = report[path]
        t = path_get(q, path)
        t = t.matmul if isinstance(t, jaxmx.ptq.TiedWeight) else t
        d = jaxmx.dequantize(t)
        # The block Hadamard is symmetric and orthonormal: rotating twice is the identity.
        return jaxmx.ptq.rotate(d, axis=r.axis, size=r.hadamard) if r.hadamard else d

    return one


# --- A plain-JAX MLP ------------------------------------------------------------------


def _mlp(p, x):
    h = jax.nn.relu(x @ p["w1"].T + p["b1"])  # PyTorch-style (out, in): contracted over axis 1
    return h @ p["w2"]


@pytest.fixture(scope="module")
def mlp():
    rng = np.random.default_rng(0)

    def heavy(shape):  # Gaussian with 1% outliers 25x larger: what rotations are for
        w = rng.standard_normal(shape)
        return jnp.asarray(np.where(rng.random(shape) < 0.01, 25 * w, w) / np.sqrt(shape[-1]),
                           jnp.float32)  # fmt: skip

    params = {"w1": heavy((128, 64)), "b1": jnp.zeros(128), "w2": heavy((128, 32))}
    # Correlated inputs with uneven channel scales: a Hessian that is not diagonal.
    mix = rng.standard_normal((64, 64)) * np.exp(rng.standard_normal(64))[:, None]
    x = jnp.asarray(rng.standard_normal((512, 64)) @ mix / 8, jnp.float32)
    return params, [x[:256], (x[256:],)], x


def _hessian_errors(params, q, report, x):
    """``tr(E^T H E)`` per layer, ``H`` the calibration Hessian of its input (float model)."""
    eff = _effective(q, report, lambda t, p: t[p])
    h1 = np.asarray(x, np.float64).T @ np.asarray(x, np.float64)
    a = np.asarray(jax.nn.relu(x @ params["w1"].T + params["b1"]), np.float64)
    h2 = a.T @ a
    e1 = np.asarray(params["w1"] - eff("w1"), np.float64)  # (out, in)
    e2 = np.asarray(params["w2"] - eff("w2"), np.float64)  # (in, out)
    return np.trace(e1 @ h1 @ e1.T), np.trace(e2.T @ h2 @ e2)


def test_plain_mlp_direct_is_the_cast_weights(mlp):
    params, calib, x = mlp
    serve, q = jaxmx.ptq.quantize_model(_mlp, params, calib, W4, method="direct")
    assert serve.report.quantized == ("w1", "w2")
    assert serve.report["w1"].axis == 1 and serve.report["w2"].axis == 0
    assert "b1" not in {w.path for w in serve.report.weights}  # no matmul reads a bias
    for k, axis in (("w1", 1), ("w2", 0)):
        want = jaxmx.quantize(params[k], "mxfp4", axis=axis, packed=True)
        assert q[k].block_axis() % 2 == axis
        np.testing.assert_array_equal(np.asarray(q[k].data), np.asarray(want.data))
        np.testing.assert_array_equal(
            np.asarray(q[k].scale, np.float32), np.asarray(want.scale, np.float32)
        )
    deq = {**params, "w1": jaxmx.dequantize(q["w1"]), "w2": jaxmx.dequantize(q["w2"])}
    _close(jax.jit(serve)(q, x), _mlp(deq, x))


def test_gptq_beats_direct_and_hadamard_beats_gptq_in_the_hessian_norm(mlp):
    params, calib, x = mlp
    errs = {}
    for method in ("direct", "gptq", "hadamard_gptq"):
        serve, q = jaxmx.ptq.quantize_model(_mlp, params, calib, W4, method=method)
        report = serve.report
        assert report.batches == (0 if method == "direct" else 2)
        assert {report[k].method for k in ("w1", "w2")} == {method}
        errs[method] = _hessian_errors(params, q, report, x)
        eff = _effective(q, report, lambda t, p: t[p])
        # Served = the float MLP with the weights it multiplies by (rotations cancel).
        _close(serve(q, x), _mlp({**params, "w1": eff("w1"), "w2": eff("w2")}, x))
    for layer in (0, 1):
        assert errs["gptq"][layer] < errs["direct"][layer]
        assert errs["hadamard_gptq"][layer] < errs["gptq"][layer]


def test_search_and_scale_rules_follow_the_rule(mlp):
    params, calib, _ = mlp
    rule = jaxmx.DotConfig(rhs="mxfp4", scale_mode="rceil", compute_dtype="float32")
    serve, q = jaxmx.ptq.quantize_model(_mlp, params, calib, rule, method="search")
    want = jaxmx.ptq.quantize_search(params["w2"], "mxfp4", axis=0, scale_mode="rceil")
    np.testing.assert_array_equal(
        np.asarray(jaxmx.dequantize(q["w2"])), np.asarray(jaxmx.dequantize(want))
    )
    # A rule that keeps a matmul in high precision keeps its weight float, and says why.
    rules = [("w2", None), (".*", W4)]
    serve, q = jaxmx.ptq.quantize_model(_mlp, params, calib, rules, method="direct")
    assert isinstance(q["w2"], jax.Array) and isinstance(q["w1"], jaxmx.MXTensor)
    assert "rule 'w2' says high precision" in serve.report.kept_float["w2"]


# --- Equinox ----------------------------------------------------------------------------


def test_equinox_mlp_weights_on_the_left():
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(64, 16, 128, depth=2, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)

    def fn(p, x):
        return jax.vmap(eqx.combine(p, static))(x)

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((256, 64)) * np.exp(rng.standard_normal(64)), jnp.float32)
    calib = [x[:128], x[128:]]
    errs = {}
    for method in ("direct", "gptq"):
        serve, q = jaxmx.ptq.quantize_model(fn, params, calib, W4, method=method)
        report = serve.report
        assert report.quantized == ("layers/0/weight", "layers/1/weight", "layers/2/weight")
        assert all(report[p].axis == 1 for p in report.quantized)  # Linear's (out, in)
        deq = _dequantized(q)
        # weight @ x puts the weight on the left: it still gets the weight format and
        # the activation none (a quantized activation would not match the float run).
        _close(serve(q, x), fn(deq, x))
        w, wq = params.layers[0].weight, jaxmx.dequantize(q.layers[0].weight)
        errs[method] = float(jnp.sum(((w - wq) @ x.T) ** 2))
    assert errs["gptq"] < errs["direct"]


def test_nnx_state_and_linen_conv():
    from flax import linen, nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a, self.b = nnx.Linear(64, 128, rngs=rngs), nnx.Linear(128, 16, rngs=rngs)

        def __call__(self, x):
            return self.b(jax.nn.relu(self.a(x)))

    graph, state = nnx.split(Net(nnx.Rngs(0)))

    def fn(s, x):
        return nnx.merge(graph, s)(x)

    x = jax.random.normal(jax.random.key(1), (64, 64))
    serve, q = jaxmx.ptq.quantize_model(fn, state, [x], W4, method="direct")
    assert serve.report.quantized == ("a/kernel/value", "b/kernel/value")
    deq = _dequantized(q)
    _close(jax.jit(serve)(q, x), fn(deq, x))

    # A convolution's kernel has no input Hessian: GPTQ falls back to a direct cast, and says so.
    class CNN(linen.Module):
        @linen.compact
        def __call__(self, x):
            x = jax.nn.relu(linen.Conv(32, (3, 3))(x))
            return linen.Dense(10)(x.reshape(x.shape[0], -1))

    model, x = CNN(), jax.random.normal(jax.random.key(2), (4, 8, 8, 32))
    variables = model.init(jax.random.key(3), x)
    serve, q = jaxmx.ptq.quantize_model(model.apply, variables, [x], W4, method="gptq")
    conv = serve.report["params/Conv_0/kernel"]
    assert (conv.method, conv.axis) == ("direct", 2) and "no input Hessian" in conv.note
    assert serve.report["params/Dense_0/kernel"].method == "gptq"
    want = jaxmx.quantize(variables["params"]["Conv_0"]["kernel"], "mxfp4", axis=2, packed=True)
    np.testing.assert_array_equal(
        np.asarray(q["params"]["Conv_0"]["kernel"].data), np.asarray(want.data)
    )


# --- The reference Llama, tied head ---------------------------------------------------------

TINY = LlamaConfig(vocab_size=64, width=64, depth=2, heads=4, kv_heads=2, mlp_width=96,
                   max_len=64)  # fmt: skip
EMBED = "params/embed_tokens/embedding"


@pytest.fixture(scope="module")
def llama():
    model = Llama(TINY)
    rng = np.random.default_rng(2)
    tokens = lambda n: jnp.asarray(rng.integers(0, TINY.vocab_size, (1, n)), jnp.int32)  # noqa: E731
    params = model.init(jax.random.key(0), tokens(8))
    return model, params, [tokens(32) for _ in range(3)], tokens(16)


def _get(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def test_llama_tied_head_float_lookup_quantized_copy(llama):
    model, params, calib, x = llama
    serve, q = jaxmx.ptq.quantize_model(model.apply, params, calib, W4, method="gptq")
    report = serve.report
    tied = _get(q, EMBED)
    assert isinstance(tied, jaxmx.ptq.TiedWeight) and report[EMBED].action == "tied"
    np.testing.assert_array_equal(np.asarray(tied.value), np.asarray(_get(params, EMBED)))
    assert tied.matmul.shape == (64, 64) and tied.matmul.block_axis() % 2 == 1  # features
    assert len(report.quantized) == 7 * TINY.depth + 1
    # The same as an untied Llama with the float table for the lookup, the quantized
    # copy (transposed) as its head, and the dequantized kernels.
    deq = _dequantized(q)
    p = {**deq["params"], "embed_tokens": {"embedding": tied.value}}
    p["lm_head"] = {"kernel": jaxmx.dequantize(tied.matmul).T}
    untied = Llama(LlamaConfig(**{**TINY.__dict__, "tie_embeddings": False}))
    _close(jax.jit(serve)(q, x), untied.apply({"params": p}, x))


def test_llama_rotation_alone_reproduces_the_model(llama):
    # hadamard_gptq's serving function with the rotated float weights in place of the
    # quantized ones and every matmul in high precision: only the rotations remain
    # (of the weights offline, of the activations inside intercept), and they cancel.
    model, params, calib, x = llama
    serve, q = jaxmx.ptq.quantize_model(model.apply, params, calib, W4, method="hadamard_gptq")
    report = serve.report
    assert all(report[p].hadamard == 32 for p in report.quantized)

    def rotated(path, leaf):
        r = report[path]
        w = jaxmx.ptq.rotate(_get(params, path), axis=r.axis, size=r.hadamard)
        return jaxmx.ptq.TiedWeight(leaf.value, w) if r.action == "tied" else w

    float_q = jax.tree_util.tree_map_with_path(
        lambda p, t: (
            rotated(path_string(p), t)
            if isinstance(t, (jaxmx.MXTensor, jaxmx.ptq.TiedWeight))
            else t
        ),
        q,
        is_leaf=lambda t: isinstance(t, (jaxmx.MXTensor, jaxmx.ptq.TiedWeight)),
    )
    rotation_only = copy.copy(serve)
    rotation_only.rules, rotation_only._cache = parse_rules([(".*", None)]), {}
    ref = model.apply(params, x)
    _close(rotation_only(float_q, x), ref)
    # Without the activation rotations the same weights are far off: the check can fail.
    far = float(jnp.max(jnp.abs(model.apply(_untie(float_q), x) - ref)))
    assert far > 2**10 * F32 * float(jnp.max(jnp.abs(ref)))  # 1,024 times _close's bound


def _untie(q):
    return jax.tree_util.tree_map(
        lambda t: t.matmul if isinstance(t, jaxmx.ptq.TiedWeight) else t,
        q,
        is_leaf=lambda t: isinstance(t, jaxmx.ptq.TiedWeight),
    )


def test_llama_generate_retraces_with_a_kv_cache(llama):
    # generate() calls serve_fn with cache=...: another trace, planned anew from the
    # same quantized, rotated weights; greedy decoding matches the full forward's argmax.
    model, params, calib, x = llama
    serve, q = jaxmx.ptq.quantize_model(model.apply, params, calib, W4, method="hadamard")
    prompt = x[:, :5]
    got = np.asarray(generate(serve, q, prompt, config=TINY, max_new_tokens=3))
    seq, full = np.asarray(prompt[0]).tolist(), jax.jit(serve)
    for _ in range(3):
        seq.append(int(jnp.argmax(full(q, jnp.asarray([seq], jnp.int32))[0, -1])))
    assert got[0].tolist() == seq[5:]


# --- What is left float, and errors ---------------------------------------------------------


def test_scanned_stack_and_lookup_only_tables_stay_float():
    def fn(p, tokens):
        x = p["embed"][tokens]  # a lookup only: no matmul reads the table

        def layer(h, w):
            return jnp.tanh(h @ w), None

        h, _ = jax.lax.scan(layer, x, p["stack"])
        return h @ p["head"]

    rng = np.random.default_rng(3)
    p = {
        "embed": jnp.asarray(rng.standard_normal((50, 32)), jnp.float32),
        "stack": jnp.asarray(rng.standard_normal((3, 32, 32)) / 6, jnp.float32),
        "head": jnp.asarray(rng.standard_normal((32, 8)), jnp.float32),
    }
    tokens = jnp.asarray(rng.integers(0, 50, (4, 6)), jnp.int32)
    serve, q = jaxmx.ptq.quantize_model(fn, p, [tokens], W4, method="gptq")
    report = serve.report
    assert report.quantized == ("head",)
    assert "lax.scan" in report.kept_float["stack"]
    assert report.kept_float["embed"] == "read by no matmul (gather)"
    assert isinstance(q["stack"], jax.Array) and isinstance(q["embed"], jax.Array)
    assert serve(q, tokens).shape == (4, 6, 8)


def test_errors_name_what_was_given(mlp):
    params, calib, x = mlp
    with pytest.raises(ValueError, match=r"unknown method 'awq'; allowed: 'direct', 'search'"):
        jaxmx.ptq.quantize_model(_mlp, params, calib, method="awq")
    with pytest.raises(ValueError, match="calibration is empty"):
        jaxmx.ptq.quantize_model(_mlp, params, [])
    with pytest.raises(TypeError, match=r"got one array of shape \(512, 64\)"):
        jaxmx.ptq.quantize_model(_mlp, params, x)
    with pytest.raises(TypeError, match="iterable of batches .* got int"):
        jaxmx.ptq.quantize_model(_mlp, params, 3)
    with pytest.raises(ValueError, match="method 'direct' takes neither"):
        jaxmx.ptq.quantize_model(_mlp, params, calib, method="direct", act_order=True)
    with pytest.raises(ValueError, match="hadamard_size applies to the 'hadamard\\*' methods"):
        jaxmx.ptq.quantize_model(_mlp, params, calib, method="gptq", hadamard_size=16)
    with pytest.raises(TypeError, match="callable fn"):
        jaxmx.ptq.quantize_model("mlp", params, calib)
