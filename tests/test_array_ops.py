"""MXTensor as an array: every structural rule against dequantize-then-op, bit for bit.

Tensors here are mostly hand-built from random codes and random scale bytes
(FP8 NaN/Inf codes, -0, NaN-scale blocks, all-zero blocks, a partial last
block), not made by quantize: their blocks are not what quantize would
choose, so an op that secretly dequantized and quantized again would change
codes and scales, and the checks on the leaves would fail.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmx
from jaxmx import MXTensor
from jaxmx.codes import raw_dtype, raw_to_storage, storage_to_raw
from tests._params import covering

# The structural rules are written for the one-level power-of-two layout (the
# OCP codec); the other families refuse them (test at the end).
FORMATS = [f for f in jaxmx.list_formats() if jaxmx.get_format(f).family == "ocp"]
OTHERS = [f for f in jaxmx.list_formats() if jaxmx.get_format(f).family != "ocp"]
BS = 8
# Block axis first, middle, last; length 20 = blocks of 8, 8 and a partial 4.
SHAPES = {"first": (20, 3, 4), "middle": (3, 20, 4), "last": (3, 4, 20)}
WHOLE = {"first": (32, 3, 4), "middle": (3, 32, 4), "last": (3, 4, 32)}
POS = {"first": 0, "middle": 1, "last": 2}


def handbuilt(fmt, shape, b, packed=False, *, seed=0, bs=BS, scales=(110, 146), min_code=False):
    """Random codes and scales along axis ``b``: NaN blocks, zero blocks, -0 codes."""
    rng = np.random.default_rng(seed)
    fmt = jaxmx.get_format(fmt)
    elem = fmt.element
    L = shape[b]
    nb = -(-L // bs)
    raw = rng.integers(0, 1 << elem.bits, size=shape)
    if elem.kind == "int" and not min_code:
        raw = np.where(raw == elem.sign_bit, 0, raw)
    sshape = shape[:b] + (nb,) + shape[b + 1 :]
    sb = rng.integers(*scales, size=sshape).astype(np.uint8)
    sb.reshape(-1)[::5] = fmt.scale.nan_code
    zero = rng.random(sshape) < 0.2

    def per_code(m):
        return np.take(np.repeat(m, bs, axis=b), np.arange(L), axis=b)

    # NaN blocks hold zero codes (MXTensor's invariant); zero blocks keep signs.
    raw = np.where(per_code(sb == fmt.scale.nan_code), 0, raw)
    if elem.kind == "float":
        raw = np.where(per_code(zero), raw & elem.sign_bit, raw)
    else:
        raw = np.where(per_code(zero), 0, raw)
    data = raw_to_storage(jnp.asarray(raw.astype(raw_dtype(elem.bits))), elem)
    scale = jax.lax.bitcast_convert_type(jnp.asarray(sb), fmt.scale.storage_dtype)
    t = MXTensor(
        data=data,
        scale=scale,
        format=fmt,
        axis=b - len(shape),
        block_size=bs,
        length=L,
        dtype=np.dtype(np.float32),
    )
    return jaxmx.pack(t) if packed else t


def deq(t) -> np.ndarray:
    return np.asarray(jaxmx.dequantize(t))


def bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(f"u{a.dtype.itemsize}")


def codes(t) -> np.ndarray:
    """One unsigned raw code per element."""
    u = jaxmx.unpack(t)
    return np.asarray(storage_to_raw(u.data, u.format.element))


def sbytes(t) -> np.ndarray:
    return bits(t.scale)


def per_code(t, m) -> np.ndarray:
    """A per-block array (scale-shaped) repeated over the codes of each block."""
    b = t.ndim + t.block_axis()
    return np.take(np.repeat(m, t.block_size, axis=b), np.arange(t.length), axis=b)


def nan_blocks(t) -> np.ndarray:
    return per_code(t, sbytes(t) == t.format.scale.nan_code)


def assert_values(r, ref, *, int_zero=False):
    """dequantize(r) equals ref bit for bit (NaN anywhere matches NaN)."""
    got, ref = deq(r), np.asarray(ref, np.float32)
    if int_zero:
        ref = ref + np.float32(0)  # MXINT has no -0: -0.0 + 0 is +0, all else unchanged
    assert got.shape == ref.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    ok = ~np.isnan(ref)
    np.testing.assert_array_equal(bits(got)[ok], bits(ref)[ok])


def assert_meta(r, t, shape, block_axis, length=None):
    assert isinstance(r, MXTensor)
    assert (r.format, r.block_size, r.packed, r.dtype) == (
        t.format,
        t.block_size,
        t.packed,
        t.dtype,
    )
    assert r.shape == tuple(shape)
    assert r.block_axis() == block_axis - len(shape) and r.axis == r.block_axis()
    assert r.length == (t.length if length is None else length)


def assert_leaves_equal(a, b):
    assert (a.format, a.block_size, a.packed, a.length) == (
        b.format,
        b.block_size,
        b.packed,
        b.length,
    )
    assert a.block_axis() == b.block_axis()
    np.testing.assert_array_equal(bits(a.data), bits(b.data))
    np.testing.assert_array_equal(sbytes(a), sbytes(b))


def _matrix(salt: int):
    """Every format x packed x block-axis position. The default suite runs a
    covering subset: half the formats (which half rotates with ``salt``, so
    the tests of this file between them take every format), each once, at a
    position that rotates with the format; the full product runs with
    ``make test-slow``, since every case compiles its own shapes."""
    out = []
    for i, f in enumerate(FORMATS):
        # One packing per format (sub-byte formats alternate packed /
        # unpacked; 8-bit ones never pack).
        sub_byte = jaxmx.get_format(f).element.bits % 8 != 0
        default_packed = sub_byte and i % 2 == 0
        for p in (False, True):
            for j, q in enumerate(POS):
                fast = j == (i + p) % len(POS) and p == default_packed and (i + salt) % 2 == 0
                out.append(pytest.param(f, p, q, marks=() if fast else pytest.mark.slow))
    return out


params = pytest.mark.parametrize("fmt,packed,pos", _matrix(0))
params_b = pytest.mark.parametrize("fmt,packed,pos", _matrix(1))


def _skip_unpackable(fmt, packed):
    if packed and jaxmx.get_format(fmt).element.bits % 8 == 0:
        pytest.skip("8-bit codes are never packed")


def _case(fmt, packed, pos, seed=0):
    """One matrix case: the block axis, a hand-built tensor and its values."""
    _skip_unpackable(fmt, packed)
    b = POS[pos]
    t = handbuilt(fmt, SHAPES[pos], b, packed, seed=seed)
    return b, t, deq(t)


# --------------------------------------------------------------------------
# Axis permutations.
# --------------------------------------------------------------------------


@params
def test_transpose_swapaxes_moveaxis(fmt, packed, pos):
    b, t, d = _case(fmt, packed, pos)
    for perm in itertools.permutations(range(3)):
        r = t.transpose(perm)
        assert_values(r, d.transpose(perm))
        assert_meta(r, t, d.transpose(perm).shape, perm.index(b))
        # Codes (packed bytes included) and scales are moved, never recomputed.
        np.testing.assert_array_equal(bits(r.data), bits(t.data).transpose(perm))
        np.testing.assert_array_equal(sbytes(r), sbytes(t).transpose(perm))
    assert_leaves_equal(t.T, t.transpose(2, 1, 0))
    assert_leaves_equal(jaxmx.transpose(t), t.transpose((2, 1, 0)))
    assert_values(t.T, d.T)
    assert_values(t.swapaxes(0, 2), np.swapaxes(d, 0, 2))
    assert_values(jaxmx.swapaxes(t, -1, 1), np.swapaxes(d, -1, 1))
    assert_values(jaxmx.moveaxis(t, 0, -1), np.moveaxis(d, 0, -1))
    assert_values(jaxmx.moveaxis(t, (0, 1), (2, 0)), np.moveaxis(d, (0, 1), (2, 0)))
    assert_meta(jaxmx.moveaxis(t, b, 0), t, np.moveaxis(d, b, 0).shape, 0)


# --------------------------------------------------------------------------
# Reshape.
# --------------------------------------------------------------------------

# Shapes reachable without cutting a block: (partial-block tensor, whole-block tensor).
RESHAPES = {
    "first": (
        [(20, 12), (20, 2, 6), (20, 1, 3, 1, 4), (1, 20, 12)],
        [(32, 12), (4, 8, 3, 4), (2, 16, 12), (1, 32, 4, 3)],
    ),
    "middle": (
        [(3, 20, 2, 2), (1, 3, 20, 4), (3, 20, 4, 1)],
        [(96, 4), (3, 4, 8, 4), (3, 2, 16, 2, 2), (6, 16, 4), (1, 96, 4)],
    ),
    "last": (
        [(12, 20), (2, 6, 20), (3, 4, 1, 20), (1, 12, 20, 1)],
        [(3, 128), (384,), (3, 4, 4, 8), (12, 2, 16), (3, 4, 32, 1), (-1, 64)],
    ),
}
BAD_RESHAPES = {
    "first": ([(10, 24), (240,), (2, 10, 12)], [(384,), (8, 4, 12), (64, 6)]),
    "middle": ([(60, 4), (3, 80), (6, 10, 4)], [(3, 128), (3, 8, 4, 4), (3, 2, 64)]),
    "last": ([(3, 80), (3, 4, 2, 10), (240,)], [(3, 4, 8, 4), (3, 4, 16, 2), (12, 8, 4)]),
}


@params_b
def test_reshape(fmt, packed, pos):
    _skip_unpackable(fmt, packed)
    b = POS[pos]
    for which, shape in ((0, SHAPES[pos]), (1, WHOLE[pos])):
        t = handbuilt(fmt, shape, b, packed, seed=which)
        d = deq(t)
        for new in RESHAPES[pos][which]:
            r = t.reshape(new)
            ref = d.reshape(new)
            assert_values(r, ref)
            assert isinstance(r, MXTensor) and r.shape == ref.shape and r.packed == t.packed
            # The block axis holds whole blocks of the old one; codes as they were.
            np.testing.assert_array_equal(codes(r).reshape(-1), codes(t).reshape(-1))
            if r.length == t.length:
                np.testing.assert_array_equal(sbytes(r).reshape(-1), sbytes(t).reshape(-1))
        assert_leaves_equal(t.reshape(*RESHAPES[pos][which][0]), t.reshape(RESHAPES[pos][which][0]))
        assert_leaves_equal(
            jaxmx.reshape(t, RESHAPES[pos][which][1]), t.reshape(RESHAPES[pos][which][1])
        )
        for new in BAD_RESHAPES[pos][which]:
            with pytest.raises(ValueError, match="block axis must stay one axis"):
                t.reshape(new)


def test_reshape_bad_sizes():
    t = handbuilt("mxfp8_e4m3", (3, 4, 20), 2)
    with pytest.raises(ValueError, match="240 elements"):
        t.reshape(7, 20)
    with pytest.raises(ValueError, match="at most one -1"):
        t.reshape(-1, -1, 20)
    with pytest.raises(TypeError, match="shape of ints"):
        t.reshape((3.0, 80))


# --------------------------------------------------------------------------
# Indexing and take.
# --------------------------------------------------------------------------


def _index_cases(b):
    o0, o1 = [a for a in range(3) if a != b]

    def at(**kw):
        e = [slice(None)] * 3
        for k, v in kw.items():
            e[{"o0": o0, "o1": o1, "b": b}[k]] = v
        return tuple(e)

    return [
        at(o0=1),
        at(o0=-1, o1=slice(None, None, -2)),
        at(o0=slice(1, 3), o1=slice(0, 4, 2)),
        at(o0=np.array([2, 0, -1])),
        at(o0=jnp.array([[0, 1], [2, 0]]), o1=jnp.array([1, 2])),  # broadcast to (2, 2)
        at(o0=[0, 2], o1=1),
        at(b=slice(8, 16)),
        at(b=slice(8, None), o0=0),
        at(b=slice(0, 16), o1=np.array([1, 1])),
        at(b=slice(-4, None)),  # the partial last block
        (None, Ellipsis, None),
        at(o0=1)[: o0 + 1],  # trailing axes left out
        (Ellipsis, *at(o1=0)[o1:]),
    ]


@params
def test_getitem(fmt, packed, pos):
    b, t, d = _case(fmt, packed, pos)
    for idx in _index_cases(b):
        np_idx = tuple(np.asarray(e) if isinstance(e, jax.Array) else e for e in idx)
        r = t[idx]
        ref = d[np_idx]
        assert_values(r, ref)
        assert isinstance(r, MXTensor) and (r.format, r.packed) == (t.format, t.packed)
        np.testing.assert_array_equal(codes(r), codes(t)[np_idx])  # codes moved, not remade


@params_b
def test_getitem_block_axis_errors(fmt, packed, pos):
    _skip_unpackable(fmt, packed)
    b = POS[pos]
    t = handbuilt(fmt, SHAPES[pos], b, packed)

    def on_block(e):
        idx = [slice(None)] * 3
        idx[b] = e
        return tuple(idx)

    for e in (3, np.array([0, 1]), jnp.arange(8)):
        with pytest.raises(IndexError, match="would cut blocks apart"):
            t[on_block(e)]
    for e in (slice(3, 8), slice(0, 12), slice(0, 16, 2), slice(16, 8), slice(None, None, -1)):
        with pytest.raises(IndexError, match="does not keep blocks whole"):
            t[on_block(e)]
    with pytest.raises(TypeError, match="boolean"):
        t[True]
    with pytest.raises(TypeError, match="integers"):
        t[np.array([True, False, True])]
    with pytest.raises(TypeError, match="unsupported MXTensor index"):
        t[1.5]
    with pytest.raises(IndexError, match="too many indices"):
        t[0, 0, 0, 0]
    with pytest.raises(IndexError, match="single ellipsis"):
        t[..., 0, ...]


@params_b
def test_take(fmt, packed, pos):
    b, t, d = _case(fmt, packed, pos)
    for ax in (a for a in range(3) if a != b):
        n = d.shape[ax]
        ids = jnp.array([[n - 1, 0], [-1, 1], [n, -n - 2]])  # last row out of range
        for mode in (None, "clip", "wrap"):
            r = jaxmx.take(t, ids, axis=ax, mode=mode)
            ref = np.asarray(jnp.take(jnp.asarray(d), ids, axis=ax, mode=mode))
            assert_values(r, ref)
            shift = 1 if b > ax else 0
            assert_meta(r, t, ref.shape, b + shift)
        # Filled rows decode to NaN through their scale; their codes are zero.
        r = t.take(jnp.array([0, n + 3]), axis=ax)
        assert np.isnan(np.take(deq(r), 1, axis=ax)).all()
        assert not codes(r.take(jnp.array([1]), axis=ax)).any()
    # Whole blocks along the block axis (concrete indices), the partial one last.
    for sel in (np.r_[8:16, 0:8], np.r_[0:8, 16:20], np.r_[-12:-4, 8:16, -4:0]):
        r = jaxmx.take(t, sel, axis=b)
        ref = np.take(d, sel, axis=b)
        assert_values(r, ref)
        assert_meta(r, t, ref.shape, b, length=len(sel))
        np.testing.assert_array_equal(codes(r), np.take(codes(t), sel, axis=b))
    for sel, match in (
        (np.r_[1:9], "whole blocks"),
        (np.r_[16:20, 0:8], "whole blocks"),
        (np.r_[0:7], "whole blocks"),
        (np.array([[0]]), "1-D"),
        (np.array([0, 99]), "out of range"),
    ):
        with pytest.raises((ValueError, IndexError), match=match):
            jaxmx.take(t, sel, axis=b)
    with pytest.raises(TypeError, match="concrete indices"):
        jax.jit(lambda i: jaxmx.take(t, i, axis=b))(jnp.arange(8))
    with pytest.raises(ValueError, match="axis=None"):
        jaxmx.take(t, jnp.array([0]))
    with pytest.raises(ValueError, match="unknown take mode"):
        jaxmx.take(t, jnp.array([0]), axis=(b + 1) % 3, mode="nearest")


@pytest.mark.parametrize("fmt", covering(FORMATS, salt=1))
def test_embedding_lookup_under_jit(fmt):
    table = handbuilt(fmt, (11, 40), 1, packed=jaxmx.get_format(fmt).element.bits % 8 != 0)
    ids = jnp.array([[3, 10, 0], [7, 7, 1]])
    rows = jax.jit(lambda tb, i: jaxmx.take(tb, i, axis=0))(table, ids)
    assert_values(rows, deq(table)[np.asarray(ids)])
    assert rows.shape == (2, 3, 40) and rows.block_axis() == -1
    np.testing.assert_array_equal(bits(rows.data), bits(table.data)[np.asarray(ids)])


# --------------------------------------------------------------------------
# Concatenate and stack.
# --------------------------------------------------------------------------


@params
def test_concatenate_and_stack(fmt, packed, pos):
    _skip_unpackable(fmt, packed)
    b = POS[pos]
    t1 = handbuilt(fmt, SHAPES[pos], b, packed, seed=1)
    t2 = handbuilt(fmt, SHAPES[pos], b, packed, seed=2)
    d1, d2 = deq(t1), deq(t2)
    for ax in (a for a in range(3) if a != b):
        r = jaxmx.concatenate([t1, t2, t1], axis=ax)
        ref = np.concatenate([d1, d2, d1], axis=ax)
        assert_values(r, ref)
        assert_meta(r, t1, ref.shape, b)
        np.testing.assert_array_equal(
            bits(r.data), np.concatenate([bits(t1.data), bits(t2.data), bits(t1.data)], ax)
        )
    # Along the block axis: whole-block pieces first, a partial one last.
    w = handbuilt(fmt, WHOLE[pos], b, packed, seed=3)
    r = jaxmx.concatenate((w, w, t1), axis=b - 3)
    ref = np.concatenate([deq(w), deq(w), d1], axis=b)
    assert_values(r, ref)
    assert_meta(r, t1, ref.shape, b, length=84)
    np.testing.assert_array_equal(codes(r), np.concatenate([codes(w), codes(w), codes(t1)], axis=b))
    np.testing.assert_array_equal(
        sbytes(r), np.concatenate([sbytes(w), sbytes(w), sbytes(t1)], axis=b)
    )
    with pytest.raises(ValueError, match="ends inside a block"):
        jaxmx.concatenate([t1, w], axis=b)
    for ax in (0, 3, -1):
        r = jaxmx.stack([t1, t2], axis=ax)
        ref = np.stack([d1, d2], axis=ax)
        assert_values(r, ref)
        assert_meta(r, t1, ref.shape, b + (1 if ax % 4 <= b else 0))


def test_concatenate_errors():
    a = handbuilt("mxfp4_e2m1", (3, 4, 16), 2)
    with pytest.raises(ValueError, match="share format, block size, packing"):
        jaxmx.concatenate([a, handbuilt("mxfp6_e2m3", (3, 4, 16), 2)], axis=0)
    with pytest.raises(ValueError, match="share format, block size, packing"):
        jaxmx.concatenate([a, jaxmx.pack(a)], axis=0)
    with pytest.raises(ValueError, match="share format, block size, packing"):
        jaxmx.concatenate([a, handbuilt("mxfp4_e2m1", (3, 4, 16), 2, bs=4)], axis=0)
    with pytest.raises(ValueError, match="share format, block size, packing"):
        jaxmx.concatenate([a, handbuilt("mxfp4_e2m1", (3, 16, 4), 1)], axis=0)
    with pytest.raises(ValueError, match="block-axis lengths differ"):
        jaxmx.concatenate([a, handbuilt("mxfp4_e2m1", (3, 4, 24), 2)], axis=0)
    with pytest.raises(TypeError, match="quantize it first"):
        jaxmx.concatenate([a, jnp.zeros((3, 4, 16))], axis=0)
    with pytest.raises(TypeError, match="list or tuple"):
        jaxmx.concatenate(a)
    with pytest.raises(ValueError, match="at least one"):
        jaxmx.concatenate([])
    with pytest.raises(ValueError, match="one shape"):
        jaxmx.stack([a, a[:1]])
    c = jaxmx.concatenate([a.astype(jnp.bfloat16), a.astype(jnp.float16)], axis=0)
    assert c.dtype == np.float32  # promoted as jnp promotes


# --------------------------------------------------------------------------
# Signs and powers of two.
# --------------------------------------------------------------------------


@params_b
def test_negative_and_abs(fmt, packed, pos):
    b, t, d = _case(fmt, packed, pos)
    elem = t.format.element
    is_int = elem.kind == "int"
    n, a = -t, abs(t)
    assert_values(n, -d, int_zero=is_int)
    assert_values(a, np.abs(d))
    for r in (n, a, jaxmx.array_ops.negative(t), +t):
        assert_meta(r, t, d.shape, b)
        np.testing.assert_array_equal(sbytes(r), sbytes(t))  # scales untouched
    c = codes(t)
    if is_int:
        signed = c.astype(np.int32) - ((c >= elem.sign_bit) << elem.bits)
        np.testing.assert_array_equal(codes(n), (-signed) & ((1 << elem.bits) - 1))
    else:
        nan = nan_blocks(t)
        assert nan.any() and not codes(n)[nan].any()  # NaN-scale blocks keep zero codes
        np.testing.assert_array_equal(codes(n)[~nan], (c ^ elem.sign_bit)[~nan])
        np.testing.assert_array_equal(codes(a), c & (elem.sign_bit - 1))
    assert_leaves_equal(-n, t)  # negation is an involution on the leaves
    if packed:  # packed bytes (padding codes included) are exactly those of the unpacked result
        assert_leaves_equal(n, jaxmx.pack(-jaxmx.unpack(t)))
        assert_leaves_equal(a, jaxmx.pack(abs(jaxmx.unpack(t))))


@pytest.mark.parametrize("fmt", [f for f in FORMATS if jaxmx.get_format(f).element.kind == "int"])
@pytest.mark.parametrize("packed", [False, True])
def test_int_min_code_block_becomes_nan(fmt, packed):
    elem = jaxmx.get_format(fmt).element
    t = handbuilt(fmt, (5, 24), 1, packed, min_code=True, seed=4)
    c = codes(t)
    has_min = np.repeat((c == elem.sign_bit).reshape(5, 3, 8).any(-1), 8, axis=1)
    assert has_min.any() and not has_min.all()
    d = deq(t)
    for r, ref in ((-t, -d), (abs(t), np.abs(d))):
        assert_values(r, np.where(has_min, np.nan, ref), int_zero=True)
        assert not codes(r)[has_min].any()  # a NaN block's codes are zero


def _ldexp_reference(t, k):
    """float64 model: element values times 2^(e + k); NaN where no E8M0 scale holds it."""
    sf = t.format.scale
    u = jaxmx.unpack(t)
    ones = jnp.full(u.scale.shape, sf.bias, jnp.uint8)
    elems = deq(
        MXTensor(
            u.data,
            jax.lax.bitcast_convert_type(ones, sf.storage_dtype),
            u.format,
            u.axis,
            u.block_size,
            u.length,
            u.dtype,
        )
    ).astype(np.float64)
    b = t.ndim + t.block_axis()
    sb = sbytes(t).astype(np.int64)
    e = per_code(t, sb - sf.bias)
    zero_block = ~per_code(t, _blockwise_any(elems != 0, b, t))
    out = (e + k < sf.min_exponent) | (e + k > sf.max_exponent)
    ref = np.ldexp(elems, np.where(zero_block, 0, e + k))
    ref = np.where(nan_blocks(t) | (out & ~zero_block), np.nan, ref)
    with np.errstate(over="ignore"):  # beyond float32: Inf, as dequantize gives
        return ref.astype(np.float32)


def _blockwise_any(m, b, t):
    L, bs = t.length, t.block_size
    pad = [(0, 0)] * m.ndim
    pad[b] = (0, -(-L // bs) * bs - L)
    m = np.pad(m, pad)
    shp = m.shape[:b] + (-1, bs) + m.shape[b + 1 :]
    return m.reshape(shp).any(axis=b + 1)


@params
def test_ldexp_and_power_of_two_products(fmt, packed, pos):
    b, t, d = _case(fmt, packed, pos, seed=5)
    is_int = t.format.element.kind == "int"
    for k in (1, -3, 17, 120, -120, 254):
        r = t.ldexp(k)
        ref = _ldexp_reference(t, k)
        assert_values(r, ref)
        assert_meta(r, t, d.shape, b)
        gone = nan_blocks(r)  # NaN blocks, and blocks that left the scale range
        np.testing.assert_array_equal(codes(r)[~gone], codes(t)[~gone])  # codes untouched
        assert not codes(r)[gone].any()
    assert 0 < np.isnan(_ldexp_reference(t, 120)).mean() < 1  # some blocks left the range
    for c, k, sign in (
        (2.0, 1, 1),
        (0.25, -2, 1),
        (-4, 2, -1),
        (np.float32(-0.5), -1, -1),
        (jnp.float32(8.0), 3, 1),
    ):
        r = t * c
        ref = _ldexp_reference(t, k) * sign
        assert_values(r, ref, int_zero=is_int)
        assert_leaves_equal(c * t, r)
    assert_values(t / 4, _ldexp_reference(t, -2))
    assert_values(t / -0.5, -_ldexp_reference(t, 1), int_zero=is_int)
    # A traced exponent under jit.
    f = jax.jit(lambda u, k: u.ldexp(k))
    assert_leaves_equal(f(t, jnp.int32(-3)), t.ldexp(-3))
    assert_leaves_equal(f(t, jnp.int32(120)), t.ldexp(120))


def test_power_of_two_errors():
    t = handbuilt("mxfp8_e4m3", (3, 4, 20), 2)
    with pytest.raises(ValueError, match=r"\|k\| <= 254"):
        t.ldexp(255)
    with pytest.raises(ValueError, match=r"\|k\| <= 254"):
        jaxmx.ldexp(t, -300)
    for c in (3.0, 0.0, float("inf"), float("nan"), 0.3):
        with pytest.raises(ValueError, match="does not commute"):
            t * c
    with pytest.raises(TypeError, match="traced power of two"):
        jax.jit(lambda u, c: u * c)(t, 2.0)
    with pytest.raises(TypeError, match="scalar power of two"):
        t * jnp.ones(3)
    with pytest.raises(TypeError, match="two MXTensors"):
        t * t
    with pytest.raises(TypeError, match="integer"):
        t.ldexp(1.0)
    with pytest.raises(TypeError, match="integer"):
        t.ldexp(True)
    with pytest.raises(ValueError, match="does not commute"):
        t / 3


# --------------------------------------------------------------------------
# astype and dequantize.
# --------------------------------------------------------------------------


def test_astype_and_dequantize_method():
    x = jax.random.normal(jax.random.key(0), (4, 64)) * 100
    t = jaxmx.quantize(x, "mxfp8_e4m3")
    for dt in (jnp.bfloat16, jnp.float16, "float32"):
        u = t.astype(dt)
        assert u.dtype == np.dtype(dt) and u.data is t.data and u.scale is t.scale
        assert u.dequantize().dtype == np.dtype(dt)
        assert_values(u.astype(jnp.float32), deq(t))
        np.testing.assert_array_equal(bits(u.dequantize()), bits(jaxmx.dequantize(t, dt)))
    assert t.dequantize().dtype == np.float32
    assert t.dequantize(jnp.bfloat16).dtype == jnp.bfloat16
    for bad in ("mxfp4", jaxmx.get_format("mxint8"), "MXFP8_E4M3"):
        with pytest.raises(TypeError, match="requantize explicitly"):
            t.astype(bad)
    for bad in (jnp.int8, np.float64, None):
        with pytest.raises(TypeError, match="float32, bfloat16 or"):
            t.astype(bad)


def test_len_iter_and_non_tensor_inputs():
    t = handbuilt("mxfp6_e3m2", (3, 4, 20), 2, packed=True)
    assert len(t) == 3
    rows = list(t)
    assert len(rows) == 3 and all(isinstance(r, MXTensor) and r.shape == (4, 20) for r in rows)
    assert_values(rows[2], deq(t)[2])
    for fn in (jaxmx.transpose, jaxmx.reshape, jaxmx.ldexp):
        with pytest.raises(TypeError, match="expects an MXTensor"):
            fn(jnp.ones((2, 2)), 1)


# --------------------------------------------------------------------------
# quantize commutes with whole-block moves (made by quantize, not by hand).
# --------------------------------------------------------------------------


def _one_packing_each():
    """(format, packed) pairs: one packing per format by default (sub-byte
    formats alternate; 8-bit ones never pack), the other in make test-slow."""
    out = []
    for i, f in enumerate(FORMATS):
        sub_byte = jaxmx.get_format(f).element.bits % 8 != 0
        for p in (False, True) if sub_byte else (False,):
            fast = p == (i % 2 == 0 and sub_byte)
            out.append(pytest.param(f, p, marks=() if fast else pytest.mark.slow))
    return out


@pytest.mark.parametrize("fmt,packed", _one_packing_each())
def test_ops_commute_with_quantize(fmt, packed):
    key = jax.random.key(1)
    x = jax.random.normal(key, (6, 5, 64)) * jnp.exp2(jax.random.randint(key, (6, 5, 1), -8, 8))
    q = lambda v, axis=-1: jaxmx.quantize(v, fmt, axis=axis, block_size=16, packed=packed)  # noqa: E731
    t = q(x)
    ids = jnp.array([4, 0, 4])
    cases = [
        (t.T, q(x.T, axis=0)),
        (t.swapaxes(0, 1), q(x.swapaxes(0, 1))),
        (t.reshape(30, 2, 32), q(x.reshape(30, 2, 32))),
        (t.reshape(6, 320), q(x.reshape(6, 320))),
        (t[1:4, ::2, 16:48], q(x[1:4, ::2, 16:48])),
        (t.take(ids, axis=0), q(x[ids])),
        (jaxmx.take(t, np.r_[48:64, 0:16], axis=2), q(x[..., np.r_[48:64, 0:16]])),
        (jaxmx.concatenate([t, t[:, :, :32]], axis=-1), q(jnp.concatenate([x, x[:, :, :32]], -1))),
        (jaxmx.stack([t, t], axis=1), q(jnp.stack([x, x], 1))),
        (-t, q(-x)),
        (abs(t), q(jnp.abs(x))),
        (t * 0.125, q(x * 0.125)),
        (t.ldexp(5), q(x * 32)),
    ]
    for got, want in cases:
        assert_leaves_equal(got, want)
    # The quantized tensor really differs from x: these ops are not no-ops on floats.
    assert not np.array_equal(deq(t), np.asarray(x))


# --------------------------------------------------------------------------
# jit and vmap.
# --------------------------------------------------------------------------


def _pipeline(t, ids):
    u = jaxmx.moveaxis(t, -1, 0)[:16]  # blocks first, the first two blocks
    u = (-u).ldexp(2) * 0.5
    u = jaxmx.concatenate([u, abs(u)], axis=0)
    return jaxmx.take(u.reshape(32, -1).T, ids, axis=0)


@pytest.mark.parametrize("fmt,packed", _one_packing_each())
def test_under_jit(fmt, packed):
    _skip_unpackable(fmt, packed)
    t = handbuilt(fmt, (3, 4, 20), 2, packed)
    ids = jnp.array([11, 0, 5])
    eager = _pipeline(t, ids)
    jitted = jax.jit(_pipeline)(t, ids)
    assert_leaves_equal(jitted, eager)
    d = deq(t)
    ref = np.moveaxis(d, -1, 0)[:16] * -2.0
    ref = np.concatenate([ref, np.abs(ref)], 0).reshape(32, -1).T[np.asarray(ids)]
    assert_values(eager, ref, int_zero=t.format.element.kind == "int")


@pytest.mark.parametrize(
    "fmt,packed,in_axis",
    [
        # One (packing, mapped axis) per format by default, rotating.
        pytest.param(
            f,
            p,
            a,
            marks=()
            if (p == (i % 2 == 0 and jaxmx.get_format(f).element.bits % 8 != 0))
            and a == (0 if i % 4 < 2 else 2)
            and i % 2 == (i // 4) % 2
            else pytest.mark.slow,
        )
        for i, f in enumerate(FORMATS)
        for p in (False, True)
        for a in (0, 2)
    ],
)
def test_under_vmap(fmt, packed, in_axis):
    """vmap over an axis before or after the block axis (the stored axis goes stale)."""
    _skip_unpackable(fmt, packed)
    shape = (3, 20, 4)  # mapped over axis 0 (before the blocks) or 2 (after them)
    t = handbuilt(fmt, shape, shape.index(20), packed, seed=7)

    def other(u):  # the non-block axis of a rank-2 tensor
        return 1 if u.block_axis() == -2 else 0

    def blocks(u):
        return u.ndim + u.block_axis()

    def on_blocks(u, sl):
        return u[(sl, slice(None))[:: 1 if blocks(u) == 0 else -1]]

    ops = [
        lambda u: u.T,
        lambda u: -jaxmx.take(u, jnp.array([2, 0]), axis=other(u)),
        lambda u: abs(u).ldexp(-1),
        lambda u: jaxmx.concatenate([u, u[:1] if other(u) == 0 else u[:, :1]], axis=other(u)),
        lambda u: jaxmx.concatenate([on_blocks(u, slice(0, 16)), u], axis=blocks(u)),
        lambda u: on_blocks(u, slice(8, 16)),
        lambda u: jaxmx.stack([u, u], axis=-1),
        lambda u: u.reshape((1, *u.shape)),
    ]
    for i, op in enumerate(ops):
        for out_axis in ((0, -1)[i % 2],):
            got = jax.vmap(op, in_axes=in_axis, out_axes=out_axis)(t)
            rows = [op(_row(t, in_axis, i)) for i in range(t.shape[in_axis])]
            want = np.stack([deq(r) for r in rows], axis=out_axis)
            assert_values(got, want)
            assert isinstance(got, MXTensor) and got.packed == t.packed


def _row(t, ax, i):
    idx = [slice(None)] * t.ndim
    idx[ax] = i
    return t[tuple(idx)]


# --------------------------------------------------------------------------
# Packed codes whose blocks do not end on a byte: unpack, op, pack (exact).
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt,bs",
    covering(
        [(f, bs) for f in FORMATS if jaxmx.get_format(f).element.bits % 8 != 0 for bs in (3, 5, 6)],
        every=3,
    ),
)
def test_packed_blocks_off_byte_boundaries(fmt, bs):
    L = 4 * bs + 1
    t = handbuilt(fmt, (3, L), 1, packed=True, bs=bs, seed=8)
    u = jaxmx.unpack(t)
    w = handbuilt(fmt, (3, 4 * bs), 1, packed=True, bs=bs, seed=9)
    cases = [
        lambda v: v[:, bs : 3 * bs],
        lambda v: v[:, 2 * bs :],
        lambda v: jaxmx.take(v, np.r_[3 * bs : 4 * bs, 0:bs, 4 * bs : L], axis=1),
        lambda v: -v,
        lambda v: abs(v),
        lambda v: v.ldexp(-2),
        lambda v: v.ldexp(120),
        lambda v: jaxmx.concatenate([w if v.packed else jaxmx.unpack(w), v], axis=1),
        lambda v: v.reshape(1, 3, L),
    ]
    for op in cases:
        got = op(t)
        assert got.packed
        assert_leaves_equal(got, jaxmx.pack(op(u)))
    wu = jaxmx.unpack(w)
    assert_leaves_equal(w.reshape(3, 2, 2 * bs), jaxmx.pack(wu.reshape(3, 2, 2 * bs)))
    assert_values(w.reshape(6, 2 * bs), deq(w).reshape(6, 2 * bs))


@pytest.mark.parametrize("fmt", OTHERS)
def test_other_families_refuse_structural_ops_clearly(fmt):
    t = jaxmx.quantize(jnp.ones((16, 32), jnp.float32), fmt)
    for op in (
        lambda: t.T,
        lambda: t[0],
        lambda: -t,
        lambda: t * 2.0,
        lambda: t.reshape(32, 16),
        lambda: jaxmx.concatenate([t, t]),
        lambda: jaxmx.stack([t, t]),
    ):
        with pytest.raises(TypeError, match="Dequantize first"):
            op()
    # astype only relabels the dtype the codes stand for.
    assert t.astype(jnp.bfloat16).dequantize().dtype == jnp.bfloat16
