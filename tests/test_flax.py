"""Flax integration: MX layers (linen and nnx) and module substitution."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxmx
import jaxmx.flax as jf
from jaxmx.flax import linen as mxnn
from jaxmx.flax import nnx as mxnnx
from models import GPT, CNNnnx, GPTConfig, GPTnnx, linen_to_nnx_params
from tests._params import covering

CFG = GPTConfig(vocab_size=13, context=16, depth=2, width=32, heads=2)
TOKENS = (jnp.arange(2 * 16).reshape(2, 16) * 7) % 13


def _same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _differs(a, b):
    return not np.array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def gpt():
    model = GPT(CFG)
    return model, model.init(jax.random.key(0), TOKENS)


# --------------------------------------------------------------------------- substitution


def test_linen_substitution_swaps_exactly_what_the_rules_say(gpt):
    model, params = gpt
    mx = jf.quantize_model(model, [("head", None), (r"attn(/|$)", "mxfp6"), (".*", "mxfp8")])
    y = mx.apply(params, TOKENS)
    sub = jf.substitution_of(mx)
    got = {p: d.split(";")[0] for p, _, d in sub.substituted}
    for i in range(CFG.depth):
        for name in ("attn", "attn/query", "attn/key", "attn/value", "attn/out"):
            assert got.pop(f"block_{i}/{name}") == "fwd mxfp6_e3m2 x mxfp6_e3m2"
        for name in ("mlp_fc", "mlp_proj"):
            assert got.pop(f"block_{i}/{name}") == "fwd mxfp8_e4m3 x mxfp8_e4m3"
    assert got == {}
    assert sub.kept == [("head", "Dense", "rule 'head' keeps it")]
    assert _differs(y, model.apply(params, TOKENS))


def test_nnx_substitution_swaps_exactly_what_the_rules_say():
    model = GPTnnx(CFG, rngs=nnx.Rngs(0))
    before = nnx.state(model)
    jf.quantize_model(model, [("head", None), ("mlp", "mxfp4_weights")])
    sub = jf.substitution_of(model)
    assert sorted(p for p, *_ in sub.substituted) == [
        f"block_{i}/{n}" for i in range(CFG.depth) for n in ("mlp_fc", "mlp_proj")
    ]
    assert ("head", "Linear", "rule 'head' keeps it") in sub.kept
    assert all(
        isinstance(m.dot_general, jf.MXDotGeneral)
        for p, m in nnx.iter_modules(model)
        if "mlp" in "/".join(map(str, p))
    )
    assert model.head.dot_general is jax.lax.dot_general
    _same(nnx.state(model), before)  # parameters untouched


def test_unmatched_rules_are_reported():
    model = GPTnnx(CFG, rngs=nnx.Rngs(0))
    with pytest.warns(UserWarning, match="rule 'decoder' matched no matmul module"):
        jf.quantize_model(model, [("decoder", "mxfp8"), (".*", "mxfp8")])
    assert [r.pattern for r in jf.substitution_of(model).unmatched] == ["decoder"]
    mx = jf.quantize_model(GPT(CFG), [("nothing_here", "mxfp8")])
    with pytest.warns(UserWarning, match="nothing_here"):
        mx.init(jax.random.key(0), TOKENS)
    assert "matched nothing" in jf.substitution_of(mx).summary()


def test_all_none_config_is_bit_identical(gpt):
    model, params = gpt
    for rules in (None, [(".*", None)], [(".*", jaxmx.DotConfig())], "fp32"):
        mx = jf.quantize_model(model, rules, warn=False)
        _same(mx.apply(params, TOKENS), model.apply(params, TOKENS))
        g0 = jax.grad(lambda p: model.apply(p, TOKENS).sum())(params)
        g1 = jax.grad(lambda p, mx=mx: mx.apply(p, TOKENS).sum())(params)
        _same(g0, g1)
    ref = GPTnnx(CFG, rngs=nnx.Rngs(0))
    sub = GPTnnx(CFG, rngs=nnx.Rngs(0))
    jf.quantize_model(sub, [(".*", None)], warn=False)
    _same(sub(TOKENS), ref(TOKENS))


def test_checkpoints_load_both_ways(gpt):
    model, params = gpt
    mx = jf.quantize_model(model, "mxfp8")
    mx_params = mx.init(jax.random.key(0), TOKENS)
    assert jax.tree.structure(mx_params) == jax.tree.structure(params)
    _same(mx_params, params)  # same init, same names, shapes and dtypes
    model.apply(mx_params, TOKENS)  # MX-trained params run in the original
    mx.apply(params, TOKENS)


def test_linen_and_nnx_substituted_models_agree(gpt):
    model, params = gpt
    rules = [("head", None), (".*", "mxfp6")]
    y_linen = jf.quantize_model(model, rules).apply(params, TOKENS)
    nnx_model = GPTnnx(CFG, rngs=nnx.Rngs(1))
    linen_to_nnx_params(nnx_model, params["params"])
    jf.quantize_model(nnx_model, rules)
    np.testing.assert_allclose(
        np.asarray(nnx_model(TOKENS)), np.asarray(y_linen), rtol=1e-5, atol=1e-5
    )


# --------------------------------------------------------------------------- MX layers


def test_mx_layers_equal_substituted_layers():
    x = jax.random.normal(jax.random.key(1), (4, 64))

    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8, name="d2")(nn.gelu(nn.Dense(48, name="d1")(x)))

    class WithMX(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = mxnn.Dense(48, mx="mxfp4_weights", name="d1")(x)
            return mxnn.Dense(8, mx="mxfp4_weights", name="d2")(nn.gelu(h))

    params = Plain().init(jax.random.key(0), x)
    a = WithMX().apply(params, x)
    b = jf.quantize_model(Plain(), "mxfp4_weights").apply(params, x)
    _same(a, b)
    assert _differs(a, Plain().apply(params, x))


@pytest.mark.parametrize(
    "kind",
    covering(["dense", "dense_general", "einsum", "conv", "attention"], always=("attention",)),
)
def test_linen_and_nnx_mx_layers_agree(kind):
    cfg = jaxmx.preset("mxfp8")
    rngs = nnx.Rngs(0)
    if kind == "dense":
        x = jax.random.normal(jax.random.key(1), (4, 40))
        lin, nx = mxnn.Dense(24, mx=cfg), mxnnx.Linear(40, 24, mx=cfg, rngs=rngs)
    elif kind == "dense_general":
        x = jax.random.normal(jax.random.key(1), (4, 6, 40))
        lin = mxnn.DenseGeneral((3, 8), axis=-1, mx=cfg)
        nx = mxnnx.LinearGeneral(40, (3, 8), axis=-1, mx=cfg, rngs=rngs)
    elif kind == "einsum":
        x = jax.random.normal(jax.random.key(1), (4, 6, 40))
        lin = mxnn.Einsum((40, 3, 8), "bsk,khd->bshd", mx=cfg)
        nx = mxnnx.Einsum("bsk,khd->bshd", (40, 3, 8), (3, 8), mx=cfg, rngs=rngs)
    elif kind == "conv":
        x = jax.random.normal(jax.random.key(1), (2, 8, 8, 32))
        lin, nx = mxnn.Conv(16, (3, 3), mx=cfg), mxnnx.Conv(32, 16, (3, 3), mx=cfg, rngs=rngs)
    else:
        x = jax.random.normal(jax.random.key(1), (2, 6, 32))
        lin = mxnn.MultiHeadDotProductAttention(num_heads=2, mx=cfg)
        nx = mxnnx.MultiHeadAttention(2, 32, decode=False, mx=cfg, rngs=rngs)
    params = lin.init(jax.random.key(0), x)
    nnx.update(nx, _to_nnx(params["params"]))
    y = lin.apply(params, x)
    np.testing.assert_allclose(np.asarray(nx(x)), np.asarray(y), rtol=1e-6, atol=1e-6)
    # Same parameters as the Flax originals (a checkpoint loads both ways).
    orig = {
        "dense": nn.Dense(24),
        "dense_general": nn.DenseGeneral((3, 8)),
        "einsum": nn.Einsum((40, 3, 8), "bsk,khd->bshd"),
        "conv": nn.Conv(16, (3, 3)),
        "attention": nn.MultiHeadDotProductAttention(num_heads=2),
    }[kind]
    p0 = orig.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, p0) == jax.tree.map(jnp.shape, params)
    assert _differs(orig.apply(p0, x), y)


def _to_nnx(p):
    return {k: _to_nnx(v) if isinstance(v, dict) else v for k, v in p.items()}


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("recipe", covering(["mxfp8", "mxfp6", "mxfp4_weights", "mxfp4"], salt=1))
def test_substituted_gpt_trains_under_every_recipe(recipe, gpt):
    """Loss goes down: learn to copy the previous token."""
    model, params = gpt
    mx = jf.quantize_model(model, [("head", None), (".*", recipe)])
    assert _differs(mx.apply(params, TOKENS), model.apply(params, TOKENS))  # MX is on
    opt = optax.adam(1e-2)
    state = opt.init(params)
    x = jax.random.randint(jax.random.key(2), (8, 16), 0, 13)
    y = jnp.roll(x, 1, axis=1)

    @jax.jit
    def step(p, s):
        def loss(p):
            logits = mx.apply(p, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        value, g = jax.value_and_grad(loss)(p)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, value

    losses = []
    for _ in range(25):
        params, state, value = step(params, state)
        losses.append(float(value))
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


@pytest.mark.slow  # a training run (~40 s on a loaded 2-core machine)
def test_substituted_nnx_cnn_trains():
    model = CNNnnx(rngs=nnx.Rngs(0))
    x0 = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
    fp32 = model(x0)
    jf.quantize_model(model, "mxfp8")
    assert _differs(model(x0), fp32)  # MX is on
    assert len(jf.substitution_of(model).substituted) == 4
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(0), (16, 28, 28, 1))
    y = jnp.arange(16) % 10

    @nnx.jit
    def step(model, opt):
        def loss(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        value, g = nnx.value_and_grad(loss)(model)
        opt.update(model, g)
        return value

    losses = [float(step(model, opt)) for _ in range(15)]
    assert losses[-1] < 0.5 * losses[0], losses


# --------------------------------------------------------------------------- other models


def test_standard_compositions():
    seq = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(10)])
    x = jnp.ones((2, 32))
    params = seq.init(jax.random.key(0), x)
    mx = jf.quantize_model(seq, [("layers_2", None), (".*", "mxfp4")])
    assert _differs(mx.apply(params, x), seq.apply(params, x))
    assert [p for p, *_ in jf.substitution_of(mx).substituted] == ["layers_0"]
    nseq = nnx.Sequential(
        nnx.Linear(32, 64, rngs=nnx.Rngs(0)),
        nnx.relu,
        nnx.Einsum("bk,kn->bn", (64, 10), (10,), rngs=nnx.Rngs(1)),
    )
    jf.quantize_model(nseq, "mxfp8")
    assert [p for p, *_ in jf.substitution_of(nseq).substituted] == ["layers/0", "layers/2"]


def test_third_party_flaxmodels_resnet():
    """A real model from an installed package (flaxmodels), code untouched."""
    fm = pytest.importorskip("flaxmodels")
    model = fm.ResNet18(output="logits", pretrained=None, num_classes=10)
    x = jax.random.normal(jax.random.key(0), (1, 16, 16, 3))
    variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(0))
    mx = jf.quantize_model(model, [("Dense", None), (".*", "mxfp8")])
    y = jax.jit(lambda v: mx.apply(v, x, train=False))(variables)  # one compile, not op by op
    sub = jf.substitution_of(mx)
    assert len(sub.substituted) == 20  # 1 stem + 16 block convs + 3 downsampling convs
    assert {k for _, k, _ in sub.substituted} == {"Conv"}
    y0 = jax.jit(lambda v: model.apply(v, x, train=False))(variables)
    assert _differs(y, y0)
    assert np.abs(np.asarray(y - y0)).max() < 0.2 * np.abs(np.asarray(y0)).max()


def test_errors():
    with pytest.raises(TypeError, match="linen or flax.nnx Module"):
        jf.quantize_model(lambda x: x, "mxfp8")
    with pytest.raises(ValueError, match="not a regular expression"):
        jf.Rule("(", "mxfp8")
    with pytest.raises(TypeError, match="a rule is a Rule or a"):
        jf.quantize_model(nn.Dense(3), [("a", "b", "c")])
    custom = nn.Dense(4, dot_general=jax.lax.dot_general, name="custom")
    with pytest.raises(ValueError, match="custom dot_general"):
        jf.quantize_model(custom, "mxfp8").init(jax.random.key(0), jnp.ones((1, 8)))
    with pytest.raises(ValueError, match="custom dot_general"):
        mxnn.Dense(4, dot_general=jax.lax.dot_general, mx="mxfp8").init(
            jax.random.key(0), jnp.ones((1, 8))
        )
    with pytest.raises(TypeError, match="mx must be a DotConfig"):
        mxnnx.Linear(4, 4, mx=3, rngs=nnx.Rngs(0))
