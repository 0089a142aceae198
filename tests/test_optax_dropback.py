"""jaxmx.optax.dropback: regeneration bit for bit, top-k against NumPy, the Procrustes options."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jaxmx.optax as jo

KEY = jax.random.key(42)
SHAPES = {
    "dense_1": {
        "kernel": jax.ShapeDtypeStruct((48, 32), jnp.float32),
        "bias": jax.ShapeDtypeStruct((32,), jnp.float32),
    },
    "dense_2": {"kernel": jax.ShapeDtypeStruct((32, 10), jnp.float32)},
}
TOTAL = 48 * 32 + 32 + 32 * 10


def uniform_init(key, path, shape, dtype):
    """A cheap initializer (compiles fast); the regeneration test uses the default."""
    return jax.random.uniform(key, shape, dtype, -0.1, 0.1)


def _grads(params, i, mask=None):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(i), len(leaves))
    g = [jax.random.normal(k, p.shape) for k, p in zip(keys, leaves, strict=True)]
    g = treedef.unflatten(g)
    return g if mask is None else jax.tree.map(lambda a, m: a * m, g, mask)


@functools.cache
def _step(opt):
    def step(p, s, g):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    return jax.jit(step)


def _run(opt, params, steps, mask=None, state=None, start=0):
    state = opt.init(params) if state is None else state
    step = _step(opt)
    for i in range(start, start + steps):
        params, state = step(params, state, _grads(params, i, mask))
    return params, state


def test_regenerated_initial_values_equal_the_originals_bit_for_bit():
    params0 = jo.initial_params(KEY, SHAPES)
    # Regenerated alone, in another compiled program, from the key and the path.
    path, leaf = jax.tree_util.tree_leaves_with_path(params0)[-1]
    again = jax.jit(lambda k: jo.default_init(jo.leaf_key(k, path), path, leaf.shape, leaf.dtype))
    np.testing.assert_array_equal(np.asarray(again(KEY)), np.asarray(leaf))
    # Inside the jitted update: gradients only on 40 weights of dense_1, so with
    # a budget of 100 every other weight is untracked at every step and must
    # come back from regeneration exactly (any difference would move it).
    mask = jax.tree.map(jnp.zeros_like, params0)
    mask["dense_1"]["kernel"] = mask["dense_1"]["kernel"].at[:4, :10].set(1.0)
    opt = optax.chain(optax.sgd(0.1), jo.dropback(100, init_key=KEY))
    params, state = _run(opt, params0, 3, mask)
    changed = jax.tree.map(lambda a, b: np.asarray(a != b), params, params0)
    assert int(state[1].tracked) == 40
    np.testing.assert_array_equal(
        changed["dense_1"]["kernel"], np.asarray(mask["dense_1"]["kernel"]) > 0
    )
    assert not changed["dense_2"]["kernel"].any() and not changed["dense_1"]["bias"].any()


def test_state_holds_no_copy_of_the_weights():
    params0 = jo.initial_params(KEY, SHAPES, uniform_init)
    for kwargs in ({}, {"scope": "per_tensor", "threshold": "quantile", "init_decay": 0.9}):
        opt = jo.dropback(0.1, init_key=KEY, init_fn=uniform_init, **kwargs)
        _, state = _run(optax.chain(optax.sgd(0.1), opt), params0, 2)
        dropback_state = state[1]
        sizes = [leaf.size for leaf in jax.tree.leaves(dropback_state)]
        assert max(sizes) <= 2  # scalars and the two key words
        stats = jo.dropback_stats(dropback_state, params0)
        assert stats["state_bytes"] <= 40 and stats["params_bytes"] == 4 * TOTAL


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_tracked_weights_are_the_top_k_scores(scope):
    params0 = jo.initial_params(KEY, SHAPES, uniform_init)
    opt = optax.chain(
        optax.sgd(0.05), jo.dropback(0.1, init_key=KEY, init_fn=uniform_init, scope=scope)
    )
    params, state = _run(opt, params0, 2)
    grads = _grads(params, 2)
    updates, state = jax.jit(opt.update)(grads, state, params)
    got = optax.apply_updates(params, updates)
    # float32 NumPy reference: new = p - 0.05 g, score = |new - w0|, keep the k largest.
    leaves = lambda t: [np.asarray(x) for x in jax.tree.leaves(t)]  # noqa: E731
    new = [p + np.float32(-0.05) * g for p, g in zip(leaves(params), leaves(grads), strict=True)]
    scores = [np.abs(n - w0) for n, w0 in zip(new, leaves(params0), strict=True)]
    if scope == "global":
        threshold = np.sort(np.concatenate([s.ravel() for s in scores]))[-round(0.1 * TOTAL)]
        keep = [s >= threshold for s in scores]
    else:
        keep = [s >= np.sort(s.ravel())[-max(1, round(0.1 * s.size))] for s in scores]
    for g, n, k, w0, p in zip(leaves(got), new, keep, leaves(params0), leaves(params), strict=True):
        want = np.where(k, n, w0)
        # One float32 ulp: a weight dropping out lands on w0 up to the rounding
        # of p + (w0 - p), and XLA may form p - lr * g with one FMA rounding.
        ulp = np.spacing(np.maximum(np.abs(p), np.abs(want)).max())
        np.testing.assert_allclose(g, want, rtol=0, atol=ulp)
        assert np.array_equal(g[~k & (p == w0)], w0[~k & (p == w0)])
    assert int(state[1].tracked) == sum(int(k.sum()) for k in keep)


def test_procrustes_decay_and_running_threshold():
    params0 = jo.initial_params(KEY, SHAPES, uniform_init)
    budget = round(0.1 * TOTAL)
    opt = jo.dropback(
        0.1,
        init_key=KEY,
        init_fn=uniform_init,
        init_decay=0.9,
        threshold="quantile",
        quantile_rate=0.2,
    )
    params, state = _run(optax.chain(optax.sgd(0.02), opt), params0, 60)
    # The running estimate keeps the tracked count near the budget without a sort.
    assert abs(int(state[1].tracked) - budget) <= 0.25 * budget
    # Untracked weights sit at w0 * 0.9**60 (~0.2% of w0); tracked ones moved away.
    p, w0 = np.asarray(params["dense_1"]["kernel"]), np.asarray(params0["dense_1"]["kernel"])
    decayed = np.isclose(p, w0 * np.float32(0.9) ** 60, rtol=1e-5, atol=0)
    assert decayed.mean() > 0.8
    assert not np.allclose(p, w0)


def test_stats_report_budget_and_sparsity():
    params0 = jo.initial_params(KEY, SHAPES, uniform_init)
    opt = optax.chain(
        optax.sgd(0.1), jo.dropback(0.04, init_key=KEY, init_fn=uniform_init, init_decay=0.5)
    )
    params, state = _run(opt, params0, 200)  # 0.5**200 underflows: untracked weights are 0
    stats = jo.dropback_stats(state[1], params)
    assert stats["tracked"] == round(0.04 * TOTAL)
    assert stats["compression"] == pytest.approx(TOTAL / stats["tracked"])
    assert stats["zero_fraction"] == pytest.approx(1 - stats["tracked"] / TOTAL, abs=0.01)


def test_orbax_round_trip_resumes_bit_identically(tmp_path):
    params0 = jo.initial_params(KEY, SHAPES, uniform_init)
    opt = optax.chain(
        optax.sgd(0.1),
        jo.dropback(
            0.2,
            init_key=KEY,
            init_fn=uniform_init,
            scope="per_tensor",
            threshold="quantile",
            init_decay=0.99,
        ),
    )
    full = _run(opt, params0, 4)
    half = _run(opt, params0, 2)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", half)
        ckpt.wait_until_finished()
        restored = ckpt.restore(
            tmp_path / "ckpt", jax.tree.map(ocp.utils.to_shape_dtype_struct, half)
        )
    resumed = _run(opt, restored[0], 2, state=restored[1], start=2)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), resumed, full))


def test_bad_arguments_name_what_was_given():
    with pytest.raises(ValueError, match="fraction"):
        jo.dropback(1.5, init_key=KEY)
    with pytest.raises(ValueError, match=">= 1 weights, got 0"):
        jo.dropback(0, init_key=KEY)
    with pytest.raises(TypeError, match="tracked"):
        jo.dropback("10x", init_key=KEY)
    with pytest.raises(ValueError, match="unknown scope 'layer'"):
        jo.dropback(10, init_key=KEY, scope="layer")
    with pytest.raises(ValueError, match="unknown threshold"):
        jo.dropback(10, init_key=KEY, threshold="sort")
    with pytest.raises(ValueError, match="init_decay"):
        jo.dropback(10, init_key=KEY, init_decay=0.0)
    with pytest.raises(TypeError, match="init_key"):
        jo.dropback(10, init_key=jnp.zeros(3))
    # Before: "None is not a valid value for jnp.array".
    with pytest.raises(TypeError, match="dropback needs init_key: .*initial_params.*got None"):
        jo.dropback(10, init_key=None)
    with pytest.raises(TypeError, match="DropBackState"):
        jo.dropback_stats(optax.EmptyState(), {})


def test_params_not_made_by_initial_params_are_refused_at_init():
    # Before, dropback silently reset every untracked weight to values the
    # params never had. init compares the params with the regenerated ones.
    opt = jo.dropback(0.1, init_key=KEY, init_fn=uniform_init)
    params0 = jo.initial_params(KEY, SHAPES, uniform_init)
    opt.init(params0)  # the right ones pass
    other_key = jo.initial_params(jax.random.key(7), SHAPES, uniform_init)
    with pytest.raises(ValueError, match=r"differ from the initial values .*dense_1.*kernel"):
        opt.init(other_key)
    other_fn = jo.initial_params(KEY, SHAPES)  # the default init_fn, not uniform_init
    with pytest.raises(ValueError, match="initial_params"):
        opt.init(other_fn)
    one_weight = jax.tree.map(lambda p: p, params0)
    one_weight["dense_2"]["kernel"] = params0["dense_2"]["kernel"].at[3, 4].add(1.0)
    with pytest.raises(ValueError, match=r"\['dense_2'\]\['kernel'\] \(1 of 320 weights\)"):
        opt.init(one_weight)
    # Abstract params cannot be compared: an abstract init (a resume's target) works.
    jax.eval_shape(opt.init, other_key)
