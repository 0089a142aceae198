"""A family registered from outside the package runs through all of jaxmx.

The family: INT8 codes with a float32 absmax scale per block (``scale =
amax * f32(1/127)``, codes ``round(x / scale)``; with the block as long as the row,
the per-channel INT8 of LLM.int8() and most serving stacks). Nothing below
touches jaxmx's internals: one :class:`jaxmx.Family` subclass, one
``register_family``, one ``register_format``. That it then quantizes,
multiplies as MXTensor operands and inside quantized matmuls, quantizes
parameters, compresses optimizer state and saves and loads is the proof that
a family lives in one place.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmx
from jaxmx import formats

F32_SCALE = formats.ScaleFormat(
    name="fp32", kind="float32", bits=32, bias=0, min_exponent=-149, max_exponent=127,
    nan_code=0, storage_dtype=np.float32,
)  # fmt: skip


INV127 = np.float32(1 / 127)


def _blocked(x, axis, bs):
    """x with axis last, zero-padded to whole blocks, as (..., blocks, bs)."""
    x = jnp.moveaxis(x, axis, -1)
    pad = -x.shape[-1] % bs
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return x.reshape(*x.shape[:-1], -1, bs)


class AbsmaxInt8(jaxmx.Family):
    name = "absmax_int8"
    description = "INT8 codes times a float32 absmax scale per block (amax * f32(1/127))"
    rules = formats.FamilyRules(
        roundings=("nearest_even",), scale_modes=("floor",), flush_subnormals=False,
        block_sizes="any", tensor_amax=False, array_ops=False,
    )  # fmt: skip

    def check_format(self, fmt):
        if fmt.element != formats.INT8 or fmt.scale is None or fmt.scale.kind != "float32":
            raise ValueError(f"{fmt.name}: absmax_int8 needs INT8 codes and a float32 scale")

    def quantize(self, x, rbits, tensor_amax, spec):
        n, bs = x.shape[spec.axis], spec.block_size
        xb = _blocked(x.astype(jnp.float32), spec.axis, bs)
        # Times the float32 reciprocal: XLA may turn a division by a constant into it.
        scale = jnp.max(jnp.abs(xb), axis=-1, keepdims=True) * INV127
        codes = jnp.round(xb / jnp.where(scale > 0, scale, 1.0)).astype(jnp.int8)
        codes = jnp.moveaxis(codes.reshape(*codes.shape[:-2], -1)[..., :n], -1, spec.axis)
        return jaxmx.MXTensor(
            data=codes, scale=jnp.moveaxis(scale[..., 0], -1, spec.axis), format=spec.format,
            axis=spec.axis, block_size=bs, length=n, dtype=np.dtype(x.dtype),
            made_ndim=x.ndim,
        )  # fmt: skip

    def fake_quantize(self, x, rbits, tensor_amax, spec):
        return self.dequantize(self.quantize(x, rbits, tensor_amax, spec), x.dtype)

    def dequantize(self, t, dtype):
        scale = jnp.repeat(t.scale, t.block_size, axis=t.axis)
        scale = jax.lax.slice_in_dim(scale, 0, t.length, axis=t.axis)
        return (t.data.astype(jnp.float32) * scale).astype(dtype)


@pytest.fixture(scope="module", autouse=True)
def registered():
    """Registers the family and its format for this module's tests only (other
    tests enumerate the registry); the teardown is the one use of internals."""
    global FAMILY, FMT
    FAMILY = jaxmx.register_family(AbsmaxInt8())
    FMT = jaxmx.register_format(
        jaxmx.MXFormat(name="int8_absmax", element=formats.INT8, scale=F32_SCALE,
                       block_size=64, family="absmax_int8", reference="tests: per-channel INT8")
    )  # fmt: skip
    yield
    from jaxmx.formats import _catalog, _family

    del _catalog._REGISTRY["int8_absmax"], _family._FAMILIES["absmax_int8"]


def _model(x, bs):
    """NumPy float64 model of the family along the last axis: (codes, scales, values)."""
    x = np.asarray(x, np.float32)
    n = x.shape[-1]
    xb = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, -n % bs)]).reshape(*x.shape[:-1], -1, bs)
    scale = np.abs(xb).max(-1, keepdims=True) * INV127
    codes = np.round(xb / np.where(scale > 0, scale, 1)).astype(np.int8)
    values = (codes * scale).reshape(*x.shape[:-1], -1)[..., :n]
    return codes.reshape(*x.shape[:-1], -1)[..., :n], scale[..., 0], values


@pytest.fixture
def x(registered):
    return jax.random.normal(jax.random.key(0), (8, 150), jnp.float32) * 3


def test_quantize_and_dequantize_follow_the_model(x):
    assert jaxmx.get_family(FMT) is FAMILY is jaxmx.get_family("absmax_int8")
    assert "absmax_int8" in jaxmx.list_families()
    t = jaxmx.quantize(x, "int8_absmax")  # 150 = two blocks of 64 and a partial one
    codes, scale, values = _model(x, 64)
    np.testing.assert_array_equal(np.asarray(t.data), codes)
    np.testing.assert_array_equal(np.asarray(t.scale), scale)
    np.testing.assert_array_equal(np.asarray(t.dequantize()), values)
    assert not np.array_equal(values, np.asarray(x))  # it did quantize
    np.testing.assert_array_equal(np.asarray(jaxmx.fake_quantize(x, FMT)), values)
    # Another axis and block size: the per-row scales of x.T along axis 0.
    t0 = jaxmx.quantize(x.T, FMT, axis=0, block_size=150)
    np.testing.assert_array_equal(np.asarray(t0.dequantize()).T, _model(x, 150)[2])
    with pytest.raises(ValueError, match="rounding"):
        jaxmx.quantize(x, FMT, rounding="stochastic", key=jax.random.key(1))


def test_matmuls_take_it_as_operands_and_as_their_format(x):
    w = jax.random.normal(jax.random.key(1), (150, 16), jnp.float32)
    a, b = jaxmx.quantize(x, FMT), jaxmx.quantize(w, FMT, axis=0)
    dims = (((1,), (0,)), ((), ()))
    want = jnp.matmul(a.dequantize(), b.dequantize(), precision="highest")
    got = jaxmx.dot_general(a, b, dims, precision="highest", config="fp32")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-5)
    # A quantized matmul in this format, forward and backward.
    cfg = jaxmx.DotConfig(lhs="int8_absmax", rhs="int8_absmax")
    out, grads = jax.value_and_grad(
        lambda x, w: jaxmx.dot_general(x, w, dims, config=cfg).sum(), argnums=(0, 1)
    )(x, w)
    ref = jnp.matmul(_model(x, 64)[2], _model(w.T, 64)[2].T, precision="highest").sum()
    np.testing.assert_allclose(float(out), float(ref), rtol=1e-5)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


def test_params_optimizer_state_and_checkpoints(x, tmp_path):
    params = {"dense": {"kernel": x.T, "bias": jnp.ones(8)}}
    q = jaxmx.quantize_params(params, "int8_absmax")
    kernel = q["dense"]["kernel"]
    assert isinstance(kernel, jaxmx.MXTensor) and kernel.format is FMT
    np.testing.assert_array_equal(np.asarray(kernel.dequantize()).T, _model(x, 64)[2])
    with pytest.raises(ValueError, match="no scale search"):
        jaxmx.quantize_params(params, FMT, method=jaxmx.ptq.ScaleSearch())

    optax = pytest.importorskip("optax")
    mx_optax = pytest.importorskip("jaxmx.optax")
    opt = mx_optax.compress_state(optax.adam(1e-2), {"mu": mx_optax.mx("int8_absmax")}, min_size=0)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(2), p.shape), params)
    _, state = opt.update(grads, opt.init(params), params)
    held = jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, mx_optax.Compressed))
    mu = [v for v in held if isinstance(v, mx_optax.Compressed) and v.codec.format == FMT.name]
    assert len(mu) == 2  # kernel and bias; each is (1 - b1) * g in the family's values
    for leaf, g in zip(mu, jax.tree.leaves(grads), strict=True):
        want = _model(np.float32(0.1) * np.asarray(g), 64)[2]
        np.testing.assert_array_equal(np.asarray(leaf.codec.decode(leaf)), want)

    path = str(tmp_path / "ckpt.safetensors")
    jaxmx.save(path, q)
    back = jaxmx.load(path)["dense"]["kernel"]
    assert back.format is FMT
    np.testing.assert_array_equal(np.asarray(back.data), np.asarray(kernel.data))
    np.testing.assert_array_equal(np.asarray(back.scale), np.asarray(kernel.scale))
