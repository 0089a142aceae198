"""N:M-sparse weights stored as kept values plus positions (jaxmx.NMSparseTensor).

What is checked, and against what:

* the positions: exactly ``n`` distinct, ascending positions per group, the
  ones a NumPy model of the magnitude ranking picks (stable sort, ties to
  the lower index), and nothing stored outside them;
* the round trip: :meth:`NMSparseTensor.densify` against the dense path
  ``jaxmx.quantize(jaxmx.sparsify(w), fmt, block_size=block * m // n)``,
  codes and scales bit for bit, for every format that takes free block sizes;
* ``nbytes`` against numbers derived from the layout (codes, one scale per
  block of kept values, ceil(log2 m)-bit indices), never from the code;
* serving: a linen model's params through ``quantize_params(sparsity=...)``
  and ``jaxmx.intercept``, against a float64 NumPy forward of the
  fake-quantized sparse weights within float32 accumulation error, and
  against the same model served dense (which it must not match: a test
  that would pass with sparsification or quantization skipped is a defect);
* the errors, which name what was given and what is allowed.
"""

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmx
from jaxmx.sparse_tensor import check_sparse_leaves, index_bits

from ._arrays import assert_differs, normal

PATTERNS = ((2, 4), (4, 8), (8, 16))
U = 2.0**-24  # float32 unit roundoff


def np_keep(w, n, m, axis):
    """The kept positions of each group: the n largest |w|, ties to the lower index."""
    g = np.moveaxis(np.abs(np.asarray(w, np.float64)), axis, -1)
    g = g.reshape(*g.shape[:-1], -1, m)
    order = np.argsort(-g, axis=-1, kind="stable")[..., :n]
    return np.sort(order, axis=-1)  # (..., groups, n)


def raw_codes(t):
    """One code per element as unsigned bytes (FP8 / FP4 / INT8 alike)."""
    data = np.asarray(jaxmx.unpack(t).data)
    return data.view(np.uint8) if data.dtype.itemsize == 1 else data


# --------------------------------------------------------------------------
# The stored record.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("n,m", [*PATTERNS, (1, 4), (3, 4)])
def test_exactly_n_kept_per_group_at_the_magnitude_positions(n, m):
    w = normal(0, (96, 40))
    sp = jaxmx.NMSparsity(n, m)
    t = jaxmx.quantize_sparse(w, "mxfp8", sp, axis=0, block_size=24 if n == 3 else None)
    check_sparse_leaves(t)
    pos = np.asarray(t.positions())  # (kept, 40) along axis 0
    groups = np.moveaxis(pos, 0, -1).reshape(40, 96 // m, n)
    assert (np.diff(groups, axis=-1) > 0).all()  # n distinct, ascending
    assert groups.max() < m
    np.testing.assert_array_equal(groups, np_keep(w, n, m, axis=0))
    dense = np.asarray(t.dequantize())
    mask = np.zeros((40, 96 // m, m), bool)
    np.put_along_axis(mask, groups, True, axis=-1)
    mask = np.moveaxis(mask.reshape(40, 96), -1, 0)
    assert (dense[~mask] == 0).all()  # nothing outside the kept positions
    assert (dense[mask] != 0).mean() > 0.9  # and the kept values are there


def test_sparsification_and_quantization_both_happen():
    w = normal(1, (128, 32))
    t = jaxmx.quantize_sparse(w, "mxfp4", jaxmx.NMSparsity(2, 4), axis=0)
    ws = jaxmx.sparsify(w, jaxmx.NMSparsity(2, 4), axis=0)
    assert float(jnp.mean(t.dequantize() == 0)) >= 0.5
    assert_differs(t.dequantize(), ws)  # quantized
    assert_differs(t.dequantize(), jaxmx.fake_quantize(w, "mxfp4", axis=0, block_size=64))  # sparse


def _free_block_formats():
    return [
        f
        for f in jaxmx.list_formats()
        if jaxmx.get_family(jaxmx.get_format(f)).rules.block_sizes in ("any", "tiles", "tensor")
    ]


# Every format with free blocks at 2:4, and every pattern with one format of
# each family (the formats of a family share their arithmetic).
ROUND_TRIPS = [(f, 2, 4) for f in _free_block_formats()] + [
    (f, n, m) for f in ("mxfp4", "nvfp4", "tensor_fp8_e4m3") for n, m in PATTERNS[1:]
]


@pytest.mark.parametrize("fmt,n,m", ROUND_TRIPS)
def test_densify_is_the_dense_path_bit_for_bit(fmt, n, m):
    w = normal(2, (3, 256, 48), 3.0).at[0, 5, 7].set(40.0)  # an outlier in one block
    sp = jaxmx.NMSparsity(n, m)
    t = jaxmx.quantize_sparse(w, fmt, sp, axis=1)
    block = None if t.block_size is None else t.block_size * m // n
    ref = jaxmx.quantize(jaxmx.sparsify(w, sp, axis=1), fmt, axis=1, block_size=block)
    d = t.densify()
    assert d.block_size == ref.block_size and d.shape == ref.shape == w.shape
    np.testing.assert_array_equal(raw_codes(d), raw_codes(ref))
    for name in ("scale", "tensor_scale"):
        a, b = getattr(d, name), getattr(ref, name)
        assert (a is None) == (b is None)
        if a is not None:
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    np.testing.assert_array_equal(
        np.asarray(t.dequantize()), np.asarray(jaxmx.dequantize(ref, jnp.float32))
    )


@pytest.mark.parametrize("axis", [0, -1])
def test_any_axis_and_bfloat16(axis):
    w = normal(3, (64, 64)).astype(jnp.bfloat16)
    sp = jaxmx.NMSparsity(4, 8)
    t = jaxmx.quantize_sparse(w, "mxfp4", sp, axis=axis)
    assert t.dtype == jnp.bfloat16 and t.shape == (64, 64)
    assert t.sparse_axis() == (axis % 2) - 2
    ref = jaxmx.fake_quantize(jaxmx.sparsify(w, sp, axis=axis), "mxfp4", axis=axis, block_size=64)
    np.testing.assert_array_equal(np.asarray(t.dequantize()), np.asarray(ref))


# --------------------------------------------------------------------------
# nbytes, from the layout.
# --------------------------------------------------------------------------

# (element bits, scale bits, kept values per block, tensor-scale bytes)
LAYOUT = {"mxfp4": (4, 8, 32, 0), "mxfp8": (8, 8, 32, 0), "nvfp4": (4, 8, 16, 4)}


@pytest.mark.parametrize("fmt", sorted(LAYOUT))
@pytest.mark.parametrize("n,m", PATTERNS)
def test_nbytes_from_the_layout(fmt, n, m):
    k, cols = 512, 24
    elem, scale, block, tensor_scale = LAYOUT[fmt]
    kept = k * n // m
    b = math.ceil(math.log2(m))  # 2, 3, 4 bits per position
    codes = cols * kept * elem // 8
    scales = cols * math.ceil(kept / block) * scale // 8
    indices = cols * math.ceil(kept * b / 8)
    t = jaxmx.quantize_sparse(normal(4, (k, cols)), fmt, jaxmx.NMSparsity(n, m), axis=0)
    assert t.values.nbytes == codes + scales + tensor_scale
    assert t.indices.nbytes == indices
    assert t.nbytes == codes + scales + tensor_scale + indices
    assert jaxmx.param_bytes({"w": t}) == t.nbytes
    # per element of the dense weight: n/m of (element + scale/block) + n*b/m
    per_element = n / m * (elem + scale / block) + n * b / m
    assert t.bits_per_element == pytest.approx(per_element + 8 * tensor_scale / (k * cols))


def test_two_four_mxfp4_is_2_125_bits_of_values_plus_one_of_indices():
    t = jaxmx.quantize_sparse(normal(5, (1024, 64)), "mxfp4", jaxmx.NMSparsity(2, 4), axis=0)
    assert 8 * t.values.nbytes / t.size == 2.125  # 4-bit codes for half + an E8M0 per 64
    assert 8 * t.indices.nbytes / t.size == 1.0  # two 2-bit positions per group of 4
    assert t.bits_per_element == 3.125
    dense = jaxmx.quantize(normal(5, (1024, 64)), "mxfp4", axis=0, packed=True)
    assert dense.bits_per_element == 4.25


def test_index_bits():
    assert [index_bits(m) for m in (2, 4, 8, 16, 32)] == [1, 2, 3, 4, 5]
    assert index_bits(6) == 3


# --------------------------------------------------------------------------
# As a pytree leaf.
# --------------------------------------------------------------------------


def test_passes_through_jit_and_tree_ops():
    w = normal(6, (128, 16))
    t = jaxmx.quantize_sparse(w, "mxfp4", jaxmx.NMSparsity(2, 4), axis=0)
    leaves, tree = jax.tree.flatten(t)
    assert len(leaves) == 3  # codes, scales, indices
    same = jax.tree.unflatten(tree, leaves)
    np.testing.assert_array_equal(np.asarray(same.dequantize()), np.asarray(t.dequantize()))
    out = jax.jit(lambda t: t)(t)
    assert isinstance(out, jaxmx.NMSparseTensor) and out.nbytes == t.nbytes
    np.testing.assert_array_equal(
        np.asarray(jax.jit(lambda t: t.dequantize())(t)), np.asarray(t.dequantize())
    )
    made = jax.jit(lambda w: jaxmx.quantize_sparse(w, "mxfp4", jaxmx.NMSparsity(2, 4), axis=0))(w)
    np.testing.assert_array_equal(np.asarray(made.indices), np.asarray(t.indices))
    assert re.fullmatch(r"NMSparseTensor\(2:4 mxfp4_e2m1, shape=\(128, 16\).*nbytes=\d+\)", repr(t))
    with pytest.raises(TypeError, match="not a NumPy array"):
        np.asarray(t)


def test_scan_over_stacked_layers():
    ws = normal(7, (3, 64, 32))
    t = jaxmx.quantize_sparse(ws, "mxfp8", jaxmx.NMSparsity(2, 4), axis=1)

    def body(h, layer):
        return h, layer.dequantize()

    _, dense = jax.lax.scan(body, 0.0, t)
    np.testing.assert_array_equal(np.asarray(dense), np.asarray(t.dequantize()))


# --------------------------------------------------------------------------
# quantize_params and intercept.
# --------------------------------------------------------------------------


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(128, name="up")(x))
        return nn.Dense(32, name="down")(h)


class One(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(48, name="proj")(x)


def test_quantize_params_sparsity_option():
    x = normal(9, (4, 64))
    params = MLP().init(jax.random.key(0), x)
    sp = jaxmx.NMSparsity(2, 4)
    q = jaxmx.quantize_params(params, "mxfp4", sparsity=sp)
    for layer in ("up", "down"):
        k = q["params"][layer]["kernel"]
        assert isinstance(k, jaxmx.NMSparseTensor) and k.sparse_axis() == -2
        assert k.n == 2 and k.m == 4 and k.format.name == "mxfp4_e2m1"
        assert k.values.packed
        w = params["params"][layer]["kernel"]
        ref = jaxmx.fake_quantize(jaxmx.sparsify(w, sp, axis=0), "mxfp4", axis=0, block_size=64)
        np.testing.assert_array_equal(np.asarray(k.dequantize()), np.asarray(ref))
        assert q["params"][layer]["bias"] is params["params"][layer]["bias"]
    only = jaxmx.quantize_params(params, "mxfp4", sparsity={"up": sp, "down": None})
    assert isinstance(only["params"]["up"]["kernel"], jaxmx.NMSparseTensor)
    assert isinstance(only["params"]["down"]["kernel"], jaxmx.MXTensor)
    kept = jaxmx.quantize_params(params, [("down", None), (".*", "mxfp4")], sparsity=sp)
    assert kept["params"]["down"]["kernel"] is params["params"]["down"]["kernel"]
    dense = jaxmx.quantize_params(params, "mxfp4")
    assert jaxmx.param_bytes(q) < jaxmx.param_bytes(dense)
    bigger = jaxmx.quantize_params(params, "mxfp4", sparsity=sp, block_size=64)
    assert bigger["params"]["up"]["kernel"].block_size == 64


def _bound(xq, wq):
    """float32 accumulation error bound of xq @ wq (float64 arrays), per output."""
    k = xq.shape[-1]
    gamma = k * U / (1 - k * U)
    return gamma * (np.abs(xq) @ np.abs(wq))


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "mxfp8"])
def test_intercept_serves_sparse_weights(fmt):
    x = normal(10, (16, 128))
    model = One()
    params = model.init(jax.random.key(1), x)
    sp = jaxmx.NMSparsity(2, 4)
    q = jaxmx.quantize_params(params, fmt, sparsity=sp)
    cfg = jaxmx.DotConfig(lhs="mxfp8", rhs=fmt)
    served = jaxmx.intercept(model.apply, cfg)
    y = np.asarray(jax.jit(served)(q, x), np.float64)
    assert served.coverage.counts == "1 of 1 matmuls in MX"
    assert "MXTensor rhs" in served.coverage.sites[0].reason  # the stored codes, used as is
    w = params["params"]["proj"]["kernel"]
    block = (16 if fmt == "nvfp4" else 32) * 2
    wq = np.asarray(
        jaxmx.fake_quantize(jaxmx.sparsify(w, sp, axis=0), fmt, axis=0, block_size=block),
        np.float64,
    )
    xq = np.asarray(jaxmx.fake_quantize(x, "mxfp8", axis=-1), np.float64)
    bias = np.asarray(params["params"]["proj"]["bias"], np.float64)
    ref = xq @ wq + bias
    assert (np.abs(y - ref) <= _bound(xq, wq) + U * np.abs(ref)).all()
    # The same model served dense is another function: sparsity was applied.
    dense = np.asarray(served(jaxmx.quantize_params(params, fmt), x), np.float64)
    assert (np.abs(dense - ref) > _bound(xq, wq) + U * np.abs(ref)).any()
    # And unquantized sparse weights give another: quantization was applied.
    ws = np.asarray(jaxmx.sparsify(w, sp, axis=0), np.float64)
    assert (np.abs(xq @ ws + bias - ref) > _bound(xq, wq) + U * np.abs(ref)).any()


def test_intercept_two_layers_eager_and_jit():
    x = normal(11, (8, 64))
    model = MLP()
    params = model.init(jax.random.key(2), x)
    q = jaxmx.quantize_params(params, "mxfp4", sparsity=jaxmx.NMSparsity(4, 8))
    served = jaxmx.intercept(model.apply, "mxfp8")
    y_jit = jax.jit(served)(q, x)
    y_eager = served(q, x)
    np.testing.assert_allclose(np.asarray(y_jit), np.asarray(y_eager), rtol=1e-5, atol=1e-5)
    assert served.coverage.counts == "2 of 2 matmuls in MX"
    ref = model.apply(params, x)
    assert float(jnp.max(jnp.abs(y_jit - ref))) < 0.5 * float(jnp.max(jnp.abs(ref)))


# --------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------


def test_errors():
    w = normal(12, (96, 8))
    sp = jaxmx.NMSparsity(2, 4)
    with pytest.raises(ValueError, match=r"length 90, not a multiple of m=4"):
        jaxmx.quantize_sparse(w[:90], "mxfp4", sp, axis=0)
    with pytest.raises(ValueError, match=r"block of 32 kept values is not a multiple of n=3"):
        jaxmx.quantize_sparse(w, "mxfp4", jaxmx.NMSparsity(3, 4), axis=0)
    with pytest.raises(ValueError, match=r"block of 30 kept values is not a multiple of n=4"):
        jaxmx.quantize_sparse(w, "mxfp4", jaxmx.NMSparsity(4, 8), axis=0, block_size=30)
    with pytest.raises(ValueError, match=r"mx6's blocks are fixed"):
        jaxmx.quantize_sparse(w, "mx6", sp, axis=0)
    with pytest.raises(ValueError, match=r"not 2-D tiles"):
        jaxmx.quantize_sparse(w, "nvfp4", sp, axis=0, block_size=(16, 16))
    with pytest.raises(ValueError, match=r"ranks by the matmul's other operand.*magnitude"):
        jaxmx.quantize_sparse(w, "mxfp4", jaxmx.NMSparsity(2, 4, score="wanda"), axis=0)
    with pytest.raises(TypeError, match="must be a jaxmx.NMSparsity"):
        jaxmx.quantize_sparse(w, "mxfp4", (2, 4), axis=0)
    with pytest.raises(TypeError, match="float array"):
        jaxmx.quantize_sparse(jnp.ones((8, 8), jnp.int32), "mxfp4", sp, axis=0)
    with pytest.raises(ValueError, match="out of range"):
        jaxmx.quantize_sparse(w, "mxfp4", sp, axis=2)
    params = {"a": {"kernel": normal(13, (90, 8))}}
    with pytest.raises(ValueError, match=r"a/kernel \(90, 8\):.*not a multiple of m=4"):
        jaxmx.quantize_params(params, "mxfp4", sparsity=sp)
    params = {"a": {"kernel": w}}
    with pytest.raises(ValueError, match=r"a/kernel: sparsity= .*method="):
        jaxmx.quantize_params(params, "mxfp4", sparsity=sp, method="search")
    with pytest.raises(TypeError, match="sparsity must be a jaxmx.NMSparsity, a dict"):
        jaxmx.quantize_params(params, "mxfp4", sparsity=(2, 4))
    with pytest.raises(TypeError, match=r"sparsity\['a'\] must be"):
        jaxmx.quantize_params(params, "mxfp4", sparsity={"a": "2:4"})
