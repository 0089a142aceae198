"""Tests for the reference models: shapes, causality, linen/nnx parity, validation."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import CNN, GPT, CNNnnx, GPTConfig, GPTnnx, linen_to_nnx_params

CFG = GPTConfig(vocab_size=13, context=12, depth=2, width=32, heads=2)


def _tokens(batch=2, length=CFG.context, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, CFG.vocab_size)


def _shapes(tree):
    return jax.tree.map(jnp.shape, flax.core.unfreeze(tree))


def _abstract_nnx_params(make):
    # eval_shape builds the module without computing any initial values.
    return nnx.to_pure_dict(nnx.state(nnx.eval_shape(make), nnx.Param))


@pytest.fixture(scope="module")
def linen_gpt():
    model = GPT(CFG)
    return model, jax.jit(model.init)(jax.random.key(0), _tokens())["params"]


def test_public_names_importable():
    import models

    for name in models.__all__:
        assert getattr(models, name) is not None


def test_gpt_logit_shapes(linen_gpt):
    model, params = linen_gpt
    tokens = _tokens(batch=3, length=7)
    logits = jax.eval_shape(lambda t: model.apply({"params": params}, t), tokens)
    assert (logits.shape, logits.dtype) == ((3, 7, CFG.vocab_size), jnp.float32)
    logits = nnx.eval_shape(lambda t: GPTnnx(CFG, rngs=nnx.Rngs(0))(t), tokens)
    assert (logits.shape, logits.dtype) == ((3, 7, CFG.vocab_size), jnp.float32)


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_gpt_is_causal(api, linen_gpt):
    if api == "linen":
        model, params = linen_gpt
        forward = jax.jit(lambda t: model.apply({"params": params}, t))
    else:
        forward = nnx.jit(GPTnnx(CFG, rngs=nnx.Rngs(0)))
    tokens = _tokens()
    t = 5
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % CFG.vocab_size)
    before, after = forward(tokens), forward(changed)
    # Positions before t cannot see token t ...
    np.testing.assert_allclose(before[:, :t], after[:, :t], rtol=0, atol=1e-6)
    # ... while position t and later do, so the check above is not vacuous.
    assert np.abs(before[:, t:] - after[:, t:]).max(axis=-1).min() > 1e-4


def test_linen_and_nnx_have_identical_parameter_trees(linen_gpt):
    _, params = linen_gpt
    nnx_params = _abstract_nnx_params(lambda: GPTnnx(CFG, rngs=nnx.Rngs(0)))
    assert _shapes(params) == _shapes(nnx_params)
    images = jnp.zeros((1, 28, 28, 1))
    cnn_params = jax.eval_shape(CNN().init, jax.random.key(0), images)["params"]
    cnn_nnx = _abstract_nnx_params(lambda: CNNnnx(rngs=nnx.Rngs(0)))
    assert _shapes(cnn_params) == _shapes(cnn_nnx)


def test_linen_to_nnx_params_reproduces_linen_logits(linen_gpt):
    model, params = linen_gpt
    nnx_model = GPTnnx(CFG, rngs=nnx.Rngs(1))
    tokens = _tokens()
    assert not np.allclose(nnx_model(tokens), model.apply({"params": params}, tokens))
    linen_to_nnx_params(nnx_model, params)
    np.testing.assert_allclose(
        nnx_model(tokens), model.apply({"params": params}, tokens), rtol=1e-5, atol=1e-5
    )


def test_linen_to_nnx_params_rejects_other_shapes():
    other = GPTConfig(vocab_size=13, context=12, depth=1, width=32, heads=2)
    params = GPT(other).init(jax.random.key(0), _tokens())["params"]
    with pytest.raises(ValueError, match="missing .*block_1"):
        linen_to_nnx_params(GPTnnx(CFG, rngs=nnx.Rngs(0)), params)


def test_dropout_is_active_only_in_training_and_follows_the_rng():
    cfg = GPTConfig(vocab_size=13, context=12, depth=1, width=32, heads=2, dropout=0.3)
    model, tokens = GPT(cfg), _tokens()
    params = model.init(jax.random.key(0), tokens)["params"]

    def run(key):
        return model.apply({"params": params}, tokens, train=True, rngs={"dropout": key})

    a, b, c = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert not np.allclose(a, model.apply({"params": params}, tokens))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"width": 30, "heads": 4}, "divisible"),
        ({"depth": 0}, "depth must be a positive int"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_gpt_config_validation(kwargs, match):
    base = dict(vocab_size=13, context=12, depth=1, width=32, heads=2)
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**base, **kwargs})


def test_gpt_rejects_sequences_longer_than_context(linen_gpt):
    model, params = linen_gpt
    with pytest.raises(ValueError, match="exceeds the model context 12"):
        model.apply({"params": params}, _tokens(length=13))
    with pytest.raises(TypeError, match="integer"):
        model.apply({"params": params}, jnp.zeros((1, 4)))


def test_cnn_shapes_and_validation():
    images = jnp.zeros((4, 28, 28, 1))
    params = CNN().init(jax.random.key(0), images)["params"]
    assert CNN().apply({"params": params}, images).shape == (4, 10)
    assert CNNnnx(num_classes=3, rngs=nnx.Rngs(0))(images).shape == (4, 3)
    with pytest.raises(ValueError, match=r"\(batch, 28, 28, 1\), got shape \(4, 28, 28\)"):
        CNN().apply({"params": params}, jnp.zeros((4, 28, 28)))
