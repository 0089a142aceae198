"""MXTensor operands in dot_general, einsum and conv_general_dilated.

A pre-quantized operand is used as it is (decoded, never quantized again);
the other operand follows the config. Every result is checked against the
same op on the dequantized operand with that side left in high precision.
Sums may run in another order, so results agree to the float32 accumulation
bound 2 (K - 1) 2^-24 sum |a b| rather than bit for bit.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxmx
from tests._params import covering

DIMS = (((1,), (0,)), ((), ()))


def _close(got, want, a, b, dims):
    """Within twice the float32 accumulation bound of one sum order."""
    k = np.prod([a.shape[i] for i in dims[0][0]])
    bound = lax.dot_general(jnp.abs(a), jnp.abs(b), dims) * (2 * max(k - 1, 1) * 2.0**-24)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert np.all(np.abs(np.asarray(got) - np.asarray(want)) <= np.asarray(bound))


def _normal(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize(
    "fmt,packed",
    covering([(f, p) for f in jaxmx.list_formats() for p in (False, True)], every=3, salt=1),
)
def test_mx_weight_is_used_as_it_is(fmt, packed):
    x, w = _normal(0, (4, 96)), _normal(1, (96, 8))
    tw = jaxmx.quantize(w, fmt, axis=0, packed=packed)
    w_hat = jaxmx.dequantize(tw)
    assert not np.array_equal(np.asarray(w_hat), np.asarray(w))  # quantization did something
    got = jaxmx.dot_general(x, tw, DIMS, config="mxfp8")
    x_hat = jaxmx.fake_quantize(x, "mxfp8", axis=1)
    _close(got, lax.dot_general(x_hat, w_hat, DIMS), x_hat, w_hat, DIMS)
    # Quantizing the weight again would round it to MXFP8 and change the result
    # for the formats MXFP8 cannot hold exactly; the pre-quantized path must not.
    cfg_only_x = jaxmx.DotConfig(lhs="mxfp8")
    _close(got, jaxmx.dot_general(x, w_hat, DIMS, config=cfg_only_x), x_hat, w_hat, DIMS)


def test_mx_lhs_and_both_sides():
    x, w = _normal(2, (6, 64)), _normal(3, (64, 5))
    tx = jaxmx.quantize(x, "mxint8", axis=1)
    tw = jaxmx.quantize(w, "mxfp6_e3m2", axis=0)
    x_hat, w_hat = jaxmx.dequantize(tx), jaxmx.dequantize(tw)
    got = jaxmx.dot_general(tx, tw, DIMS, config="fp32")  # no other quantization at all
    _close(got, lax.dot_general(x_hat, w_hat, DIMS), x_hat, w_hat, DIMS)
    got = jaxmx.dot_general(tx, w, DIMS, config="mxfp4")
    w_q = jaxmx.fake_quantize(w, "mxfp4", axis=0)
    _close(got, lax.dot_general(x_hat, w_q, DIMS), x_hat, w_q, DIMS)


def test_batched_and_multi_axis_contractions():
    q, k = _normal(4, (2, 5, 3, 64)), _normal(5, (2, 7, 3, 64))
    tk = jaxmx.quantize(k, "mxfp8", axis=-1)
    got = jaxmx.einsum("bqhd,bkhd->bhqk", q, tk, config="mxfp8")
    q_hat, k_hat = jaxmx.fake_quantize(q, "mxfp8", axis=-1), jaxmx.dequantize(tk)
    dims = (((3,), (3,)), ((0, 2), (0, 2)))  # the same product, result (b, h, q, k)
    _close(got, lax.dot_general(q_hat, k_hat, dims), q_hat, k_hat, dims)
    # Contracting two axes: blocks may run along either of them.
    x, w = _normal(6, (4, 3, 32)), _normal(7, (3, 32, 6))
    dims2 = (((1, 2), (0, 1)), ((), ()))
    for axis in (0, 1):
        tw = jaxmx.quantize(w, "mxfp4", axis=axis)
        got = jaxmx.dot_general(x, tw, dims2, config="fp32")
        w_hat = jaxmx.dequantize(tw)
        _close(got, lax.dot_general(x, w_hat, dims2), x, w_hat, dims2)


def test_blocked_along_the_wrong_axis_is_an_error():
    x, w = _normal(8, (4, 64)), _normal(9, (64, 64))
    tw = jaxmx.quantize(w, "mxfp8", axis=1)
    with pytest.raises(
        ValueError, match=r"rhs is an MXTensor blocked along axis 1.*contracts its axes \(0,\)"
    ):
        jaxmx.dot_general(x, tw, DIMS, config="mxfp8")
    with pytest.raises(ValueError, match="blocked along axis 1"):
        jaxmx.einsum("ij,jk->ik", x, tw, config="mxfp8")
    with pytest.raises(ValueError, match="summed out before the matmul"):
        jaxmx.einsum("ij,jk->i", x, jaxmx.quantize(w, "mxfp8", axis=0), config="mxfp8")


def test_gradient_flows_to_the_array_side_only():
    x, w = _normal(10, (8, 64)), _normal(11, (64, 32))
    ct = _normal(12, (8, 32))  # a fixed cotangent: both paths see the same dY
    tw = jaxmx.quantize(w, "mxfp4", axis=0, packed=True)
    w_hat = jaxmx.dequantize(tw)
    cfg = jaxmx.preset("mxfp8")

    def loss(x, w, cfg=cfg):
        return (jaxmx.dot_general(x, w, DIMS, config=cfg) * ct).sum()

    g_mx = jax.jit(jax.grad(loss))(x, tw)
    # The recipe on the decoded weight, whose forward format is the tensor's
    # (MXFP4): rhs_bwd=FORWARD re-quantizes it to MXFP4 along N for dgrad.
    g_ref = jax.jit(jax.grad(functools.partial(loss, cfg=cfg.replace(rhs="mxfp4"))))(x, w_hat)
    # dgrad = Q(dY) . Q(W)^T: sums of 32 products of operands each at most
    # twice the unquantized magnitude.
    bound = 4 * (2 * 31 * 2.0**-24) * (jnp.abs(ct) @ jnp.abs(w_hat).T)
    assert np.all(np.abs(np.asarray(g_mx - g_ref)) <= np.asarray(bound))
    # The weight gradient is not computed (and not asked for): codes are constants.
    g_hp = jax.grad(functools.partial(loss, cfg=cfg.replace(rhs=None, rhs_bwd=None)))(x, w)
    assert not np.allclose(g_mx, g_hp, rtol=0, atol=0)  # the MXFP4 weight mattered


def test_residuals_quantized_keeps_the_mx_operand():
    x, w = _normal(12, (8, 64)), _normal(13, (64, 16))
    tw = jaxmx.quantize(w, "mxfp8", axis=0)
    cfg = jaxmx.preset("mxfp8").replace(residuals="quantized")
    y, vjp = jax.vjp(lambda x: jaxmx.dot_general(x, tw, DIMS, config=cfg), x)
    (gx,) = vjp(jnp.ones_like(y))
    cfg2 = jaxmx.preset("mxfp8")
    y2, vjp2 = jax.vjp(lambda x: jaxmx.dot_general(x, tw, DIMS, config=cfg2), x)
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(gx, vjp2(jnp.ones_like(y2))[0])
    assert not np.array_equal(y, lax.dot_general(x, w, DIMS, precision=lax.Precision.HIGHEST))


def test_conv_with_an_mx_kernel():
    x = _normal(14, (2, 8, 8, 32))
    w = _normal(15, (3, 3, 32, 4)) / 8
    dn = ("NHWC", "HWIO", "NHWC")
    tw = jaxmx.quantize(w, "mxfp4", axis=2)  # I, the kernel's input features
    got = jaxmx.conv_general_dilated(x, tw, (1, 1), "SAME", dimension_numbers=dn, config="mxfp8")
    x_hat = jaxmx.fake_quantize(x, "mxfp8", axis=3)
    want = lax.conv_general_dilated(
        x_hat,
        jaxmx.dequantize(tw),
        (1, 1),
        "SAME",
        dimension_numbers=dn,
        precision=lax.Precision.HIGHEST,
    )
    k = 9 * 32
    bound = lax.conv_general_dilated(
        jnp.abs(x_hat),
        jnp.abs(jaxmx.dequantize(tw)),
        (1, 1),
        "SAME",
        dimension_numbers=dn,
        precision=lax.Precision.HIGHEST,
    ) * (2 * k * 2.0**-24)
    assert np.all(np.abs(np.asarray(got - want)) <= np.asarray(bound))
    g = jax.grad(
        lambda x: jaxmx.conv_general_dilated(
            x, tw, (1, 1), "SAME", dimension_numbers=dn, config="mxfp8"
        ).sum()
    )(x)
    assert g.shape == x.shape and bool(jnp.all(jnp.isfinite(g)))
    with pytest.raises(ValueError, match="kernel input-feature axis I"):
        jaxmx.conv_general_dilated(
            x,
            jaxmx.quantize(w, "mxfp4", axis=3),
            (1, 1),
            "SAME",
            dimension_numbers=dn,
            config="mxfp8",
        )


def test_under_jit_and_vmap():
    x, w = _normal(16, (3, 4, 64)), _normal(17, (64, 8))
    tw = jaxmx.quantize(w, "mxfp6_e2m3", axis=0)
    f = jax.jit(jax.vmap(lambda xi: jaxmx.dot_general(xi, tw, DIMS, config="mxfp8")))
    got = f(x)
    want = jnp.stack([jaxmx.dot_general(xi, tw, DIMS, config="mxfp8") for xi in x])
    # Same products, possibly summed in another order under vmap.
    x_hat, w_hat = jaxmx.fake_quantize(x, "mxfp8", axis=-1), jaxmx.dequantize(tw)
    _close(got, want, x_hat, w_hat, (((2,), (0,)), ((), ())))


@pytest.mark.parametrize("fmt,packed", [("mxfp8", False), ("mxfp4", True)])
def test_native_path_takes_the_codes_as_they_are(fmt, packed):
    # implementation="native" runs lax.scaled_dot (XLA emulates it on CPU): the
    # MXTensor's codes and scales go in directly.
    x, w = _normal(18, (4, 64)), _normal(19, (64, 8))
    tw = jaxmx.quantize(w, fmt, axis=0, packed=packed)
    native = jaxmx.preset(fmt, implementation="native")
    got = jaxmx.dot_general(x, tw, DIMS, config=native)
    want = jaxmx.dot_general(x, tw, DIMS, config=native.replace(implementation="xla"))
    x_hat, w_hat = jaxmx.fake_quantize(x, fmt, axis=1), jaxmx.dequantize(tw)
    _close(got, want, x_hat, w_hat, DIMS)
    assert not np.array_equal(want, lax.dot_general(x, w, DIMS, precision=lax.Precision.HIGHEST))
    with pytest.raises(ValueError, match="block sizes differ"):
        jaxmx.dot_general(x, jaxmx.quantize(w, fmt, axis=0, block_size=16), DIMS, config=native)
