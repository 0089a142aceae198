"""Quantized matmuls under SPMD sharding give exactly the unsharded result.

Runs on 8 CPU devices (conftest sets --xla_force_host_platform_device_count=8).
The operands are multiples of 1/8 below 4 (5 significant bits, so MXFP8 and
MXFP4 really round them). Their MX values are multiples of 2^-6, products of
2^-12, and no partial sum of 256 products reaches 2^12: every sum is exact in
float32, so a difference between sharded and unsharded runs would be a real
difference in what was quantized, not summation order.
"""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxmx

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (CPU) devices")

M, K, N = 64, 256, 64  # K = 8 shards x 32: every shard holds whole blocks
DN = (((1,), (0,)), ((), ()))


def _dyadic(shape, seed):
    rng = np.random.default_rng(seed)
    return (rng.integers(-31, 32, shape) / 8).astype(np.float32)


def _step(cfg):
    def f(x, w, g):
        y, vjp = jax.vjp(lambda a, b: jaxmx.dot_general(a, b, DN, config=cfg), x, w)
        return (y, *vjp(g))

    return jax.jit(f)


def _mesh(shape, names):
    return Mesh(np.array(jax.devices()[:8]).reshape(shape), names)


LAYOUTS = {
    # name: (mesh shape, axis names, x spec, w spec, g spec)
    "data_parallel": ((8,), ("data",), P("data", None), P(None, None), P("data", None)),
    "tensor_parallel_out": ((8,), ("model",), P(None, None), P(None, "model"), P(None, "model")),
    "tensor_parallel_contraction": (
        (8,),
        ("model",),
        P(None, "model"),
        P("model", None),
        P(None, None),
    ),
    "2d_mesh": ((2, 4), ("data", "model"), P("data", "model"), P("model", None), P("data", None)),
}


@pytest.mark.parametrize("recipe", ["mxfp8", "mxfp4_weights"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sharded_equals_unsharded(layout, recipe):
    cfg = jaxmx.preset(recipe)
    x, w, g = _dyadic((M, K), 0), _dyadic((K, N), 1), _dyadic((M, N), 2)
    want = _step(cfg)(x, w, g)
    shape, names, xs, ws, gs = LAYOUTS[layout]
    mesh = _mesh(shape, names)
    args = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in ((x, xs), (w, ws), (g, gs))]
    got = _step(cfg)(*args)
    for a, b, name in zip(got, want, ("y", "dx", "dw"), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{layout}: {name}")
    # Inputs kept their sharding: the computation really ran distributed.
    assert len(args[0].sharding.device_set) == 8
    # And quantization happened at all.
    exact = _step(jaxmx.DotConfig())(x, w, g)
    assert not np.array_equal(np.asarray(got[0]), np.asarray(exact[0]))


def test_sharded_einsum_batch_and_heads():
    """Attention-shaped einsum with the batch on one mesh axis and heads on another."""
    mesh = _mesh((2, 4), ("data", "model"))
    q = _dyadic((4, 16, 8, 32), 3)
    k = _dyadic((4, 16, 8, 32), 4)
    cfg = jaxmx.preset("mxfp8")
    f = jax.jit(lambda a, b: jaxmx.einsum("bqhd,bkhd->bhqk", a, b, config=cfg))
    want = f(q, k)
    spec = NamedSharding(mesh, P("data", None, "model", None))
    got = f(jax.device_put(q, spec), jax.device_put(k, spec))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert not np.array_equal(np.asarray(want), np.einsum("bqhd,bkhd->bhqk", q, k))
