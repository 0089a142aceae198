"""FSDP with MX weights: weights gathered as MX codes and scales give the unsharded results.

Runs on 8 CPU devices (conftest sets --xla_force_host_platform_device_count=8).

The matmul tests use operands that are multiples of 1/8 below 4 (as
tests/test_sharding.py): their MX values are multiples of 2^-6, every product
a multiple of 2^-12 and no partial sum reaches 2^12, so every sum is exact in
float32 and sharded and unsharded results must agree bit for bit.

The GPT test takes one training step's loss and gradients with parameters
fully sharded (the weights gathered as MX by the quantized dot) against the
same step with parameters replicated, on the same 8-device data-parallel
mesh. Each device computes the same thing in both (its slice of the batch
against the same decoded MX weights: the gathered codes are the codes the
replicated weight quantizes to, checked bit for bit above); only the sum of
the 8 per-device partial gradients differs, an all-reduce in one and a
reduce-scatter in the other, possibly in another order. Two float32 sums of
the same n = 8 terms t_d each lie within (n - 1) * 2^-24 * sum_d |t_d| of the
exact sum (to first order), so they differ by at most
2 * (n - 1) * 2^-24 * sum_d |t_d| elementwise. sum_d |t_d| is computed from
the per-device partial gradients, each the gradient of its slice of the
batch on one device; the loss, a mean of positive terms, gets the same bound
with sum_d |t_d| = loss.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxmx
import jaxmx.flax
from jaxmx import fsdp

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (CPU) devices")

U = 2.0**-24
DN = (((1,), (0,)), ((), ()))


def _mesh():
    return Mesh(np.array(jax.devices()[:8]), ("data",))


def _dyadic(shape, seed):
    rng = np.random.default_rng(seed)
    return (rng.integers(-31, 32, shape) / 8).astype(np.float32)


def _dot_step(cfg):
    def f(x, w, g):
        y, vjp = jax.vjp(lambda a, b: jaxmx.dot_general(a, b, DN, config=cfg), x, w)
        return (y, *vjp(g))

    return jax.jit(f)


@pytest.mark.parametrize("residuals", ["high_precision", "quantized"])
@pytest.mark.parametrize("recipe", ["mxfp8", "mxfp4"])
@pytest.mark.parametrize("w_shape", [(256, 512), (512, 256)], ids=["cut_free", "cut_contraction"])
def test_fsdp_dot_equals_unsharded(recipe, residuals, w_shape):
    """y, dx, dw of an FSDP matmul equal the unsharded matmul's, bit for bit.

    (256, 512) is cut along its free axis (the input-gradient matmul's block
    axis), (512, 256) along its contraction (the forward's block axis): in
    both, shards of 64 hold whole blocks of 32.
    """
    mesh = _mesh()
    k, n = w_shape
    x, w, g = _dyadic((16, k), 0), _dyadic((k, n), 1), _dyadic((16, n), 2)
    cfg = jaxmx.preset(recipe, residuals=residuals)
    want = _dot_step(cfg)(x, w, g)
    w_sharding = jaxmx.fsdp_shardings(w, mesh)
    assert w_sharding.spec == (P(None, "data") if k < n else P("data", None))
    args = [
        jax.device_put(x, NamedSharding(mesh, P("data"))),
        jax.device_put(w, w_sharding),
        jax.device_put(g, NamedSharding(mesh, P("data"))),
    ]
    step = _dot_step(cfg.replace(fsdp="data"))
    with jax.set_mesh(mesh):
        got = step(*args)
        hlo = step.lower(*args).compile().as_text()
    for a, b, name in zip(got, want, ("y", "dx", "dw"), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    # What crossed the wire: bytes (codes, E8M0 scales), no float weight.
    gathers = [line for line in hlo.splitlines() if " all-gather(" in line]
    assert gathers and all("= u8[" in line for line in gathers), gathers
    assert len(gathers) == (2 if residuals == "quantized" else 4)  # codes + scales per gather
    exact = _dot_step(jaxmx.DotConfig())(x, w, g)
    assert not np.array_equal(np.asarray(got[0]), np.asarray(exact[0]))  # it did quantize


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4", "mxfp6_e3m2"])
def test_fsdp_gather_is_the_unsharded_quantization(fmt):
    mesh = _mesh()
    w = jax.random.normal(jax.random.key(0), (256, 96))
    ws = jax.device_put(w, NamedSharding(mesh, P("data", None)))
    got = jaxmx.fsdp_gather(ws, fmt, axis=0, mesh=mesh, decode=False)
    want = jaxmx.pack(jaxmx.quantize(w, fmt, axis=0))
    assert got.packed == want.packed
    assert got.data.dtype == want.data.dtype and got.data.shape == want.data.shape
    np.testing.assert_array_equal(np.asarray(got.data), np.asarray(want.data))
    np.testing.assert_array_equal(
        np.asarray(got.scale).view(np.uint8), np.asarray(want.scale).view(np.uint8)
    )
    decoded = jaxmx.fsdp_gather(ws, fmt, axis=0, mesh=mesh)
    np.testing.assert_array_equal(
        np.asarray(decoded), np.asarray(jaxmx.fake_quantize(w, fmt, axis=0))
    )
    # Along the other axis (not cut): blocks along the 96 columns.
    across = jaxmx.fsdp_gather(ws, fmt, axis=1, mesh=mesh)
    np.testing.assert_array_equal(
        np.asarray(across), np.asarray(jaxmx.fake_quantize(w, fmt, axis=1))
    )


def test_fsdp_gather_gradient_passes_straight_through():
    mesh = _mesh()
    w = jax.device_put(
        jnp.linspace(-1.0, 1.0, 256 * 8).reshape(256, 8), NamedSharding(mesh, P("data"))
    )
    c = jnp.arange(256 * 8, dtype=jnp.float32).reshape(256, 8)
    grad = jax.jit(jax.grad(lambda w: (jaxmx.fsdp_gather(w, "mxfp8", axis=0, mesh=mesh) * c).sum()))
    np.testing.assert_array_equal(np.asarray(grad(w)), np.asarray(c))


def test_block_straddling_a_shard_is_refused():
    mesh = _mesh()
    # 128 rows over 8 devices: shards of 16, blocks of 32 along that axis.
    w = jax.device_put(jnp.ones((128, 64)), NamedSharding(mesh, P("data", None)))
    with pytest.raises(ValueError, match=r"shards of 16: a block would straddle.*block size 32"):
        jaxmx.fsdp_gather(w, "mxfp8", axis=0, shard_axis=0, mesh=mesh)
    # Blocks along the other axis are whole in every shard: allowed.
    jaxmx.fsdp_gather(w, "mxfp8", axis=1, shard_axis=0, mesh=mesh)
    # A block size that divides the shard length: allowed.
    jaxmx.fsdp_gather(w, "mxfp8", axis=0, shard_axis=0, mesh=mesh, block_size=16)


def test_fsdp_errors_name_what_was_given():
    mesh = _mesh()
    w = jax.device_put(jnp.ones((256, 64)), NamedSharding(mesh, P("data", None)))
    with pytest.raises(ValueError, match="no mesh is set"):
        jaxmx.fsdp_gather(w, "mxfp8", axis=0)
    with pytest.raises(ValueError, match="'model' is not an axis of the mesh; its axes are"):
        jaxmx.fsdp_gather(w, "mxfp8", axis=0, mesh=mesh, mesh_axis="model")
    with pytest.raises(ValueError, match="per-tensor scale"):
        jaxmx.fsdp_gather(w, "nvfp4", axis=0, mesh=mesh)
    with pytest.raises(ValueError, match=r"no axis of the weight \(shape \(100,\)\)"):
        jaxmx.fsdp_gather(jnp.ones(100), "mxfp8", axis=0, mesh=mesh)
    with pytest.raises(ValueError, match="fsdp must be a mesh axis name"):
        jaxmx.DotConfig(fsdp="")
    cfg = jaxmx.preset("mxfp8", fsdp="data")
    with pytest.raises(ValueError, match="no mesh is set"):
        jax.jit(lambda a, b: jaxmx.dot_general(a, b, DN, config=cfg))(jnp.ones((8, 256)), w)
    assert cfg.for_activations().fsdp is None  # attention's q.k has no weight to gather


def test_fsdp_shardings_cut_the_longest_fitting_axis():
    mesh = _mesh()
    tree = {
        "q": jnp.zeros((256, 2, 128)),  # 256 = 8 x 32: axis 0
        "o": jnp.zeros((2, 128, 256)),  # axis 2
        "fc": jnp.zeros((256, 1024)),  # the longest: axis 1
        "bias": jnp.zeros(84),  # no axis fits: replicated
        "count": jnp.zeros((), jnp.int32),
    }
    specs = {k: s.spec for k, s in jaxmx.fsdp_shardings(tree, mesh).items()}
    assert specs == {
        "q": P("data", None, None),
        "o": P(None, None, "data"),
        "fc": P(None, "data"),
        "bias": P(),
        "count": P(),
    }


# --- One GPT training step: FSDP against replicated weights -----------------


def _gpt(width=256):
    from models import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=32, context=8, depth=1, width=width, heads=2)
    return GPT(cfg)


def _loss_and_grads(model, mx, params, x, y, mesh, fsdp_axis):
    from examples import training
    from examples.parallel import Parallel

    parallel = None if mesh is None else Parallel(mesh, fsdp=fsdp_axis is not None)
    cfg = mx if fsdp_axis is None else mx.replace(fsdp=fsdp_axis)
    apply_fn = training.apply_fn_for(jaxmx.flax.quantize_model(model, cfg))

    def loss(p, x, y):
        p = p if parallel is None else parallel.for_model(p)
        return training.cross_entropy(apply_fn(p, x), y)

    step = jax.jit(jax.value_and_grad(loss))
    if parallel is None:
        return step(params, x, y), None
    args = (parallel.put(params), parallel.put_batch(x), parallel.put_batch(y))
    with jax.set_mesh(mesh):
        compiled = step.lower(*args).compile()
        return compiled(*args), compiled.as_text()


@pytest.mark.parametrize(
    "recipe,residuals",
    [("mxfp8", "high_precision"), pytest.param("mxfp4", "quantized", marks=pytest.mark.slow)],
)
def test_gpt_step_with_fsdp_equals_replicated_weights(recipe, residuals):
    from examples import training

    model = _gpt()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 32, (8, 8)).astype(np.int32)
    y = rng.integers(0, 32, (8, 8)).astype(np.int32)
    params = training.init_linen_params(model, x, 0)
    mx = jaxmx.preset(recipe, residuals=residuals)
    mesh = _mesh()
    (loss_r, grads_r), _ = _loss_and_grads(model, mx, params, x, y, mesh, None)
    (loss_f, grads_f), hlo = _loss_and_grads(model, mx, params, x, y, mesh, "data")
    # The per-device partial gradients, each its batch slice's share of the
    # mean (one example per device), taken on one device.
    n = 8
    one = jax.vmap(lambda x1, y1: _loss_and_grads(model, mx, params, x1, y1, None, None)[0][1])
    per_slice = one(x[:, None], y[:, None])
    sums = [np.abs(np.asarray(g, np.float64)).sum(axis=0) / n for g in jax.tree.leaves(per_slice)]
    bound_scale = 2 * (n - 1) * U
    assert abs(float(loss_f) - float(loss_r)) <= bound_scale * float(loss_r)
    flat_r = jax.tree_util.tree_leaves_with_path(grads_r)
    flat_f = jax.tree.leaves(grads_f)
    checked = 0
    for (path, gr), gf, s in zip(flat_r, flat_f, sums, strict=True):
        gr, gf = np.asarray(gr, np.float64), np.asarray(gf, np.float64)
        excess = np.abs(gf - gr) - bound_scale * s
        assert excess.max() <= 0, (
            f"{jax.tree_util.keystr(path)}: FSDP and replicated gradients differ by "
            f"{np.abs(gf - gr).max():.3g}, beyond the bound of the 8-term sum"
        )
        checked += gr.size
    assert checked == sum(np.size(p) for p in jax.tree.leaves(params))
    # The 7 kernels (q, k, v, out, mlp_fc, mlp_proj, head) were cut, and the
    # quantized dot gathered each as MX bytes (codes and scales): 2 gathers
    # per matmul with the forward copy kept, 4 with a second one for dgrad.
    kernels = [
        jax.tree_util.keystr(p)
        for p, leaf in jax.tree_util.tree_leaves_with_path(params)
        if p[-1].key == "kernel" and fsdp.fsdp_axis(leaf.shape, 8) is not None
    ]
    assert len(kernels) == 7, kernels
    byte_gathers = [ln for ln in hlo.splitlines() if " all-gather(" in ln and "= u8[" in ln]
    assert len(byte_gathers) == 7 * (2 if residuals == "quantized" else 4), byte_gathers


def test_mx_shardings_keep_blocks_whole():
    mesh = _mesh()
    t = jaxmx.quantize(jax.random.normal(jax.random.key(0), (512, 16)), "mxfp4", axis=0)
    t = jaxmx.pack(t)
    sh = jaxmx.mx_shardings(t, mesh, P("data", None))
    placed = jax.device_put(t, sh)
    jaxmx.check_blocks_whole(placed)
    np.testing.assert_array_equal(
        np.asarray(jaxmx.dequantize(placed)), np.asarray(jaxmx.dequantize(t))
    )
    # 128 rows over 8 devices: 16 per device, half a block.
    small = jaxmx.quantize(jnp.ones((128, 16)), "mxfp8", axis=0)
    with pytest.raises(ValueError, match="blocks of 32 along axis 0 need an axis length"):
        jaxmx.mx_shardings(small, mesh, P("data", None))
    # Codes and scales cut differently: caught on arrays already placed.
    bad = dataclasses.replace(
        small,
        data=jax.device_put(small.data, NamedSharding(mesh, P("data", None))),
        scale=jax.device_put(small.scale, NamedSharding(mesh, P(None, None))),
    )
    with pytest.raises(ValueError, match=r"codes \d+:\d+ of that axis \(16 of 128\)"):
        jaxmx.check_blocks_whole(bad)


def test_load_refuses_a_target_whose_sharding_splits_blocks(tmp_path):
    """48 rows in blocks of 32 (the last one partial): two shards of 24 rows
    would cut the first block, while each shard holds one scale."""
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    t = jaxmx.quantize(jax.random.normal(jax.random.key(0), (48, 16)), "mxfp8", axis=0)
    path = tmp_path / "ckpt"
    jaxmx.save(path, {"w": t})
    cut = NamedSharding(mesh, P("data", None))
    target = {"w": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cut), t)}
    with pytest.raises(
        ValueError, match=r"target tree\['w'\]: .*codes 0:24 of that axis \(24 of 48\)"
    ):
        jaxmx.load(path, target=target)
    # Cut along the other axis, every block is whole on each device.
    other = NamedSharding(mesh, P(None, "data"))
    target = {
        "w": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=other), t)
    }
    got = jaxmx.load(path, target=target)["w"]
    np.testing.assert_array_equal(
        np.asarray(jaxmx.dequantize(got)), np.asarray(jaxmx.dequantize(t))
    )
