"""The quantized dot_general against a float64 NumPy model of the MX recipe.

The model quantizes each operand of each of the three matmuls explicitly
(with tests/reference.py, which shares no code with jaxmx), along the axis
that matmul contracts, and multiplies in float64. jaxmx accumulates in
float32, so the tolerance is float32 accumulation error, far below any MX
quantization error: a wrong axis or a skipped quantization fails.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmx
from tests import reference
from tests._params import covering

FORMATS = reference.OCP_FORMATS

# name: lhs shape, rhs shape, dimension numbers, and the einsums + axes of the
# recipe: forward (lhs axis, rhs axis), dgrad (g axis, rhs axis), wgrad (lhs
# axis, g axis).
CASES = {
    "2d": dict(
        lhs=(16, 40),
        rhs=(40, 24),
        dn=(((1,), (0,)), ((), ())),
        fwd=("mk,kn->mn", 1, 0),
        dgrad=("mn,kn->mk", 1, 1),
        wgrad=("mk,mn->kn", 0, 0),
    ),
    "3d_bsk_nk": dict(
        lhs=(2, 12, 64),
        rhs=(24, 64),
        dn=(((2,), (1,)), ((), ())),
        fwd=("bsk,nk->bsn", 2, 1),
        dgrad=("bsn,nk->bsk", 2, 0),
        wgrad=("bsk,bsn->nk", 1, 1),
    ),
    "batched": dict(
        lhs=(3, 8, 48),
        rhs=(3, 48, 16),
        dn=(((2,), (1,)), ((0,), (0,))),
        fwd=("bmk,bkn->bmn", 2, 1),
        dgrad=("bmn,bkn->bmk", 2, 2),
        wgrad=("bmk,bmn->bkn", 1, 1),
    ),
}


def _data(case, seed=0):
    rng = np.random.default_rng(seed)
    c = CASES[case]
    lhs = rng.standard_normal(c["lhs"]).astype(np.float32)
    rhs = (rng.standard_normal(c["rhs"]) * 0.1).astype(np.float32)
    out_shape = jax.eval_shape(lambda a, b: jax.lax.dot_general(a, b, c["dn"]), lhs, rhs).shape
    g = rng.standard_normal(out_shape).astype(np.float32)
    return lhs, rhs, g


def _q(x, fmt, axis, bs, rounding="nearest_even"):
    if fmt is None:
        return np.asarray(x, np.float64)
    return reference.fake_quantize(x, fmt, axis=axis, block_size=bs, rounding=rounding)[0].astype(
        np.float64
    )


def _model(case, lhs, rhs, g, cfg: jaxmx.DotConfig, bs=None):
    """Float64 model of forward, d_lhs, d_rhs, and elementwise error bounds."""
    c = CASES[case]
    r = cfg.role

    def bs_of(fmt):
        return bs or (fmt.block_size if fmt else 32)

    out = []
    for (eq, ax_a, ax_b), (a, fa), (b, fb) in (
        (c["fwd"], (lhs, r("lhs")), (rhs, r("rhs"))),
        (c["dgrad"], (g, r("grad")), (rhs, r("rhs_bwd"))),
        (c["wgrad"], (lhs, r("lhs_bwd")), (g, r("grad"))),
    ):
        qa, qb = _q(a, fa, ax_a, bs_of(fa)), _q(b, fb, ax_b, bs_of(fb))
        val = np.einsum(eq, qa, qb)
        bound = np.einsum(eq, np.abs(qa), np.abs(qb)) * 2.0**-20 + 1e-30
        out.append((val, bound))
    return out


def _run(case, lhs, rhs, g, cfg):
    dn = CASES[case]["dn"]
    y, vjp = jax.vjp(lambda a, b: jaxmx.dot_general(a, b, dn, config=cfg), lhs, rhs)
    return (y, *vjp(jnp.asarray(g)))


def _check(got, model):
    for name, x, (want, bound) in zip(("forward", "d_lhs", "d_rhs"), got, model, strict=False):
        err = np.abs(np.asarray(x, np.float64) - want)
        assert np.all(err <= bound), f"{name}: max excess {np.max(err - bound)}"


@pytest.mark.parametrize(
    "case,fmt", covering([(c, f) for f in FORMATS for c in CASES], salt=1, every=3)
)
def test_forward_and_gradients_match_model(case, fmt):
    lhs, rhs, g = _data(case)
    cfg = jaxmx.DotConfig(lhs=fmt, rhs=fmt, grad=fmt)
    got = _run(case, lhs, rhs, g, cfg)
    _check(got, _model(case, lhs, rhs, g, cfg))
    # The quantization really happened (XLA could not elide it).
    exact = _run(case, lhs, rhs, g, jaxmx.DotConfig())
    for q, e in zip(got, exact, strict=True):
        assert not np.array_equal(np.asarray(q), np.asarray(e))


@pytest.mark.parametrize("case", list(CASES))
def test_mixed_recipe_block16_and_bwd_formats(case):
    lhs, rhs, g = _data(case, seed=1)
    cfg = jaxmx.DotConfig(
        lhs="mxfp6_e3m2",
        rhs="mxfp4",
        grad="mxfp8_e5m2",
        lhs_bwd="mxint8",
        rhs_bwd="mxfp8_e4m3",
        block_size=16,
    )
    _check(_run(case, lhs, rhs, g, cfg), _model(case, lhs, rhs, g, cfg, bs=16))


def test_all_none_is_exactly_lax_dot_general():
    for case in CASES:
        lhs, rhs, g = _data(case)
        got = _run(case, lhs, rhs, g, jaxmx.DotConfig())
        dn = CASES[case]["dn"]
        y, vjp = jax.vjp(lambda a, b, dn=dn: jax.lax.dot_general(a, b, dn), lhs, rhs)
        for a, b in zip(got, (y, *vjp(jnp.asarray(g))), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("role", ["lhs", "rhs", "grad", "lhs_bwd", "rhs_bwd"])
def test_each_quantization_affects_what_it_should(role):
    """Each role changes exactly the matmuls it takes part in."""
    case = "3d_bsk_nk"
    lhs, rhs, g = _data(case)
    cfg = jaxmx.DotConfig(lhs_bwd=None, rhs_bwd=None).replace(**{role: "mxfp4"})
    got = _run(case, lhs, rhs, g, cfg)
    exact = _run(case, lhs, rhs, g, jaxmx.DotConfig())
    affects = {
        "lhs": (True, False, False),
        "rhs": (True, False, False),
        "grad": (False, True, True),
        "lhs_bwd": (False, False, True),
        "rhs_bwd": (False, True, False),
    }[role]
    for q, e, changed in zip(got, exact, affects, strict=True):
        # Unchanged matmuls agree to float32 rounding; quantized ones far beyond it.
        rel = np.max(np.abs(np.asarray(q) - np.asarray(e))) / np.max(np.abs(np.asarray(e)))
        assert (rel > 1e-3) if changed else (rel < 1e-6), (role, rel)
    _check(got, _model(case, lhs, rhs, g, cfg))


def test_quantization_error_has_the_format_size():
    """The forward error shrinks with the element's mantissa, as it must."""
    lhs, rhs, g = _data("2d")
    exact = np.asarray(lhs, np.float64) @ np.asarray(rhs, np.float64)
    errs = {}
    for fmt in ("mxint8", "mxfp8_e4m3", "mxfp6_e2m3", "mxfp4_e2m1"):
        y = _run("2d", lhs, rhs, g, jaxmx.DotConfig(lhs=fmt, rhs=fmt))[0]
        errs[fmt] = np.sqrt(np.mean((np.asarray(y) - exact) ** 2) / np.mean(exact**2))
        m = jaxmx.get_format(fmt).element.mantissa_bits
        # Each operand carries relative noise of order 2^-(m+1); never zero.
        assert 2.0 ** -(m + 4) < errs[fmt] < 2.0 ** -(m - 1), (fmt, errs[fmt])
    # 6 mantissa bits < 3 (E4M3 and E2M3; under the floor rule E4M3 clips more
    # block maxima, so it is not better than E2M3) < 1.
    three = (errs["mxfp8_e4m3"], errs["mxfp6_e2m3"])
    assert errs["mxint8"] < min(three) and max(three) < errs["mxfp4_e2m1"]


def test_quantized_residuals():
    """residuals='quantized' saves the forward MX copies; backward requantizes them."""
    case = "3d_bsk_nk"
    lhs, rhs, g = _data(case)
    cfg = jaxmx.preset("mxfp6", residuals="quantized")
    got = _run(case, lhs, rhs, g, cfg)
    # Model: backward operands are the forward copies, quantized a second time.
    lq = _q(lhs, cfg.lhs, 2, 32).astype(np.float32)
    rq = _q(rhs, cfg.rhs, 1, 32).astype(np.float32)
    model = _model(case, lhs, rhs, g, cfg)
    model_q = _model(case, lq, rq, g, cfg)
    _check(got, [model[0], model_q[1], model_q[2]])
    hp = _run(case, lhs, rhs, g, jaxmx.preset("mxfp6"))
    assert not np.array_equal(np.asarray(got[2]), np.asarray(hp[2]))


def test_outer_product_uses_one_element_blocks():
    """No contraction axis: each element is its own block, never left unquantized."""
    x = jnp.array([0.3, 1.7, -5.1], jnp.float32)
    w = jnp.array([2.9, -0.7], jnp.float32)
    y = jaxmx.dot_general(x, w, (((), ()), ((), ())), config=jaxmx.preset("mxfp4"))
    qx = jaxmx.fake_quantize(x[:, None], "mxfp4", block_size=1)[:, 0]
    qw = jaxmx.fake_quantize(w[:, None], "mxfp4", block_size=1)[:, 0]
    np.testing.assert_array_equal(np.asarray(y), np.outer(qx, qw))
    assert not np.array_equal(np.asarray(y), np.outer(x, w))


def test_bf16_operands_and_output_dtype():
    lhs, rhs, g = _data("2d")
    a, b = jnp.asarray(lhs, jnp.bfloat16), jnp.asarray(rhs, jnp.bfloat16)
    cfg = jaxmx.preset("mxfp8")
    y, vjp = jax.vjp(lambda a, b: jaxmx.dot_general(a, b, CASES["2d"]["dn"], config=cfg), a, b)
    da, db = vjp(jnp.asarray(g, jnp.bfloat16))
    assert (y.dtype, da.dtype, db.dtype) == (jnp.bfloat16,) * 3
    y32 = jaxmx.dot_general(a, b, CASES["2d"]["dn"], config=cfg, preferred_element_type=jnp.float32)
    assert y32.dtype == jnp.float32
    for dt in ("bfloat16", "float32"):
        yc = jaxmx.dot_general(lhs, rhs, CASES["2d"]["dn"], config=cfg.replace(compute_dtype=dt))
        _check((yc,), _model("2d", lhs, rhs, g, cfg)[:1])


@pytest.mark.parametrize("fmt", ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp4_e2m1"])
def test_native_scaled_dot_agrees_with_emulation(fmt):
    """lax.scaled_dot (a reference decomposition on CPU) as a cross-check."""
    case = "3d_bsk_nk"
    lhs, rhs, g = _data(case)
    cfg = jaxmx.DotConfig(lhs=fmt, rhs=fmt, grad=fmt, block_size=4)  # S=12 holds whole blocks
    model = _model(case, lhs, rhs, g, cfg, bs=4)
    # Both paths against the same quantized float64 model, to float32 accumulation.
    _check(_run(case, lhs, rhs, g, cfg.replace(implementation="xla")), model)
    _check(_run(case, lhs, rhs, g, cfg.replace(implementation="native")), model)


def test_native_always_explains_what_does_not_fit():
    x, w = jnp.ones((4, 64)), jnp.ones((64, 8))
    cfg = jaxmx.preset("mxfp6", implementation="native")
    with pytest.raises(ValueError, match="mxfp6_e3m2 has no native block-scaled matmul"):
        jaxmx.dot_general(x, w, (((1,), (0,)), ((), ())), config=cfg)
    cfg = jaxmx.preset("mxfp8", implementation="native")
    with pytest.raises(ValueError, match="contraction length 40 is not a multiple"):
        jaxmx.dot_general(
            jnp.ones((4, 40)), jnp.ones((40, 8)), (((1,), (0,)), ((), ())), config=cfg
        )
    assert not jaxmx.native.has_native_mx()  # this CPU: auto means emulate


def test_stochastic_gradient_rounding_is_unbiased():
    """E over keys of dX = g . Q(W): the rounding noise of dY averages out.

    With rceil scales nothing is clipped, so rounding is the only error (the
    floor rule saturates some block maxima, a bias no rounding removes).
    """
    case = "2d"
    lhs, rhs, g = _data(case)
    cfg = jaxmx.DotConfig(
        rhs_bwd="mxfp8_e4m3", grad="mxfp4", grad_rounding="stochastic", rhs=None, scale_mode="rceil"
    )
    dn = CASES[case]["dn"]

    def dx(key):
        _, vjp = jax.vjp(lambda a: jaxmx.dot_general(a, rhs, dn, config=cfg, key=key), lhs)
        return vjp(jnp.asarray(g))[0]

    draws = np.asarray(jax.vmap(dx)(jax.random.split(jax.random.key(0), 400)), np.float64)
    wq = reference.fake_quantize(rhs, "mxfp8_e4m3", axis=1, scale_mode="rceil")[0]
    want = np.asarray(g, np.float64) @ wq.astype(np.float64).T
    stderr = draws.std(0) / np.sqrt(len(draws)) + 1e-6
    assert np.all(np.abs(draws.mean(0) - want) < 5 * stderr)
    nearest = np.asarray(
        jax.vjp(
            lambda a: jaxmx.dot_general(a, rhs, dn, config=cfg.replace(grad_rounding=None)), lhs
        )[1](jnp.asarray(g))[0]
    )
    assert np.abs(draws.mean(0) - want).mean() < np.abs(nearest - want).mean() / 3
    # Without a key the bits come from a hash of dY: deterministic, still stochastic rounding.
    a = dx(None)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(dx(None)))
    assert not np.array_equal(np.asarray(a), nearest)


def test_under_jit_vmap_and_scan():
    case = "2d"
    lhs, rhs, g = _data(case)
    cfg = jaxmx.preset("mxfp8")
    dn = CASES[case]["dn"]
    f = lambda a: jaxmx.dot_general(a, rhs, dn, config=cfg)  # noqa: E731
    want = f(lhs)
    np.testing.assert_array_equal(np.asarray(jax.jit(f)(lhs)), np.asarray(want))
    model = _model(case, lhs, rhs, g, cfg)[:1]  # forward only
    rows = jax.vmap(lambda r: jaxmx.dot_general(r, rhs, (((0,), (0,)), ((), ())), config=cfg))(
        jnp.asarray(lhs)
    )
    _check((rows,), model)
    _, ys = jax.lax.scan(lambda c, a: (c, f(a[None])[0]), 0, jnp.asarray(lhs))
    _check((ys,), model)


def test_flax_keyword_arguments_and_errors():
    x, w = jnp.ones((2, 32)), jnp.ones((32, 4))
    dn = (((1,), (0,)), ((), ()))
    y = jaxmx.dot_general(
        x,
        w,
        dn,
        precision=jax.lax.Precision.HIGHEST,
        config="mxfp8",
        out_sharding=None,
        preferred_element_type=jnp.float32,
    )
    assert y.shape == (2, 4)
    with pytest.raises(TypeError, match="config must be a DotConfig"):
        jaxmx.dot_general(x, w, dn, config=3)
    with pytest.raises(ValueError, match="unknown config 'mxfp5'"):
        jaxmx.dot_general(x, w, dn, config="mxfp5")
    with pytest.raises(TypeError, match="lhs has dtype int32"):
        jaxmx.dot_general(jnp.ones((2, 32), jnp.int32), w, dn, config="mxfp8")
    # lax's own error, word for word.
    with pytest.raises(TypeError, match=r"same shape, got \(32,\) and \(16,\)"):
        jaxmx.dot_general(x, jnp.ones((16, 4)), dn, config="mxfp8")
    with pytest.raises(ValueError, match="DotConfig.rhs: unknown format 'fp8'"):
        jaxmx.DotConfig(rhs="fp8")
    with pytest.raises(ValueError, match="unknown grad_rounding 'sr'"):
        jaxmx.DotConfig(grad_rounding="sr")
