"""Property tests of the optimizer-state codecs and of the low-precision update (hypothesis)."""

from __future__ import annotations

import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxmx.optax as jo
from tests import test_optax_reference as ref

SHAPE = (3, 200)  # 600 elements: partial last blocks for 128 and 256

# Zero or a normal float32 magnitude (XLA:CPU flushes subnormals, NumPy does not).
_magnitudes = st.one_of(
    st.just(0.0), st.floats(2.0**-100, 2.0**20, allow_subnormal=False, width=32)
)
_values = st.builds(lambda m, s: m * s, _magnitudes, st.sampled_from([1.0, -1.0]))
ARRAYS = hnp.arrays(np.float32, SHAPE, elements=_values)
# Arrays whose entries share a scale: the common case of a moment tensor.
SCALED = st.builds(
    lambda a, e: (np.where(np.abs(a) < 2.0**-60, 0, a) * np.float32(10.0) ** e).astype(np.float32),
    hnp.arrays(np.float32, SHAPE, elements=st.floats(-1, 1, width=32)),
    st.integers(-12, 3),
)
BLOCKWISE = [
    jo.blockwise(jo.dynamic_map(signed=True, bits=8), 256),
    jo.blockwise(jo.dynamic_map(signed=False, bits=8), 256),
    jo.blockwise(jo.dynamic_map(signed=True, bits=4), 128),
]


@functools.cache
def _codec_fns(codec):
    return jax.jit(codec.encode), jax.jit(codec.decode)


@settings(max_examples=40)
@given(x=st.one_of(ARRAYS, SCALED), which=st.integers(0, len(BLOCKWISE) - 1))
def test_blockwise_codecs_equal_the_model_and_keep_sign_and_block_max(x, which):
    codec = BLOCKWISE[which]
    if not codec.qmap.signed:
        x = np.abs(x)
    encode, decode = _codec_fns(codec)
    got = np.asarray(decode(encode(jnp.asarray(x))))
    _, absmax, want = ref.blockwise(x, codec.qmap.values.astype(np.float64), codec.block_size)
    np.testing.assert_array_equal(got, want)
    assert np.all(got * x >= 0)  # never flips a sign
    assert np.all(got[x == 0] == 0)  # zero stays zero
    flat_x, flat_got = x.reshape(-1), got.reshape(-1)
    top = np.argmax(flat_x)  # the largest positive entry decodes to itself (map value 1)
    if (
        flat_x[top] > 0
        and flat_x[top]
        == np.abs(flat_x[top // codec.block_size * codec.block_size :][: codec.block_size]).max()
    ):
        assert flat_got[top] == flat_x[top]
    # Error bound: half the widest gap of the map, or the distance from -1 to
    # the most negative value (the signed maps have no -1), times the block's
    # absmax, plus the float32 rounding of that product.
    values = codec.qmap.values.astype(np.float64)
    bound = max(np.diff(values).max() / 2, 1 + values.min() if codec.qmap.signed else 0)
    blocks = np.repeat(absmax, codec.block_size)[: x.size].reshape(x.shape)
    error = np.abs(got.astype(np.float64) - x)
    assert np.all(error <= bound * blocks + np.spacing(blocks))


@settings(max_examples=30)
@given(x=st.one_of(ARRAYS, SCALED))
def test_rank1_codec_never_decodes_a_positive_entry_to_zero(x):
    v = np.abs(x)
    encode, decode = _codec_fns(jo.rank1())
    got = np.asarray(decode(encode(jnp.asarray(v))))
    _, want = ref.rank1(v)
    np.testing.assert_array_equal(got, want)
    scale = np.minimum(v.max(axis=1)[:, None], v.max(axis=0)[None, :])
    positive = scale > 0
    assert np.all(got[positive] >= scale[positive] / 16 * (1 - 2**-23))
    assert np.all(got <= scale)
    big = v >= scale / 16
    assert np.all(np.abs(got - v)[big] <= scale[big] / 32 * (1 + 2**-20))


@functools.cache
def _stochastic_fns(bits, signed):
    qmap = jo.dynamic_map(signed=signed, bits=bits)
    return qmap, jax.jit(qmap.encode)


@settings(max_examples=30)
@given(
    n=hnp.arrays(np.float32, (256,), elements=st.floats(-1, 1, width=32)),
    seed=st.integers(0, 2**31 - 1),
    kind=st.sampled_from([(8, True), (8, False), (4, True)]),
)
def test_stochastic_codes_are_one_of_the_two_neighbours(n, seed, kind):
    qmap, encode = _stochastic_fns(*kind)
    values = qmap.values.astype(np.float64)
    if not qmap.signed:
        n = np.abs(n)
    n = np.clip(n, values.min(), values.max()).astype(np.float32)
    codes = np.asarray(
        encode(jnp.asarray(n), jax.random.bits(jax.random.key(seed), n.shape, jnp.uint32))
    )
    lo = np.searchsorted(values, n, side="right") - 1
    hi = np.minimum(lo + 1, len(values) - 1)
    assert np.all((codes == lo) | (codes == hi))
    assert np.all(codes[values[lo] == n] == lo[values[lo] == n])  # on the grid: exact


@functools.cache
def _lp_step(rounding):
    opt = jo.low_precision_params(optax.sgd(1.0), rounding=rounding, key=jax.random.key(0))

    def step(p, g):
        u, _ = opt.update(g, opt.init(p), p)
        return optax.apply_updates(p, u), p - g

    return jax.jit(step)


@settings(max_examples=40)
@given(
    p=hnp.arrays(np.float32, (64,), elements=_values),
    ratio=hnp.arrays(np.float32, (64,), elements=st.floats(-2.0, 2.0, width=32)),
    rounding=st.sampled_from(["nearest_even", "stochastic"]),
)
def test_apply_updates_lands_on_the_grid(p, ratio, rounding):
    # Float32 containers on the bfloat16 grid: the update, applied by optax,
    # gives a bfloat16 value next to p - g (exact for nearest even).
    p = p.astype(ml_dtypes.bfloat16).astype(np.float32)
    g = (p * ratio).astype(np.float32)
    new, exact = (np.asarray(a) for a in _lp_step(rounding)(jnp.asarray(p), jnp.asarray(g)))
    assert np.array_equal(new.astype(ml_dtypes.bfloat16).astype(np.float32), new)
    if rounding == "nearest_even":
        want = exact.astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(new, want)
    else:  # one of the two bfloat16 neighbours of p - g
        ulp = np.spacing(exact.astype(ml_dtypes.bfloat16)).astype(np.float32)
        assert np.all(np.abs(new - exact) <= np.abs(ulp))
