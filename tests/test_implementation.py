"""``DotConfig(implementation=...)``: the same matmuls by emulation, lax.scaled_dot or Pallas.

``"native"`` runs each of the three matmuls of the training recipe through
``lax.scaled_dot``; on this CPU that is XLA's reference decomposition, so it
is compared here with the emulation (``"xla"``) within float32 accumulation
bounds, values and gradients. ``"pallas"`` quantizes the operands with the
fused kernels, in Pallas's interpreter here, and must give the emulation's
bits exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmx
from tests._arrays import pallas_calls

DIMS = (((1,), (0,)), ((), ()))
# Every contraction of the recipe whole blocks of 32: forward K=64, dgrad
# N=32, wgrad M=32.
M, K, N = 32, 64, 32


def _data(seed=0):
    kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (M, K))
    w = jax.random.normal(kw, (K, N)) * 0.1
    g = jax.random.normal(kg, (M, N))
    return x, w, g


def _run(cfg, x, w, g):
    y, vjp = jax.vjp(lambda a, b: jaxmx.dot_general(a, b, DIMS, config=cfg), x, w)
    return (y, *vjp(g))


def _bounds(fmt, x, w, g):
    """Float32 accumulation bound of each matmul on its quantized operands.

    Both paths multiply the same decoded values and sum in float32, in
    orders that may differ: each result is within ``(n + 2) * 2^-24`` of the
    sum of the magnitudes of its ``n`` products (``n`` roundings of the sum,
    and NVFP4's scale product rounded once more on each side).
    """

    def q(a, axis):
        return np.abs(np.asarray(jaxmx.fake_quantize(a, fmt, axis=axis), np.float64))

    u = 2.0**-24
    fwd = (K + 2) * u * (q(x, 1) @ q(w, 0))
    dgrad = (N + 2) * u * (q(g, 1) @ q(w, 1).T)
    wgrad = (M + 2) * u * (q(x, 0).T @ q(g, 0))
    return fwd, dgrad, wgrad


@pytest.mark.parametrize("fmt", ["mxfp8_e4m3", "mxfp4_e2m1", "nvfp4"])
def test_native_matches_emulation_forward_and_gradients(fmt):
    x, w, g = _data()
    cfg = jaxmx.DotConfig(lhs=fmt, rhs=fmt, grad=fmt)
    want = _run(cfg.replace(implementation="xla"), x, w, g)
    got = _run(cfg.replace(implementation="native"), x, w, g)
    bounds = _bounds(fmt, x, w, g)
    for name, a, b, bound in zip(("forward", "dgrad", "wgrad"), got, want, bounds, strict=True):
        err = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
        assert np.all(err <= bound), f"{name}: max excess {np.max(err - bound)}"
    # Quantization happened: far from the float32 product.
    assert np.max(np.abs(np.asarray(got[0]) - np.asarray(x @ w))) > 1e-3


def test_native_runs_all_three_matmuls_through_scaled_dot():
    x, w, g = _data()
    cfg = jaxmx.DotConfig(lhs="mxfp8", rhs="mxfp8", grad="mxfp8")

    def composites(c):
        text = jax.jit(lambda x, w: _run(c, x, w, g)).lower(x, w).as_text()
        return text.count('stablehlo.composite "xla.scaled_dot"')

    assert composites(cfg.replace(implementation="native")) == 3
    assert composites(cfg.replace(implementation="xla")) == 0
    assert composites(cfg) == 0  # the default on a CPU: emulation


def test_native_explains_which_matmul_does_not_fit():
    x = jnp.ones((8, 64))  # the weight gradient contracts M = 8, not whole blocks
    cfg = jaxmx.DotConfig(lhs="mxfp8", rhs="mxfp8", grad="mxfp8", implementation="native")
    y = jaxmx.dot_general(x, jnp.ones((64, 32)), DIMS, config=cfg)  # the forward fits
    assert y.shape == (8, 32)
    with pytest.raises(ValueError, match="wgrad: contraction length 8 is not a multiple"):
        jax.grad(lambda w: jaxmx.dot_general(x, w, DIMS, config=cfg).sum())(jnp.ones((64, 32)))
    tiles = jaxmx.preset("nvfp4", implementation="native")  # 16x16 weight tiles
    with pytest.raises(ValueError, match="2-D tiles"):
        jaxmx.dot_general(jnp.ones((32, 64)), jnp.ones((64, 32)), DIMS, config=tiles)


def test_implementation_is_checked():
    with pytest.raises(ValueError, match="unknown implementation 'triton'; allowed: None"):
        jaxmx.DotConfig(implementation="triton")
    lhs, rhs = jnp.ones((1, 4, 4, 32)), jnp.ones((3, 3, 32, 8))
    cfg = jaxmx.DotConfig(lhs="mxfp8", rhs="mxfp8", implementation="native")
    with pytest.raises(ValueError, match="no convolution; allowed for conv_general_dilated"):
        jaxmx.conv_general_dilated(
            lhs, rhs, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), config=cfg
        )


@pytest.mark.parametrize(
    "fmt,stochastic", [("mxfp8_e4m3", False), ("nvfp4", False), ("mxfp8_e4m3", True)]
)
def test_pallas_operands_give_the_emulations_bits(fmt, stochastic):
    x, w, g = _data(1)
    rounding = dict(rounding="stochastic", grad_rounding="stochastic") if stochastic else {}
    key = jax.random.key(5) if stochastic else None
    cfg = jaxmx.DotConfig(lhs=fmt, rhs=fmt, grad=fmt, implementation="xla", **rounding)

    def run(c, x, w):
        y, vjp = jax.vjp(lambda a, b: jaxmx.dot_general(a, b, DIMS, config=c, key=key), x, w)
        return (y, *vjp(g))

    want = run(cfg, x, w)
    pallas = cfg.replace(implementation="pallas")
    with jaxmx.pallas.interpret("mosaic_tpu"):
        got = run(pallas, x, w)
        jaxpr = jax.make_jaxpr(lambda x, w: run(pallas, x, w))(x, w)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.max(np.abs(np.asarray(got[0]) - np.asarray(x @ w))) > 1e-3
    # Each operand's forward and backward copies from one kernel; dY's two
    # copies (along N for dgrad, along M for wgrad) from one kernel each.
    names = sorted(e.params["name"] for e in pallas_calls(jaxpr.jaxpr))
    assert names == ["mx_fake_quantize"] * 2 + ["mx_quantize_rows_and_columns"] * 2


def test_pallas_on_cpu_says_what_runs():
    x, w, _ = _data()
    cfg = jaxmx.DotConfig(lhs="mxfp8", rhs="mxfp8", implementation="pallas")
    with pytest.raises(ValueError, match="no kernel for platform 'cpu'.*implementation='xla'"):
        jaxmx.dot_general(x, w, DIMS, config=cfg)
    mx9 = jaxmx.DotConfig(lhs="mx9", rhs="mx9", implementation="pallas")
    with jaxmx.pallas.interpret("mosaic_tpu"), pytest.raises(ValueError, match="family"):
        jaxmx.dot_general(jnp.ones((4, 64)), jnp.ones((64, 8)), DIMS, config=mx9)


@pytest.mark.parametrize("fmt", ["mxfp4_e2m1", "nvfp4"])
def test_pallas_serves_an_mx_weight_with_the_weight_only_kernel(fmt):
    flax = pytest.importorskip("flax.linen")
    model = flax.Dense(48)
    x = jax.random.normal(jax.random.key(2), (3, 64))
    dense = model.init(jax.random.key(3), x)
    params = jaxmx.quantize_params(dense, fmt)
    kernel = params["params"]["kernel"]
    assert isinstance(kernel, jaxmx.MXTensor) and kernel.packed
    serve = jaxmx.intercept(model.apply, jaxmx.DotConfig(implementation="pallas"))
    with jaxmx.pallas.interpret("mosaic_tpu"):
        jaxpr = jax.make_jaxpr(serve)(params, x)
        y = serve(params, x)
    assert len(list(pallas_calls(jaxpr.jaxpr))) == 1  # the weight-only kernel, nothing else
    # Against the decoded weight in float64, within float32 accumulation
    # (NVFP4's tensor scale is one more rounding).
    w = np.asarray(kernel.dequantize(), np.float64)
    xs = np.asarray(x, np.float64)
    want = xs @ w + np.asarray(params["params"]["bias"], np.float64)
    bound = (64 + 4) * 2.0**-24 * (np.abs(xs) @ np.abs(w) + np.abs(want))
    assert np.all(np.abs(np.asarray(y, np.float64) - want) <= bound)
    assert np.max(np.abs(np.asarray(y) - np.asarray(model.apply(dense, x)))) > 1e-3  # quantized


def test_pallas_with_nothing_to_quantize_is_the_plain_dot():
    # No format and no MXTensor operand: no kernel to run, so no custom_vjp
    # wrapped around lax.dot_general either.
    x = jax.random.normal(jax.random.key(4), (8, 64))
    w = jax.random.normal(jax.random.key(5), (64, 16))
    dims = (((1,), (0,)), ((), ()))
    cfg = jaxmx.DotConfig(implementation="pallas")
    jaxpr = jax.make_jaxpr(lambda x, w: jaxmx.dot_general(x, w, dims, config=cfg))(x, w)
    assert [e.primitive.name for e in jaxpr.jaxpr.eqns] == ["dot_general"]
    got = jaxmx.dot_general(x, w, dims, config=cfg)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.lax.dot_general(x, w, dims)))
