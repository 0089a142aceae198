"""N:M sparsity (jaxmx.NMSparsity, jaxmx.sparsify, DotConfig.lhs_sparsity/rhs_sparsity).

The masks are checked against a NumPy model (a stable sort of the negated
scores, NaN first), the amber and wanda scores against float64 NumPy
formulas, the composition with every built-in format against
``fake_quantize(sparsify(x))``, and dot_general's forward and backward
against explicit references.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxmx
from jaxmx.sparsity import nm_mask

from ._arrays import assert_differs, normal

NN = (((1,), (0,)), ((), ()))  # x @ w


# --------------------------------------------------------------------------
# A NumPy model of the masks and scores.
# --------------------------------------------------------------------------


def np_mask(scores, n, m, axis=-1):
    """Keep the n best of every m along axis: a stable sort of -score, NaN first."""
    s = np.moveaxis(np.asarray(scores, np.float64), axis, -1)
    g = s.reshape(-1, m)
    keep = np.zeros(g.shape, bool)
    for r, row in enumerate(g):
        key = np.where(np.isnan(row), -np.inf, -row)
        keep[r, np.argsort(key, kind="stable")[:n]] = True
    return np.moveaxis(keep.reshape(s.shape), -1, axis)


def np_amber_factor(w, trim=0.005):
    """f_j for x @ w (feature j is row j of w), float64."""
    w = np.asarray(w, np.float64)
    lo, hi = np.quantile(w.ravel(), [trim, 1 - trim])
    kept = w[(w >= lo) & (w <= hi)]
    if kept.size == 0:
        kept = w.ravel()
    wn = (w - kept.mean()) / max(kept.std(), 1e-8)
    norms = np.sqrt((wn**2).sum(axis=1))
    return norms / max(norms.min(), 1e-8)


def np_wanda_factor(x):
    """||x_j|| over tokens for x @ w (feature j is column j of x), float64."""
    return np.sqrt((np.asarray(x, np.float64) ** 2).sum(axis=0))


def assert_clear_ranking(scores, n, m, axis=-1, rel=1e-4):
    """Precondition: every group's n-th and (n+1)-th scores are far apart, so
    float32 and float64 scores pick the same elements."""
    s = np.sort(np.moveaxis(np.asarray(scores), axis, -1).reshape(-1, m), axis=1)[:, ::-1]
    gap = (s[:, n - 1] - s[:, n]) / np.maximum(s[:, n - 1], 1e-30)
    assert gap.min() > rel, "test data has a near-tie; pick another seed"


# --------------------------------------------------------------------------
# The record.
# --------------------------------------------------------------------------


def test_record_is_frozen_hashable_and_validated():
    a, b = jaxmx.NMSparsity(2, 4), jaxmx.NMSparsity(2, 4, score="magnitude")
    assert a == b and hash(a) == hash(b) and a != jaxmx.NMSparsity(2, 4, score="amber")
    with pytest.raises(AttributeError):
        a.n = 3
    cases = [
        ((0, 4), {}, "n must be a positive int, got 0"),
        ((4, 4), {}, "0 < n < m"),
        ((5, 4), {}, "0 < n < m"),
        ((2, 4.0), {}, "m must be a positive int, got 4.0"),
        ((True, 4), {}, "n must be a positive int, got True"),
        ((2, 4), {"score": "topk"}, "unknown NMSparsity score 'topk'; allowed: magnitude"),
        ((2, 4), {"backward": "ste"}, "allowed: masked, straight_through"),
        ((2, 4), {"amber_trim": 0.5}, "amber_trim must be a float in [0, 0.5)"),
    ]
    for args, kwargs, msg in cases:
        with pytest.raises(ValueError, match=re.escape(msg)):
            jaxmx.NMSparsity(*args, **kwargs)
    with pytest.raises(
        TypeError, match="lhs_sparsity must be a jaxmx.NMSparsity or None, got '2:4'"
    ):
        jaxmx.DotConfig(lhs_sparsity="2:4")


# --------------------------------------------------------------------------
# Masks: exactly n per group, ties, zeros, NaN.
# --------------------------------------------------------------------------

NM = st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (8, 16), (3, 6)])
# A few values only, so that groups have many ties; zeros and negatives included.
VALUES = st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 0.5, 3.0, np.inf, -np.inf])


@settings(max_examples=60)
@given(nm=NM, data=st.data())
def test_exactly_n_kept_per_group_as_the_numpy_model(nm, data):
    n, m = nm
    rows, groups = 3, 96 // m  # one shape for every pattern: one compile each
    x = data.draw(hnp.arrays(np.float32, (rows, groups * m), elements=VALUES))
    out = np.asarray(jaxmx.sparsify(jnp.asarray(x), jaxmx.NMSparsity(n, m), axis=1))
    keep = np_mask(np.abs(x), n, m, axis=1)
    np.testing.assert_array_equal(out, np.where(keep, x, 0.0))
    mask = np.asarray(nm_mask(jnp.abs(jnp.asarray(x)), n, m, axis=1))
    np.testing.assert_array_equal(mask, keep)
    assert (mask.reshape(rows, groups, m).sum(-1) == n).all()


@settings(max_examples=30)
@given(data=st.data())
def test_masks_along_any_axis(data):
    x = data.draw(hnp.arrays(np.float32, (8, 3, 4), elements=st.floats(-4, 4, width=32)))
    axis = data.draw(st.sampled_from([0, 2, -3]))
    mask = np.asarray(nm_mask(jnp.abs(jnp.asarray(x)), 2, 4, axis))
    np.testing.assert_array_equal(mask, np_mask(np.abs(x), 2, 4, axis))


def test_ties_keep_the_lower_index_and_nan_is_kept():
    sp = jaxmx.NMSparsity(2, 4)
    x = jnp.array(
        [
            [1.0, 1.0, 1.0, 1.0],  # all tied: the first two
            [0.0, 0.0, 0.0, 0.0],  # zeros: still exactly two kept (as zeros)
            [-2.0, 2.0, 1.0, 2.0],  # |-2| ties 2: indices 0 and 1
            [0.1, np.nan, 5.0, 1.0],  # a NaN ranks above everything
            [np.nan, np.nan, np.nan, 9.0],  # more NaNs than n: the first two
        ]
    )
    mask = np.asarray(nm_mask(jnp.abs(x), 2, 4, 1))
    expected = [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 0, 0]]
    np.testing.assert_array_equal(mask, np.array(expected, bool))
    out = np.asarray(jaxmx.sparsify(x, sp, axis=1))
    assert np.isnan(out[3, 1]) and np.isnan(out[4, :2]).all() and out[4, 3] == 0.0
    # A dropped inf becomes 0 (not inf * 0 = NaN).
    y = np.asarray(jaxmx.sparsify(jnp.array([[np.inf, -np.inf, np.inf, 1.0]]), sp, axis=1))
    np.testing.assert_array_equal(y, [[np.inf, -np.inf, 0.0, 0.0]])


# --------------------------------------------------------------------------
# The scores against NumPy.
# --------------------------------------------------------------------------


def test_amber_score_is_the_robust_norm_formula():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(16, 64)).astype(np.float32)
    # Input features with different weight scales, and a few outliers that
    # the trimmed statistics must leave out.
    w = (rng.normal(size=(64, 48)) * rng.uniform(0.2, 3.0, size=(64, 1))).astype(np.float32)
    w[5, 7], w[40, 2] = 80.0, -60.0
    sp = jaxmx.NMSparsity(4, 8, score="amber")
    scores = np.abs(x.astype(np.float64)) * np_amber_factor(w)[None, :]
    assert_clear_ranking(scores, 4, 8, axis=1)
    expected = np.where(np_mask(scores, 4, 8, axis=1), x, 0.0)
    out = jaxmx.sparsify(jnp.asarray(x), sp, axis=1, other=jnp.asarray(w), other_axis=0)
    np.testing.assert_array_equal(np.asarray(out), expected)
    # The weight changes the choice: the amber mask is not the magnitude one.
    assert_differs(out, jaxmx.sparsify(jnp.asarray(x), jaxmx.NMSparsity(4, 8), axis=1))
    # The factor: trimmed statistics, not the plain ones.
    got = np.asarray(jaxmx.sparsity.amber_factor(jnp.asarray(w), (0,)))
    # float32 sums of 3072 squares: relative error well below 1e-4.
    np.testing.assert_allclose(got, np_amber_factor(w), rtol=1e-4)
    assert not np.allclose(np_amber_factor(w), np_amber_factor(w, trim=0.0), rtol=1e-3)


def test_wanda_score_weighs_weights_by_activation_norms():
    rng = np.random.default_rng(4)
    x = (rng.normal(size=(32, 64)) * rng.uniform(0.1, 4.0, size=(1, 64))).astype(np.float32)
    w = rng.normal(size=(64, 24)).astype(np.float32)
    sp = jaxmx.NMSparsity(2, 4, score="wanda")
    scores = np.abs(w.astype(np.float64)) * np_wanda_factor(x)[:, None]
    assert_clear_ranking(scores, 2, 4, axis=0)
    expected = np.where(np_mask(scores, 2, 4, axis=0), w, 0.0)
    out = jaxmx.sparsify(jnp.asarray(w), sp, axis=0, other=jnp.asarray(x), other_axis=1)
    np.testing.assert_array_equal(np.asarray(out), expected)
    assert_differs(out, jaxmx.sparsify(jnp.asarray(w), jaxmx.NMSparsity(2, 4), axis=0))


def test_sparsify_errors():
    x = jnp.ones((4, 8))
    with pytest.raises(ValueError, match="'amber' score needs the other operand"):
        jaxmx.sparsify(x, jaxmx.NMSparsity(2, 4, score="amber"), axis=1)
    with pytest.raises(ValueError, match="length 6 is not a multiple of 4"):
        jaxmx.sparsify(jnp.ones((4, 6)), jaxmx.NMSparsity(2, 4), axis=1)
    with pytest.raises(ValueError, match="other's axis 1 has length 3"):
        jaxmx.sparsify(
            x, jaxmx.NMSparsity(2, 4, score="wanda"), axis=1, other=x[:, :3], other_axis=1
        )
    with pytest.raises(TypeError, match="sparsity must be a jaxmx.NMSparsity"):
        jaxmx.sparsify(x, (2, 4), axis=1)
    with pytest.raises(TypeError, match="sparsify takes a float array"):
        jaxmx.sparsify(jnp.ones((4, 8), jnp.int32), jaxmx.NMSparsity(2, 4))
    with pytest.raises(ValueError, match="axis=2 is out of range"):
        jaxmx.sparsify(x, jaxmx.NMSparsity(2, 4), axis=2)


# --------------------------------------------------------------------------
# Sparsify, then quantize: every built-in format.
# --------------------------------------------------------------------------


def _f32_dot_tol(a, b):
    """Bound on a float32-accumulated a @ b against the exact sum: K units of
    float32 roundoff (2^-24) times sum |a||b|, the textbook gamma_K bound."""
    a, b = np.abs(np.asarray(a, np.float64)), np.abs(np.asarray(b, np.float64))
    return a.shape[-1] * 2.0**-24 * (a @ b) + 1e-30


@pytest.mark.parametrize("fmt", jaxmx.list_formats())
def test_sparsify_then_quantize_with_every_format(fmt):
    sp = jaxmx.NMSparsity(2, 4)
    x = normal(0, (8, 64)) * jnp.linspace(0.1, 3.0, 64)
    w = normal(1, (64, 8))
    cfg = jaxmx.DotConfig(lhs=fmt, lhs_sparsity=sp)
    y = np.asarray(jaxmx.dot_general(x, w, NN, config=cfg), np.float64)
    s = jaxmx.sparsify(x, sp, axis=1)
    qs = jaxmx.fake_quantize(s, fmt, axis=1)
    # Each kept value quantized in its block; the zeros stay zeros.
    assert (np.asarray(qs)[np.asarray(s) == 0] == 0).all()
    ref = np.asarray(qs, np.float64) @ np.asarray(w, np.float64)
    tol = _f32_dot_tol(qs, w)
    assert (np.abs(y - ref) <= tol).all()
    # It fails if either step is skipped: quantization alone, sparsity alone.
    for skipped in (jaxmx.fake_quantize(x, fmt, axis=1), s):
        other = np.asarray(skipped, np.float64) @ np.asarray(w, np.float64)
        assert (np.abs(y - other) > tol).any()


@pytest.mark.parametrize("fmt", ["mxfp4_e2m1", "nvfp4", "mx6", "tensor_fp8_e4m3"])
def test_weight_sparsity_composes_with_weight_formats(fmt):
    sp = jaxmx.NMSparsity(8, 16, score="wanda")
    x, w = normal(2, (8, 64)), normal(3, (64, 32))
    kw = {"rhs_block_size": (16, 16)} if fmt == "nvfp4" else {}
    cfg = jaxmx.DotConfig(rhs=fmt, rhs_sparsity=sp, **kw)
    y = np.asarray(jaxmx.dot_general(x, w, NN, config=cfg), np.float64)
    sw = jaxmx.sparsify(w, sp, axis=0, other=x, other_axis=1)
    # 2-D tiles cover the last two axes (axis=-1 names them); blocks otherwise run along K.
    qkw = {"block_size": (16, 16), "axis": -1} if kw else {"axis": 0}
    q = jaxmx.fake_quantize(sw, fmt, **qkw)
    ref = np.asarray(x, np.float64) @ np.asarray(q, np.float64)
    assert (np.abs(y - ref) <= _f32_dot_tol(x, q)).all()
    assert_differs(q, jaxmx.fake_quantize(w, fmt, **qkw))


def test_groups_that_do_not_fit_the_blocks_are_refused():
    x, w = jnp.ones((2, 128)), jnp.ones((128, 4))
    cases = [
        (dict(lhs="mxfp8_e4m3", lhs_sparsity=jaxmx.NMSparsity(2, 64)), "blocks lhs by 32"),
        (dict(lhs="nvfp4", lhs_sparsity=jaxmx.NMSparsity(4, 32)), "blocks lhs by 16"),
        (dict(rhs="mx9", rhs_sparsity=jaxmx.NMSparsity(4, 32)), "blocks rhs by 16"),
        (dict(lhs="mxfp8_e4m3", block_size=8, lhs_sparsity=jaxmx.NMSparsity(8, 16)), "by 8"),
        (dict(lhs_sparsity=jaxmx.NMSparsity(2, 3)), "length 128 is not a multiple of 3"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            jaxmx.dot_general(x, w, NN, config=jaxmx.DotConfig(**kw))
    # Per-tensor scales and high precision have no blocks to straddle.
    for fmt in ("tensor_fp8_e4m3", None):
        cfg = jaxmx.DotConfig(lhs=fmt, lhs_sparsity=jaxmx.NMSparsity(2, 128))
        assert jaxmx.dot_general(x, w, NN, config=cfg).shape == (2, 4)


def test_other_errors_in_matmuls():
    x, w = normal(0, (4, 32)), normal(1, (32, 4))
    cfg = jaxmx.DotConfig(rhs_sparsity=jaxmx.NMSparsity(2, 4))
    with pytest.raises(ValueError, match="rhs is an MXTensor \\(already quantized\\)"):
        jaxmx.dot_general(x, jaxmx.quantize(w, "mxfp8_e4m3", axis=0), NN, config=cfg)
    with pytest.raises(ValueError, match="contracts no axis of lhs \\(an outer product\\)"):
        jaxmx.dot_general(
            x[:, :1].ravel(),
            w[0],
            (((), ()), ((), ())),
            config=jaxmx.DotConfig(lhs_sparsity=jaxmx.NMSparsity(2, 4)),
        )
    with pytest.raises(ValueError, match="not for convolutions"):
        jaxmx.conv_general_dilated(
            jnp.ones((1, 4, 4, 8)),
            jnp.ones((3, 3, 8, 4)),
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            config=cfg,
        )


# --------------------------------------------------------------------------
# dot_general forward and backward against explicit references.
# --------------------------------------------------------------------------


def _masked_reference(lhs_sp, rhs_sp, backward):
    """x @ w with explicit masks (chosen from the dense operands, held fixed)."""

    def f(x, w):
        mx = jax.lax.stop_gradient(jaxmx.sparsify(x, lhs_sp, axis=1, other=w, other_axis=0) != 0)
        mw = jax.lax.stop_gradient(jaxmx.sparsify(w, rhs_sp, axis=0, other=x, other_axis=1) != 0)
        if backward == "masked":  # d(mask * x)/dx = mask
            xs, ws = jnp.where(mx, x, 0.0), jnp.where(mw, w, 0.0)
        else:  # straight-through: the forward value, the identity's gradient
            xs = x + jax.lax.stop_gradient(jnp.where(mx, x, 0.0) - x)
            ws = w + jax.lax.stop_gradient(jnp.where(mw, w, 0.0) - w)
        return xs @ ws

    return f


@pytest.mark.parametrize("backward", ["masked", "straight_through"])
def test_forward_and_backward_match_an_explicit_reference(backward):
    # No zeros in the data: a kept element is nonzero, so (sparsify != 0) is the mask.
    x = normal(5, (16, 32)) + 0.01
    w = normal(6, (32, 8)) + 0.01
    lhs_sp = jaxmx.NMSparsity(2, 4, score="amber", backward=backward)
    rhs_sp = jaxmx.NMSparsity(4, 8, score="wanda", backward=backward)
    cfg = jaxmx.DotConfig(lhs_sparsity=lhs_sp, rhs_sparsity=rhs_sp)
    ref = _masked_reference(lhs_sp, rhs_sp, backward)
    ct = normal(7, (16, 8))

    def vjp(f):
        y, pull = jax.vjp(f, x, w)
        return (y, *pull(ct))

    got = vjp(lambda a, b: jaxmx.dot_general(a, b, NN, config=cfg))
    want = vjp(ref)
    # Same products, float32 accumulation in possibly different orders.
    for g, r, (a, b) in zip(got, want, [(x, w), (ct, w.T), (x.T, ct)], strict=True):
        np.testing.assert_allclose(g, r, atol=_f32_dot_tol(a, b).max() * 2)
    dx = np.asarray(got[1])
    kept = np.asarray(jaxmx.sparsify(x, lhs_sp, axis=1, other=w, other_axis=0)) != 0
    if backward == "masked":
        assert (dx[~kept] == 0).all() and (dx[kept] != 0).all()
    else:
        assert (dx[~kept] != 0).all()


def test_quantized_backward_uses_the_sparsified_operands():
    # With MX formats the backward matmuls re-quantize the sparsified operands
    # along their free axes: the gradients are those of dot_general on the
    # pre-sparsified operands (no sparsity in the config), then masked.
    x, w = normal(8, (32, 64)) + 0.01, normal(9, (64, 32)) + 0.01
    lhs_sp, rhs_sp = jaxmx.NMSparsity(2, 4), jaxmx.NMSparsity(8, 16)
    base = jaxmx.preset("mxfp8")
    cfg = base.replace(lhs_sparsity=lhs_sp, rhs_sparsity=rhs_sp)
    xs, ws = jaxmx.sparsify(x, lhs_sp, axis=1), jaxmx.sparsify(w, rhs_sp, axis=0)
    ct = normal(10, (32, 32))
    y, pull = jax.vjp(lambda a, b: jaxmx.dot_general(a, b, NN, config=cfg), x, w)
    y0, pull0 = jax.vjp(lambda a, b: jaxmx.dot_general(a, b, NN, config=base), xs, ws)
    dx, dw = pull(ct)
    dx0, dw0 = pull0(ct)
    # The same quantizations and matmuls: equal up to the summation order.
    np.testing.assert_allclose(y, y0, rtol=0, atol=_f32_dot_tol(xs, ws).max() * 2)
    # dgrad ct @ ws^T and wgrad xs^T @ ct: the same float32 bound, doubled for
    # MX values a little larger than the float ones (as the forward's).
    dx_tol = _f32_dot_tol(ct, np.asarray(ws).T).max() * 2
    dw_tol = _f32_dot_tol(np.asarray(xs).T, ct).max() * 2
    np.testing.assert_allclose(dx, jnp.where(xs != 0, dx0, 0), rtol=0, atol=dx_tol)
    np.testing.assert_allclose(dw, jnp.where(ws != 0, dw0, 0), rtol=0, atol=dw_tol)
    assert_differs(dx, dx0)  # the masking of the gradient did something
    # And the dense-operand gradient differs: the backward used the sparse values.
    _, pull_dense = jax.vjp(lambda a, b: jaxmx.dot_general(a, b, NN, config=base), x, w)
    assert not np.allclose(jnp.where(xs != 0, pull_dense(ct)[0], 0), dx, atol=1e-3)


def test_jit_vmap_with_quantized_residuals():
    # (The other tests run with high-precision residuals.)
    x, w = normal(11, (3, 8, 32)), normal(12, (32, 16))
    cfg = jaxmx.DotConfig(
        lhs="mxfp8_e4m3",
        rhs="mxfp4_e2m1",
        grad="mxfp8_e5m2",
        residuals="quantized",
        lhs_sparsity=jaxmx.NMSparsity(2, 4, score="amber"),
        rhs_sparsity=jaxmx.NMSparsity(4, 8, score="wanda"),
    )

    def f(x, w):
        return jaxmx.dot_general(x, w, NN, config=cfg)

    eager = jnp.stack([jax.jit(f)(xi, w) for xi in x])
    np.testing.assert_array_equal(jax.jit(jax.vmap(f, in_axes=(0, None)))(x, w), eager)
    loss = lambda x, w: jnp.sum(f(x, w) ** 2)  # noqa: E731
    g_eager = [jax.jit(jax.grad(loss, argnums=(0, 1)))(xi, w) for xi in x]
    gx, gw = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(0, None)))(x, w)
    # Per example, dgrad ct @ w^T and wgrad x^T @ ct (ct = 2 y): both sides
    # within the float32 accumulation bound of the exact product, so within
    # twice it of each other, doubled again for MX values a little larger
    # than the float ones.
    ct = 2 * np.abs(np.asarray(eager, np.float64))
    x64 = np.asarray(x, np.float64)
    gx_tol = 4 * _f32_dot_tol(ct, np.asarray(w).T)
    gw_tol = 4 * _f32_dot_tol(np.swapaxes(x64, 1, 2), ct)
    assert (np.abs(gx - jnp.stack([g[0] for g in g_eager])) <= gx_tol).all()
    assert (np.abs(gw - jnp.stack([g[1] for g in g_eager])) <= gw_tol).all()


def test_einsum_with_batch_axes_uses_per_batch_factors():
    # Attention-like scores q.k: both operands activations with a batch axis;
    # lhs amber reads k's norms per batch element and feature.
    q, k = normal(13, (2, 8, 16)), normal(14, (2, 6, 16)) * jnp.array([[[1.0]], [[5.0]]])
    k = k.at[1, :, 3].mul(9.0)
    sp = jaxmx.NMSparsity(2, 4, score="amber")
    cfg = jaxmx.DotConfig(lhs_sparsity=sp)
    got = jaxmx.einsum("bqd,bkd->bqk", q, k, config=cfg)
    want = jnp.stack(
        [jaxmx.sparsify(q[b], sp, axis=1, other=k[b], other_axis=1) @ k[b].T for b in range(2)]
    )
    np.testing.assert_allclose(got, want, atol=_f32_dot_tol(q[0], k[0].T).max() * 2)
    assert_differs(got, jnp.einsum("bqd,bkd->bqk", q, k))


def test_intercept_rule_makes_some_layers_sparse():
    sparse = jaxmx.preset("mxfp8").replace(lhs_sparsity=jaxmx.NMSparsity(2, 4))
    dense = jaxmx.preset("mxfp8")

    def f(p, x):
        with jax.named_scope("mlp"):
            h = jax.nn.relu(x @ p["up"])
        with jax.named_scope("out"):
            return h @ p["down"]

    p = {"up": normal(15, (32, 64)), "down": normal(16, (64, 16))}
    x = normal(17, (8, 32))
    mx = jaxmx.intercept(f, [("mlp", sparse), (".*", dense)])
    y = mx(p, x)
    sites = mx.coverage.sites
    assert [s.config for s in sites] == [sparse, dense]
    assert sites[0].reason.endswith("lhs 2:4 magnitude") and "2:4" not in sites[1].reason
    h = jax.nn.relu(jaxmx.dot_general(x, p["up"], NN, config=sparse))
    np.testing.assert_array_equal(y, jaxmx.dot_general(h, p["down"], NN, config=dense))
    assert_differs(y, jaxmx.intercept(f, dense)(p, x))
    # The weight on the left: the sparsity moves with the roles.
    g = jaxmx.intercept(lambda p, x: p["w"] @ x, sparse, weights="w")
    site = g.coverage_for({"w": normal(18, (16, 32))}, normal(19, (32, 4))).sites[0]
    assert site.config.rhs_sparsity == sparse.lhs_sparsity and site.config.lhs_sparsity is None


def test_activation_sparsity_with_a_prequantized_weight():
    # Serving: the weight is an MXTensor (its codes used as they are); the
    # amber score reads its decoded values.
    x, w = normal(20, (8, 64)), normal(21, (64, 16)) * jnp.linspace(0.2, 4.0, 64)[:, None]
    t = jaxmx.quantize(w, "mxfp4", axis=0)
    sp = jaxmx.NMSparsity(2, 4, score="amber")
    cfg = jaxmx.DotConfig(lhs="mxfp8_e4m3", lhs_sparsity=sp)
    y = np.asarray(jaxmx.dot_general(x, t, NN, config=cfg), np.float64)
    wq = jaxmx.dequantize(t, jnp.float32)
    xs = jaxmx.sparsify(x, sp, axis=1, other=wq, other_axis=0)
    q = jaxmx.fake_quantize(xs, "mxfp8_e4m3", axis=1)
    ref = np.asarray(q, np.float64) @ np.asarray(wq, np.float64)
    assert (np.abs(y - ref) <= _f32_dot_tol(q, wq)).all()
    assert_differs(xs, jaxmx.sparsify(x, jaxmx.NMSparsity(2, 4), axis=1))


@pytest.mark.parametrize("residuals", ["high_precision", "quantized"])
def test_fsdp_sharded_weight_gets_the_same_masks(residuals):
    # The weight sharded over 8 devices (gathered as MX codes): the masks,
    # chosen from the global arrays, and so the step, are the unsharded ones.
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    x, w, g = normal(22, (16, 512)), normal(23, (512, 256)), normal(24, (16, 256))
    cfg = jaxmx.preset("mxfp8", residuals=residuals).replace(
        lhs_sparsity=jaxmx.NMSparsity(2, 4, score="amber"),
        rhs_sparsity=jaxmx.NMSparsity(8, 16, score="wanda"),
    )

    def step(cfg):
        def f(x, w, g):
            y, pull = jax.vjp(lambda a, b: jaxmx.dot_general(a, b, NN, config=cfg), x, w)
            return (y, *pull(g))

        return jax.jit(f)

    want = step(cfg)(x, w, g)
    args = [
        jax.device_put(x, NamedSharding(mesh, P("data"))),
        jax.device_put(w, jaxmx.fsdp_shardings(w, mesh)),
        jax.device_put(g, NamedSharding(mesh, P("data"))),
    ]
    with jax.set_mesh(mesh):
        got = step(cfg.replace(fsdp="data"))(*args)
    # Same masks and quantizations; sums may run in other orders across
    # shards: two float32 accumulations, each within the gamma_K bound.
    for a, b, (u, v) in zip(got, want, [(x, w), (g, w.T), (x.T, g)], strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=2 * _f32_dot_tol(u, v).max())
        np.testing.assert_array_equal(np.asarray(a) == 0, np.asarray(b) == 0)
