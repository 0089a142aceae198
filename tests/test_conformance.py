"""One suite, run over the whole format registry: every format behaves alike.

jit vs eager, vmap, scan, bf16/f16/f32 inputs, any axis and rank, partial
blocks, pytree round trips, packing, and the size accounting of MXTensor.
Each family is checked against its own independent NumPy model
(tests/reference.py for OCP MX, tests/reference_blockformats.py for NVFP4,
the BDR formats and per-tensor FP8).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxmx
from tests import reference
from tests import reference_blockformats as ref_bf
from tests._params import covering

FORMATS = jaxmx.list_formats()


def _reference(x: np.ndarray, fmt: str, axis: int, block_size) -> np.ndarray:
    """fake_quantize of x by the family's NumPy model."""
    f = jaxmx.get_format(fmt)
    if f.family == "ocp":
        return reference.fake_quantize(x, fmt, axis=axis, block_size=block_size)[0]
    if f.family == "nvfp4":
        return ref_bf.nvfp4_te(x, axis=axis).dequant_enc  # decode by the stored 1 / S_enc
    if f.family == "microexp":
        return ref_bf.quark_mx(x, fmt, axis=axis).y
    return ref_bf.tensor_fp8(x, f.element.name.removeprefix("fp8_")).y


def _leaves(t: jaxmx.MXTensor) -> int:
    return sum(a is not None for a in (t.data, t.scale, t.tensor_scale, t.micro))


def _shape(fmt: str, rows: int, cols: int) -> tuple[int, int]:
    # NVFP4 has no partial blocks (as TransformerEngine): whole blocks of 16.
    if jaxmx.get_format(fmt).family == "nvfp4":
        return (-(-rows // 16) * 16, -(-cols // 16) * 16)
    return (rows, cols)


def _x(shape, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * np.exp2(rng.integers(-8, 8, shape[:-1] + (1,)))
    return jnp.asarray(x.astype(np.float32)).astype(dtype)


def _same(a, b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _changed(q, x):
    """Quantization did something: a test of it must not pass on a no-op."""
    assert not np.array_equal(np.asarray(q, np.float32), np.asarray(x, np.float32))


def _same_tensor(a: jaxmx.MXTensor, b: jaxmx.MXTensor):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for la, lb in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert la.dtype == lb.dtype and la.shape == lb.shape
        _same(
            jax.lax.bitcast_convert_type(la, jnp.uint8)
            if la.dtype.itemsize == 1 and la.dtype != jnp.float4_e2m1fn
            else la.astype(jnp.float32),
            jax.lax.bitcast_convert_type(lb, jnp.uint8)
            if lb.dtype.itemsize == 1 and lb.dtype != jnp.float4_e2m1fn
            else lb.astype(jnp.float32),
        )


@pytest.mark.parametrize("fmt", covering(FORMATS, salt=0, every=3))
def test_jit_matches_eager(fmt):
    x = _x((8, 64))
    with jax.disable_jit():
        eager = jaxmx.quantize(x, fmt)
        eager_fq = jaxmx.fake_quantize(x, fmt)
    jitted = jax.jit(lambda v: jaxmx.quantize(v, fmt))(x)
    _same_tensor(eager, jitted)
    _same(eager_fq, jax.jit(lambda v: jaxmx.fake_quantize(v, fmt))(x))
    _changed(eager_fq, x)


def _dtype_cases():
    # Every format with one input dtype in make test (rotating over the OCP
    # formats; bfloat16 for the other families, whose own suites cover the
    # dtypes); the full product in test-slow.
    out = []
    dtypes = (jnp.float32, jnp.bfloat16, jnp.float16)
    for i, f in enumerate(FORMATS):
        ocp = jaxmx.get_format(f).family == "ocp"
        for d in dtypes:
            fast = d == (dtypes[i % 3] if ocp else jnp.bfloat16)
            out.append(pytest.param(f, d, marks=() if fast else pytest.mark.slow))
    return out


@pytest.mark.parametrize("fmt,dtype", _dtype_cases())
def test_input_dtypes(fmt, dtype):
    x = _x((4, 96), dtype=dtype)
    fq = jaxmx.fake_quantize(x, fmt)
    assert fq.dtype == dtype
    # Each value is on the MX grid and representable in the input dtype, so
    # the result equals the float32 computation on the widened input.
    want = jaxmx.fake_quantize(x.astype(jnp.float32), fmt).astype(dtype)
    _same(fq.astype(jnp.float32), want.astype(jnp.float32))
    t = jaxmx.quantize(x, fmt)
    assert t.dtype == dtype
    _same(jaxmx.dequantize(t, dtype).astype(jnp.float32), want.astype(jnp.float32))
    assert not np.array_equal(np.asarray(fq, np.float32), np.asarray(x, np.float32))


@pytest.mark.parametrize("fmt", covering(FORMATS, salt=1, every=3))
def test_any_axis_rank_and_partial_blocks(fmt):
    f = jaxmx.get_format(fmt)
    shape = (16, 48, 32) if f.family == "nvfp4" else (3, 45, 5)
    x = np.asarray(_x(shape, seed=1))
    # Block sizes: 8 where the format takes any, else its own (or none).
    bs = 8 if f.family == "ocp" else None
    for axis in (0, 1, 2, -1, -2):
        got = jaxmx.fake_quantize(x, fmt, axis=axis, block_size=bs)
        want = _reference(x, fmt, axis, bs)
        _changed(got, x)
        _same(got, want)
        t = jaxmx.quantize(x, fmt, axis=axis, block_size=bs)
        assert t.shape == x.shape
        _same(jaxmx.dequantize(t), want)
        if f.scale is None:
            assert t.scale is None and t.num_blocks == 1
            continue
        nb = -(-x.shape[axis] // (bs or f.block_size))
        want_scale = list(x.shape)
        want_scale[axis] = nb
        assert t.scale.shape == tuple(want_scale)
        assert t.num_blocks == nb
    if f.family == "nvfp4":
        with pytest.raises(ValueError, match="no partial blocks"):
            jaxmx.quantize(np.ones((3, 40), np.float32), fmt)


@pytest.mark.parametrize("fmt", covering(FORMATS, salt=0, every=3))
def test_vmap_and_scan(fmt):
    x = _x((5, 4, 64))
    per_item = jnp.stack([jaxmx.fake_quantize(x[i], fmt) for i in range(5)])
    _changed(per_item, x)
    _same(jax.vmap(lambda v: jaxmx.fake_quantize(v, fmt))(x), per_item)
    # An MXTensor made under vmap has leading batch axes; its axis is counted
    # from the end, so it still dequantizes correctly outside the vmap.
    batched = jax.vmap(lambda v: jaxmx.quantize(v, fmt))(x)
    assert batched.shape == x.shape
    _same(jaxmx.dequantize(batched), per_item)

    def step(carry, v):
        t = jaxmx.quantize(v, fmt)
        return carry + jaxmx.dequantize(t).sum(), t

    total, ts = jax.lax.scan(step, 0.0, x)
    _same(jaxmx.dequantize(ts), per_item)
    np.testing.assert_allclose(total, per_item.sum(), rtol=1e-6)


@pytest.mark.parametrize("fmt", covering(FORMATS, salt=1, every=3))
def test_pytree_round_trip(fmt):
    x = _x((4, 64))
    t = jaxmx.quantize(x, fmt)
    _changed(jaxmx.dequantize(t), x)
    leaves, treedef = jax.tree.flatten(t)
    assert len(leaves) == _leaves(t) >= 2
    _same_tensor(jax.tree.unflatten(treedef, leaves), t)
    # Through jit as argument and result, and through tree.map.
    _same_tensor(jax.jit(lambda a: a)(t), t)
    _same(jax.jit(jaxmx.dequantize)(t), jaxmx.dequantize(t))
    p = jaxmx.pack(t)
    _same_tensor(jax.tree.map(lambda a: a, p), p)


@pytest.mark.parametrize("fmt", covering(FORMATS, salt=0, every=3))
def test_pack_round_trip_and_nbytes(fmt):
    x = _x(_shape(fmt, 6, 100))
    for axis in (-1, 0):
        t = jaxmx.quantize(x, fmt, axis=axis)
        p = jaxmx.pack(t)
        _same_tensor(jaxmx.unpack(p), t)
        _same(jaxmx.dequantize(p), jaxmx.dequantize(t))
        _changed(jaxmx.dequantize(p), x)
        _same_tensor(jaxmx.quantize(x, fmt, axis=axis, packed=True), p)
    f = jaxmx.get_format(fmt)
    big = jaxmx.quantize(jnp.ones((64, 1024)), fmt, packed=True)
    # Element bits + amortized block scale and microexponent bits per
    # element, written out from the format's definition; + one float32 per
    # tensor where there is a tensor scale.
    per_element = f.element.bits
    if f.scale is not None:
        per_element += f.scale.bits / f.block_size
    if f.micro is not None:
        per_element += f.micro.bits / f.micro.group
    assert big.nbytes * 8 == 64 * 1024 * per_element + 32 * f.tensor_scale
    assert big.bits_per_element == f.bits_per_element + 32 * f.tensor_scale / (64 * 1024)


def test_mxfp4_packed_is_4p25_bits():
    x = jnp.zeros((256, 256), jnp.float32)
    p = jaxmx.quantize(x, "mxfp4", packed=True)
    assert p.nbytes == x.nbytes * 4.25 / 32
    assert p.data.dtype == jnp.uint8


def test_fp4_nibble_order():
    """Element 2i in the low nibble, as PyTorch's float4_e2m1fn_x2."""
    x = jnp.array([[0.5, 6.0, -1.0, 0.0]], jnp.float32)  # codes 1, 7, 0xA, 0
    p = jaxmx.quantize(x, "mxfp4", block_size=4, packed=True)
    assert np.asarray(p.data).tolist() == [[0x71, 0x0A]]


def test_fp6_packing_layout():
    x = jnp.array([[1.0, -1.0, 7.5, 0.125]], jnp.float32)  # e2m3 codes 8, 40, 31, 1
    p = jaxmx.quantize(x, "mxfp6_e2m3", block_size=4, packed=True)
    word = 8 | 40 << 6 | 31 << 12 | 1 << 18
    assert np.asarray(p.data).tolist() == [[word & 0xFF, word >> 8 & 0xFF, word >> 16]]


@pytest.mark.parametrize(
    "fmt", ["mxfp8_e4m3", "mxfp4_e2m1", "mxfp6_e3m2", "nvfp4", "mx6", "tensor_fp8_e4m3"]
)
def test_sharded_quantize_matches_unsharded(fmt):
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
    x = _x((16, 256))
    want = jaxmx.quantize(x, fmt)
    xs = jax.device_put(x, NamedSharding(mesh, P("data", "model")))
    got = jax.jit(lambda v: jaxmx.quantize(v, fmt))(xs)
    _same_tensor(got, want)
    _same(jax.jit(jaxmx.dequantize)(got), jaxmx.dequantize(want))
    _changed(jaxmx.dequantize(want), x)


def test_repr_and_properties():
    t = jaxmx.quantize(jnp.ones((3, 40), jnp.bfloat16), "mxfp4", block_size=16)
    assert t.shape == (3, 40) and t.ndim == 2 and t.size == 120 and t.dtype == jnp.bfloat16
    assert t.num_blocks == 3
    r = repr(t)
    assert "mxfp4_e2m1" in r and "(3, 40)" in r and "bfloat16" in r


def test_stochastic_rounding_needs_key_and_is_deterministic_per_key():
    x = _x((4, 64))
    a = jaxmx.fake_quantize(x, "mxfp4", rounding="stochastic", key=jax.random.key(1))
    b = jaxmx.fake_quantize(x, "mxfp4", rounding="stochastic", key=jax.random.key(1))
    c = jaxmx.fake_quantize(x, "mxfp4", rounding="stochastic", key=jax.random.key(2))
    _same(a, b)
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    raw_key = jaxmx.fake_quantize(x, "mxfp4", rounding="stochastic", key=jax.random.PRNGKey(1))
    assert raw_key.shape == x.shape


def test_fake_quantize_straight_through_gradient():
    x = _x((2, 32))
    g = jax.grad(lambda v: (jaxmx.fake_quantize(v, "mxfp4") * 3.0).sum())(x)
    _same(g, jnp.full_like(x, 3.0))
