"""Amber Pruner's weight factors computed once (jaxmx.precompute_amber, NMSparsity.factor).

The precomputed rules must give bit for bit the outputs of the rules that
compute the factors on every call (the same float32 numbers), carry factors
that match a float64 NumPy model of the paper's formula, and refuse a
matmul whose weight does not fit the factors rather than use them.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmx
from jaxmx.sparsity import AmberFactor, amber_factor

from ._arrays import normal

AMBER = jaxmx.NMSparsity(8, 16, score="amber")


def np_amber_factor(w, trim=0.005):
    """f_j for x @ w (feature j is row j of w), float64."""
    w = np.asarray(w, np.float64)
    lo, hi = np.quantile(w.ravel(), [trim, 1 - trim])
    kept = w[(w >= lo) & (w <= hi)]
    wn = (w - kept.mean()) / max(kept.std(), 1e-8)
    norms = np.sqrt((wn**2).sum(axis=1))
    return norms / max(norms.min(), 1e-8)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(256, name="up")(x))
        h = nn.gelu(nn.Dense(128, name="mid")(h))
        return nn.Dense(64, name="down")(h)


def _setup():
    model = MLP()
    x = normal(0, (16, 64))
    params = model.init(jax.random.key(1), x)
    cfg = jaxmx.DotConfig(lhs="mxfp8", rhs="mxfp8", lhs_sparsity=AMBER)
    rules = [("down", None), ("up|mid", cfg)]
    return model, params, x, rules


def test_precomputed_rules_are_bit_identical():
    model, params, x, rules = _setup()
    cached = jaxmx.precompute_amber(rules, params)
    assert [r.pattern for r in cached] == [
        "down",
        "(^|/)params/mid/kernel$",
        "(^|/)params/up/kernel$",
        "up|mid",
    ]
    every = jaxmx.intercept(model.apply, rules)
    fast = jaxmx.intercept(model.apply, cached, warn=False)
    y = jax.jit(every)(params, x)
    y_fast = jax.jit(fast)(params, x)
    np.testing.assert_array_equal(np.asarray(y_fast), np.asarray(y))
    assert [s.reason.endswith("lhs 8:16 amber (precomputed)") for s in fast.coverage.sites] == [
        True,
        True,
        False,
    ]
    # The amber mask did something: dense activations give another output.
    dense = jax.jit(jaxmx.intercept(model.apply, [("down", None), ("up|mid", "mxfp8")]))
    assert not np.array_equal(np.asarray(dense(params, x)), np.asarray(y))


def test_factors_match_the_formula():
    _, params, _, rules = _setup()
    cached = jaxmx.precompute_amber(rules, params)
    factor = cached[2].config.lhs_sparsity.factor
    w = params["params"]["up"]["kernel"]
    assert isinstance(factor, AmberFactor)
    assert factor.shape == (64, 256) and factor.keep == (0,) and factor.source == "params/up/kernel"
    np.testing.assert_array_equal(
        factor.values, np.asarray(jax.jit(amber_factor, static_argnums=1)(w, (0,)))
    )
    np.testing.assert_allclose(factor.values, np_amber_factor(w), rtol=1e-5)
    assert not factor.values.flags.writeable


def test_inner_params_paths_and_mx_weights():
    model, params, x, rules = _setup()
    inner = jaxmx.precompute_amber(rules, params["params"])  # paths without "params/"
    assert inner[1].pattern == "(^|/)mid/kernel$"
    y = jax.jit(jaxmx.intercept(model.apply, inner, warn=False))(params, x)
    y_every = jax.jit(jaxmx.intercept(model.apply, rules))(params, x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_every))
    # MXTensor weights (served quantized): factors of the decoded weight, as the matmul takes it.
    q = jaxmx.quantize_params(params, [("down", None), (".*", "mxfp8")])
    cached = jaxmx.precompute_amber(rules, q)
    y_q = jax.jit(jaxmx.intercept(model.apply, cached, warn=False))(q, x)
    y_q_every = jax.jit(jaxmx.intercept(model.apply, rules))(q, x)
    np.testing.assert_array_equal(np.asarray(y_q), np.asarray(y_q_every))


def test_configs_with_equal_factors_are_equal():
    _, params, _, rules = _setup()
    a = jaxmx.precompute_amber(rules, params)
    b = jaxmx.precompute_amber(rules, params)
    assert a == b and hash(a[1].config) == hash(b[1].config)
    assert a[1].config != a[2].config


def _one_weight(fn, w, x):
    """fn(params, x) under amber rules computed each call and precomputed from ``w``."""
    cfg = jaxmx.DotConfig(lhs_sparsity=AMBER)
    rules = [("w", cfg)]
    cached = jaxmx.precompute_amber(rules, {"w": {"kernel": w}})
    every = jax.jit(jaxmx.intercept(fn, rules))
    fast = jax.jit(jaxmx.intercept(fn, cached, warn=False))
    return every, fast


def test_a_weight_that_is_not_the_stored_one_gets_its_factors_on_the_call():
    w, x = normal(2, (64, 64)), normal(3, (8, 64))
    # Used transposed (same shape): the probe of its values tells it apart.
    every, fast = _one_weight(lambda p, x: x @ p["w"]["kernel"].T, w, x)
    params = {"w": {"kernel": w}}
    np.testing.assert_array_equal(np.asarray(fast(params, x)), np.asarray(every(params, x)))
    # Updated after precompute_amber: the new weight's factors, not the stale ones.
    every, fast = _one_weight(lambda p, x: x @ p["w"]["kernel"], w, x)
    updated = {"w": {"kernel": w.at[3, 5].add(1.0) * 1.5 + normal(4, (64, 64))}}
    np.testing.assert_array_equal(np.asarray(fast(updated, x)), np.asarray(every(updated, x)))
    stale = jaxmx.sparsify(x, AMBER, axis=1, other=w, other_axis=0)
    fresh = jaxmx.sparsify(x, AMBER, axis=1, other=updated["w"]["kernel"], other_axis=0)
    assert not np.array_equal(np.asarray(stale), np.asarray(fresh))  # the test can tell


def test_a_weight_used_reshaped_is_refused():
    w = normal(2, (64, 64))
    _, fast = _one_weight(lambda p, x: x @ p["w"]["kernel"].reshape(32, 128), w, None)
    with pytest.raises(
        ValueError, match=r"precomputed amber factor of w/kernel.*shape \(32, 128\)"
    ):
        fast({"w": {"kernel": w}}, normal(3, (4, 32)))


def test_factor_validation():
    w = normal(5, (8, 4))
    f = AmberFactor.of(w, (0,), 0.005, "w")
    assert f.probe.size == 32 and f.values.shape == (8,)
    assert jaxmx.NMSparsity(2, 4, score="amber", factor=f).describe() == "2:4 amber (precomputed)"
    with pytest.raises(ValueError, match="goes with score='amber'"):
        jaxmx.NMSparsity(2, 4, factor=f)
    with pytest.raises(ValueError, match="amber_trim=0.005"):
        jaxmx.NMSparsity(2, 4, score="amber", amber_trim=0.01, factor=f)
    with pytest.raises(TypeError, match="precompute_amber"):
        jaxmx.NMSparsity(2, 4, score="amber", factor=np.ones(8))
    with pytest.raises(ValueError, match=r"needs \(8,\)"):
        AmberFactor(np.ones(4), (8, 4), (0,), 0.005, "w", f.probe)
    with pytest.raises(ValueError, match=r"probed at 32 positions"):
        AmberFactor(f.values, (8, 4), (0,), 0.005, "w", f.probe[:3])
    assert "factor" not in repr(jaxmx.NMSparsity(2, 4, score="amber", factor=f))


def test_rules_without_amber_are_unchanged():
    rules = [("a", "mxfp8"), ("b", jaxmx.DotConfig(lhs_sparsity=jaxmx.NMSparsity(2, 4)))]
    out = jaxmx.precompute_amber(rules, {"a": {"kernel": jnp.ones((8, 8))}})
    assert [(r.pattern, r.config) for r in out] == [
        (r.pattern, r.config) for r in jaxmx.rules.parse_rules(rules)
    ]
