"""jaxmx.optax.low_precision_params: bf16 master weights, nearest vs stochastic vs compensated."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jaxmx
import jaxmx.optax as jo


def _bf16(x) -> np.ndarray:
    """float32 -> bfloat16 -> float32 in NumPy (ml_dtypes rounds to nearest even)."""
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


@functools.cache
def _step(opt):
    def step(p, s, g):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    return jax.jit(step)


def test_nearest_even_update_matches_numpy_bfloat16(rng):
    p = _bf16(rng.standard_normal(512))
    g = rng.standard_normal(512).astype(np.float32)
    opt = jo.low_precision_params(optax.sgd(0.01), "bfloat16")
    new, _ = _step(opt)(jnp.asarray(p), opt.init(jnp.asarray(p)), jnp.asarray(g))
    want = _bf16(p + np.float32(-0.01) * g)  # the float32 sum, rounded once
    np.testing.assert_array_equal(np.asarray(new), want)
    assert not np.array_equal(want, p + np.float32(-0.01) * g)  # rounding did happen


def test_bfloat16_arrays_stay_bfloat16_and_match_float32_containers(rng):
    p32 = jnp.asarray(_bf16(rng.standard_normal(256)))
    g = jnp.asarray(rng.standard_normal(256).astype(np.float32))
    opt = jo.low_precision_params(optax.adam(1e-2), "bfloat16")
    a, _ = _step(opt)(p32, opt.init(p32), g)
    b, _ = _step(opt)(
        p32.astype(jnp.bfloat16), opt.init(p32.astype(jnp.bfloat16)), g.astype(jnp.bfloat16)
    )
    assert b.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b, np.float32))


def test_small_updates_vanish_with_nearest_survive_stochastic_and_compensated():
    # 1.0 in bfloat16 has ulp 2**-7: an update of 2**-10 is an eighth of an ulp.
    p = jnp.ones(4096)
    step = 2.0**-10
    grads = jnp.full(4096, -step)  # sgd(1.0) adds +step

    def run(opt, n):
        params, state = p, opt.init(p)
        for _ in range(n):
            params, state = _step(opt)(params, state, grads)
        return params, state

    near, _ = run(jo.low_precision_params(optax.sgd(1.0)), 8)
    assert bool(jnp.all(near == 1.0))  # every update lost: the stall nearest-even leaves
    sr, _ = run(
        jo.low_precision_params(optax.sgd(1.0), rounding="stochastic", key=jax.random.key(0)), 8
    )
    # Unbiased: the mean moved by 8 * 2**-10; each weight is on the bf16 grid.
    assert float(jnp.mean(sr)) == pytest.approx(1 + 8 * step, abs=6 * 2**-7 / np.sqrt(4096))
    np.testing.assert_array_equal(np.asarray(jaxmx.round_to(sr, "bfloat16")), np.asarray(sr))
    kahan, state = run(jo.low_precision_params(optax.sgd(1.0), compensation="bfloat16"), 8)
    # Compensated: after 8 steps the carried error brought the weight to 1 + 2**-7 exactly.
    assert bool(jnp.all(kahan == 1 + 2.0**-7))
    assert state.compensation.dtype == jnp.bfloat16


def test_any_round_to_format(rng):
    fmt = jaxmx.formats.float_format(8, 3)  # a 12-bit bfloat
    p = jaxmx.round_to(jnp.asarray(rng.standard_normal(64).astype(np.float32)), fmt)
    opt = jo.low_precision_params(optax.sgd(0.1), fmt)
    new, _ = _step(opt)(p, opt.init(p), jnp.asarray(rng.standard_normal(64).astype(np.float32)))
    np.testing.assert_array_equal(np.asarray(jaxmx.round_to(new, fmt)), np.asarray(new))
    assert not np.array_equal(np.asarray(new), np.asarray(p))


def test_the_format_must_be_representable_in_the_params_dtype(rng):
    # The documented rule, enforced (issue "Reliability, round 3"): float16 has
    # three more mantissa bits than bfloat16, so in bfloat16 arrays each
    # float16-rounded value would be rounded a second time, to bfloat16.
    bf16 = {"w": jnp.asarray(_bf16(rng.standard_normal(8))).astype(jnp.bfloat16)}
    f16 = {"w": jnp.ones(8, jnp.float16)}
    with pytest.raises(ValueError, match=r"bfloat16 array, which cannot hold .* 'float16'"):
        jo.low_precision_params(optax.sgd(0.1), "float16").init(bf16)
    with pytest.raises(ValueError, match=r"float16 array, which cannot hold .* 'bfloat16'"):
        jo.low_precision_params(optax.sgd(0.1), "bfloat16").init(f16)  # its range
    opt = jo.low_precision_params(optax.sgd(0.1), "float16")
    state = opt.init({"w": jnp.ones(8)})  # float32 arrays hold any format
    with pytest.raises(ValueError, match="representable in the params' dtype"):
        opt.update(bf16, state, bf16)
    with pytest.raises(ValueError, match="round_params: .* 'float16'"):
        jo.round_params(bf16, "float16")
    # Formats within the dtype are accepted: FP8 and a 12-bit bfloat in bfloat16.
    for fmt in ("fp8_e4m3", jaxmx.formats.float_format(8, 3), "bfloat16"):
        o = jo.low_precision_params(optax.sgd(0.1), fmt)
        new, _ = _step(o)(bf16["w"], o.init(bf16["w"]), jnp.ones(8, jnp.bfloat16))
        assert new.dtype == jnp.bfloat16
    jo.low_precision_params(optax.sgd(0.1), "fp8_e5m2").init(f16)


def test_orbax_round_trip_resumes_bit_identically(tmp_path, rng):
    p = jnp.asarray(_bf16(rng.standard_normal((32, 32))))
    opt = jo.low_precision_params(
        optax.adamw(1e-2), rounding="stochastic", compensation="bfloat16", key=jax.random.key(1)
    )
    grads = [jnp.asarray(rng.standard_normal((32, 32)).astype(np.float32)) for _ in range(4)]

    def run(params, state, gs):
        for g in gs:
            params, state = _step(opt)(params, state, g)
        return params, state

    full = run(p, opt.init(p), grads)
    half = run(p, opt.init(p), grads[:2])
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", half)
        ckpt.wait_until_finished()
        restored = ckpt.restore(
            tmp_path / "ckpt", jax.tree.map(ocp.utils.to_shape_dtype_struct, half)
        )
    resumed = run(*restored, grads[2:])
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), resumed, full))


def test_bad_arguments_name_what_was_given():
    inner = optax.sgd(0.1)
    with pytest.raises(ValueError, match="unknown float format 'bf8'"):
        jo.low_precision_params(inner, "bf8")
    with pytest.raises(ValueError, match="unknown rounding 'up'"):
        jo.low_precision_params(inner, rounding="up")
    with pytest.raises(ValueError, match="key"):
        jo.low_precision_params(inner, rounding="stochastic")
    with pytest.raises(ValueError, match="compensation"):
        jo.low_precision_params(inner, compensation="int8")
    with pytest.raises(TypeError, match="int32"):
        jo.low_precision_params(inner).init({"w": jnp.zeros(3, jnp.int32)})
