"""einsum and conv_general_dilated against explicitly quantized references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxmx
from tests import reference


def _q(x, fmt, axis, bs=32):
    return reference.fake_quantize(np.asarray(x), fmt, axis=axis, block_size=bs)[0]


def _rng(seed=0):
    return np.random.default_rng(seed)


def _close(got, want, bound):
    """Equal up to float32 accumulation: ``bound`` is the same product of the
    operands' absolute values (sum |a_i b_i|), scaled by 2^-20, elementwise."""
    err = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    assert np.all(err <= np.asarray(bound, np.float64) * 2.0**-20 + 1e-30), np.max(err)


# --------------------------------------------------------------------------- einsum


def test_einsum_matches_dot_general_bitwise():
    rng = _rng()
    x = rng.standard_normal((2, 12, 64)).astype(np.float32)
    w = rng.standard_normal((24, 64)).astype(np.float32)
    cfg = jaxmx.preset("mxfp6")
    e = jaxmx.einsum("bsk,nk->bsn", x, w, config=cfg)
    d = jaxmx.dot_general(x, w, (((2,), (1,)), ((), ())), config=cfg)
    np.testing.assert_array_equal(np.asarray(e), np.asarray(d))
    assert not np.allclose(np.asarray(e), np.einsum("bsk,nk->bsn", x, w), rtol=1e-3)
    ge = jax.grad(
        lambda a, b: (jaxmx.einsum("bsk,nk->bsn", a, b, config=cfg) ** 2).sum(), argnums=(0, 1)
    )(x, w)
    gd = jax.grad(
        lambda a, b: (jaxmx.dot_general(a, b, (((2,), (1,)), ((), ())), config=cfg) ** 2).sum(),
        argnums=(0, 1),
    )(x, w)
    for a, b in zip(ge, gd, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("fmt", ["mxfp8_e4m3", "mxfp4_e2m1", "mxint8"])
def test_attention_einsums(fmt):
    """q.k contracts the head dim d; p.v contracts the key axis k."""
    rng = _rng(1)
    q = rng.standard_normal((2, 5, 4, 32)).astype(np.float32)
    k = rng.standard_normal((2, 7, 4, 32)).astype(np.float32)
    cfg = jaxmx.DotConfig(lhs=fmt, rhs=fmt)
    s = jaxmx.einsum("...qhd,...khd->...hqk", q, k, config=cfg)
    qq, qk = _q(q, fmt, 3), _q(k, fmt, 3)
    want = np.einsum("bqhd,bkhd->bhqk", qq, qk)
    _close(s, want, np.einsum("bqhd,bkhd->bhqk", np.abs(qq), np.abs(qk)))
    assert not np.allclose(np.asarray(s), np.einsum("bqhd,bkhd->bhqk", q, k), rtol=1e-3)
    p = jax.nn.softmax(s, axis=-1)
    v = rng.standard_normal((2, 7, 4, 32)).astype(np.float32)
    o = jaxmx.einsum("...hqk,...khd->...qhd", p, v, config=cfg.replace(block_size=7))
    qp, qv = _q(p, fmt, 3, 7), _q(v, fmt, 1, 7)
    want = np.einsum("bhqk,bkhd->bqhd", qp, qv)
    _close(o, want, np.einsum("bhqk,bkhd->bqhd", np.abs(qp), np.abs(qv)))


def test_einsum_gradients_follow_the_recipe():
    """'bhqk,bhkd->bhqd': dgrad contracts d, wgrad contracts q."""
    rng = _rng(2)
    p = rng.standard_normal((2, 3, 8, 16)).astype(np.float32)
    v = rng.standard_normal((2, 3, 16, 8)).astype(np.float32)
    g = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    cfg = jaxmx.DotConfig(lhs="mxfp4", rhs="mxfp4", grad="mxfp4", block_size=8)
    _, vjp = jax.vjp(lambda a, b: jaxmx.einsum("bhqk,bhkd->bhqd", a, b, config=cfg), p, v)
    dp, dv = vjp(jnp.asarray(g))
    f = "mxfp4"
    ga, va = _q(g, f, 3, 8), _q(v, f, 3, 8)
    pb, gb = _q(p, f, 2, 8), _q(g, f, 2, 8)
    _close(dp, np.einsum("bhqd,bhkd->bhqk", ga, va), np.einsum("bhqd,bhkd->bhqk", abs(ga), abs(va)))
    _close(dv, np.einsum("bhqk,bhqd->bhkd", pb, gb), np.einsum("bhqk,bhqd->bhkd", abs(pb), abs(gb)))


def test_einsum_subscript_forms_and_errors():
    rng = _rng(3)
    a = rng.standard_normal((4, 32)).astype(np.float32)
    b = rng.standard_normal((32, 5)).astype(np.float32)
    cfg = jaxmx.preset("mxfp8")
    explicit = jaxmx.einsum("ik,kj->ij", a, b, config=cfg)
    np.testing.assert_array_equal(
        np.asarray(jaxmx.einsum("ik,kj", a, b, config=cfg)), np.asarray(explicit)
    )
    np.testing.assert_array_equal(
        np.asarray(jaxmx.einsum("ik,kj->ji", a, b, config=cfg)), np.asarray(explicit).T
    )
    # A label only in one operand and not in the output is summed first.
    c = rng.standard_normal((3, 4, 32)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(jaxmx.einsum("zik,kj->ij", c, b, config=cfg)),
        np.asarray(jaxmx.einsum("ik,kj->ij", c.sum(0), b, config=cfg)),
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="exactly two operands"):
        jaxmx.einsum("ij,jk,kl->il", a, b, config=cfg)
    with pytest.raises(ValueError, match="repeated within one term"):
        jaxmx.einsum("ii,ij->ij", a[:, :4], b[:4], config=cfg)
    with pytest.raises(ValueError, match="does not broadcast"):
        jaxmx.einsum("ik,kj->ij", a, b[:16], config=cfg)
    with pytest.raises(ValueError, match="does not match rank"):
        jaxmx.einsum("ijk,kj->ij", a, b, config=cfg)


# --------------------------------------------------------------------------- conv


def _conv(x, w, dn=("NHWC", "HWIO", "NHWC"), groups=1, strides=(1, 1), padding="SAME"):
    return lax.conv_general_dilated(
        jnp.asarray(x, jnp.float32),
        jnp.asarray(w, jnp.float32),
        strides,
        padding,
        dimension_numbers=dn,
        feature_group_count=groups,
        precision=lax.Precision.HIGHEST,
    )


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("fmt", ["mxfp8_e4m3", "mxfp4_e2m1"])
def test_conv_forward_and_gradients(fmt, groups):
    rng = _rng(4)
    x = rng.standard_normal((8, 6, 6, 64)).astype(np.float32)  # N H W C
    w = (rng.standard_normal((3, 3, 64 // groups, 32)) * 0.1).astype(np.float32)  # H W I O
    g = rng.standard_normal((8, 6, 6, 32)).astype(np.float32)
    bs = 8
    cfg = jaxmx.DotConfig(lhs=fmt, rhs=fmt, grad=fmt, block_size=bs)

    def f(a, b):
        return jaxmx.conv_general_dilated(
            a,
            b,
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups,
            config=cfg,
        )

    y, vjp = jax.vjp(f, x, w)
    dx, dw = vjp(jnp.asarray(g))

    # Blocks within a group: quantize each group's channels separately.
    def q_grouped(a, axis):
        parts = np.split(np.asarray(a), groups, axis=axis)
        return np.concatenate([_q(p, fmt, axis, bs) for p in parts], axis=axis)

    xq, wq = q_grouped(x, 3), _q(w, fmt, 2, bs)
    want_y = _conv(xq, wq, groups=groups)
    _close(y, want_y, _conv(abs(xq), abs(wq), groups=groups))
    # dgrad: Q(g along its features) with Q(w along O); JAX's transpose of the conv.
    gq, wq = q_grouped(g, 3), q_grouped(w, 3)

    def dgrad(gv, wv):
        return jax.vjp(lambda a: _conv(a, wv, groups=groups), x)[1](jnp.asarray(gv))[0]

    _close(dx, dgrad(gq, wq), dgrad(abs(gq), abs(wq)))
    # wgrad: input and g both along the batch axis N.
    xq, gq = _q(x, fmt, 0, bs), _q(g, fmt, 0, bs)

    def wgrad(xv, gv):
        return jax.vjp(lambda b: _conv(xv, b, groups=groups), w)[1](jnp.asarray(gv))[0]

    _close(dw, wgrad(xq, gq), wgrad(abs(xq), abs(gq)))
    # ...and it is not the unquantized convolution.
    assert not np.allclose(np.asarray(y), np.asarray(_conv(x, w, groups=groups)), atol=1e-4)


def test_conv_nchw_and_flax_style_call():
    rng = _rng(5)
    x = rng.standard_normal((2, 32, 5, 5)).astype(np.float32)  # N C H W
    w = rng.standard_normal((16, 32, 3, 3)).astype(np.float32)  # O I H W
    cfg = jaxmx.preset("mxfp8")
    y = jaxmx.conv_general_dilated(
        x,
        w,
        (2, 2),
        [(1, 1), (1, 1)],
        lhs_dilation=(1, 1),
        rhs_dilation=(1, 1),
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
        feature_group_count=1,
        precision=None,
        config=cfg,
    )
    xq, wq = _q(x, "mxfp8", 1), _q(w, "mxfp8", 1)
    conv = functools.partial(
        _conv, dn=("NCHW", "OIHW", "NCHW"), strides=(2, 2), padding=[(1, 1), (1, 1)]
    )
    _close(y, conv(xq, wq), conv(abs(xq), abs(wq)))
    assert not np.allclose(np.asarray(y), np.asarray(conv(x, w)), rtol=1e-3)
    fp = jaxmx.conv_general_dilated(
        x, w, (2, 2), [(1, 1), (1, 1)], dimension_numbers=("NCHW", "OIHW", "NCHW"), config="fp32"
    )
    np.testing.assert_array_equal(
        np.asarray(fp),
        np.asarray(
            lax.conv_general_dilated(
                x, w, (2, 2), [(1, 1), (1, 1)], dimension_numbers=("NCHW", "OIHW", "NCHW")
            )
        ),
    )
    with pytest.raises(ValueError, match="batch_group_count=1 only"):
        jaxmx.conv_general_dilated(
            x,
            w,
            (1, 1),
            "SAME",
            batch_group_count=2,
            dimension_numbers=("NCHW", "OIHW", "NCHW"),
            config=cfg,
        )
