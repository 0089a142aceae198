"""quantize_rows_and_columns: both copies of a matrix from one kernel, the XLA path's bits.

The fused kernel (``jaxmx/pallas/_dual.py``) reads each tile of ``x`` once
and writes the codes and scales of two copies: blocks along the last axis
and blocks along the second-to-last. Each copy is compared bit for bit, in
both backends' interpreters on this CPU, with ``jaxmx.quantize(x, fmt,
axis=-1)`` and ``axis=-2`` (the XLA path, which tests/test_vectors.py and
tests/test_conformance.py check against independent references), so a
kernel that wrote nothing, or one copy's values into the other, fails. The
inputs hold the blocks the arithmetic distinguishes (NaN, +-Inf, zero,
float32 subnormal, huge, ordinary) along rows and along columns, and both
axes end in a partial block. The export tests lower the kernel for a TPU
and for a CUDA GPU; nothing here runs it on either.

Each interpreted program costs a compile of seconds, so the default run
gives each program one test that checks as much as it can (a format, a
backend, an input dtype and shape, and options per row); the cross
products are marked ``slow``.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmx
from jaxmx import platforms
from jaxmx.pallas import _dual
from jaxmx.spec import QuantSpec

BACKENDS = platforms.PALLAS_BACKENDS
MARKERS = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
OCP = [f for f in jaxmx.list_formats() if jaxmx.get_format(f).family == "ocp"]
KEY = jax.random.key(5)


def _matrix(shape, seed=0) -> np.ndarray:
    """float32 of ``shape`` whose blocks along rows and along columns each take every kind."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    m, k = shape[-2:]
    # Blocks of each magnitude: huge, float32 subnormal (2^-133, 2^-140),
    # tiny, ordinary. In the left half each row has its own (blocks along a
    # row), in the right half each column (blocks along a column).
    exps = np.array([0, -20, 24, 120, -133, -140, 3])
    scale = np.where(
        np.arange(k)[None, :] < k // 2,
        exps[np.arange(m) % 7][:, None],
        exps[np.arange(k) % 7][None, :],
    )
    x *= np.exp2(scale).astype(np.float32)
    mat = x.reshape(-1, m, k)
    # One NaN, +Inf and -Inf each, in blocks of their own along both axes;
    # a zero area with a signed zero; float32 extremes.
    mat[:, 1, 2] = np.nan
    mat[:, min(9, m - 1), min(40, k - 1)] = np.inf
    mat[:, min(33, m - 1), 5] = -np.inf
    if m > 72 and k > 82:  # a zero block along both axes: 32 x 32 at (32, 32)
        mat[:, 32:64, 32:64] = 0.0
        mat[:, 40, 40] = -0.0
        mat[:, 70, 80] = np.float32(3.4e38)
        mat[:, 71, 81] = np.float32(-1e-45)
    return x


X = jnp.asarray(_matrix((75, 100)))  # 3 x 4 blocks of 32, the last ones partial both ways


def _raw(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(np.dtype(f"uint{8 * a.dtype.itemsize}"))


def _assert_same_tensor(t, ref):
    """Same codes, scales and tensor scale (bits), and every field of the MXTensor."""
    assert jax.tree_util.tree_structure(t) == jax.tree_util.tree_structure(ref)
    for a, b in zip(jax.tree_util.tree_leaves(t), jax.tree_util.tree_leaves(ref), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(_raw(a), _raw(b))


def _both(backend, x, fmt, **kw):
    with jaxmx.pallas.interpret(backend):
        return jaxmx.pallas.quantize_rows_and_columns(x, fmt, implementation="pallas", **kw)


def _check(backend, x, fmt, **kw):
    """The kernel's copies against the XLA path's; returns the references."""
    rows, cols = _both(backend, x, fmt, **kw)
    ref_rows = jaxmx.quantize(x, fmt, axis=-1, **kw)
    ref_cols = jaxmx.quantize(x, fmt, axis=-2, **kw)
    _assert_same_tensor(rows, ref_rows)
    _assert_same_tensor(cols, ref_cols)
    assert (rows.axis, cols.axis) == (-1, -2)
    return ref_rows, ref_cols


def _reaches_every_block_kind(ref_rows, ref_cols):
    # Each copy has NaN scales, the zero block's 2^-127, and codes that are
    # not all zero; the two copies differ (blocks along other axes).
    for ref in (ref_rows, ref_cols):
        scales = _raw(ref.scale)
        assert (scales == 0xFF).sum() >= 3 and (scales == 0).any()
        assert np.count_nonzero(_raw(ref.data)) > 30  # MXINT2 has few nonzero codes
    assert (_raw(ref_rows.data) != _raw(ref_cols.data)).any()


# One program per row: a format, the backend that runs it, the input's dtype
# and shape, the options. Together: both backends, float32/bfloat16/float16,
# a batch of matrices, partial blocks along both axes, every scale rule on
# float and integer formats, every rounding (stochastic included), flushing,
# block sizes 16, 32 and 64, packed codes, NVFP4.
ROWS = [
    ("mxfp8_e4m3", "mosaic_tpu", "float32", (75, 100), {}),
    ("mxfp4_e2m1", "triton", "bfloat16", (2, 75, 100), dict(rounding="stochastic", packed=True)),
    ("mxint8", "triton", "float16", (75, 100), dict(scale_mode="ceil", flush_subnormals=True)),
    ("nvfp4", "mosaic_tpu", "float32", (80, 96), dict(tensor_amax=1e30)),
]
SLOW_ROWS = [
    ("mxfp8_e5m2", "triton", "float32", (75, 100), dict(scale_mode="rceil", block_size=16)),
    ("mxfp6_e3m2", "mosaic_tpu", "bfloat16", (75, 100), dict(scale_mode="ceil", packed=True)),
    ("mxfp6_e2m3", "triton", "float32", (130, 70), dict(rounding="nearest_away", block_size=64)),
    ("mxint4", "mosaic_tpu", "float16", (75, 100), dict(rounding="toward_zero", packed=True)),
    ("mxint2", "triton", "float32", (3, 40, 33), dict(scale_mode="rceil", rounding="stochastic")),
    ("nvfp4", "triton", "bfloat16", (80, 96), dict(rounding="stochastic")),
]


def _input(dtype: str, shape) -> jax.Array:
    x = jnp.asarray(_matrix(shape))
    if dtype != "float16":  # bfloat16 has float32's range (and subnormals)
        return x.astype(dtype)
    # float16's own range: its subnormals, its max, overflow to Inf.
    x = (x * 1e-3).astype(dtype)
    return x.at[..., 3, 4].set(65504.0).at[..., 7, 9].set(6e-8)


def _with_key(options: dict) -> dict:
    return options | (dict(key=KEY) if options.get("rounding") == "stochastic" else {})


def _ids(rows):
    return [
        f"{f}-{b}-{d}-{'x'.join(map(str, s))}-{'-'.join(o) or 'defaults'}" for f, b, d, s, o in rows
    ]


@pytest.mark.parametrize(
    "fmt, backend, dtype, shape, options",
    [*ROWS, *(pytest.param(*r, marks=pytest.mark.slow) for r in SLOW_ROWS)],
    ids=_ids(ROWS + SLOW_ROWS),
)
def test_both_copies_match_the_xla_path(fmt, backend, dtype, shape, options):
    x = _input(dtype, shape)
    if fmt == "nvfp4" and "tensor_amax" not in options:  # a NaN would make every scale NaN
        x = jnp.where(jnp.isnan(x), 1.0, x).astype(x.dtype)
    ref_rows, ref_cols = _check(backend, x, fmt, **_with_key(options))
    packed = bool(options.get("packed")) and jaxmx.get_format(fmt).packable
    assert ref_rows.packed == ref_cols.packed == packed
    if fmt == "nvfp4":  # NaN scales for the NaN's blocks only
        for ref in (ref_rows, ref_cols):
            nan = (_raw(ref.scale) & 0x7F) == 0x7F
            assert nan.any() == ("tensor_amax" in options) and not nan.all()
            assert np.count_nonzero(_raw(ref.data)) > 30
    elif dtype == "float32" and shape == X.shape and "block_size" not in options:
        _reaches_every_block_kind(ref_rows, ref_cols)
    if fmt == "nvfp4":
        return  # its options (tensor_amax, rounding) are reached above or change the draw
    # The options change the codes or scales: each row is a case of its own.
    plain = jaxmx.quantize(x, fmt, axis=-2, packed=packed)
    changed = (_raw(ref_cols.data) != _raw(plain.data)).any()
    assert changed or (_raw(ref_cols.scale) != _raw(plain.scale)).any() or not options


@pytest.mark.slow
@pytest.mark.parametrize("fmt", OCP)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_format_on_both_backends(backend, fmt):
    _reaches_every_block_kind(*_check(backend, X, fmt))


OPTIONS = [
    dict(scale_mode="rceil"),
    dict(scale_mode="ceil"),
    dict(scale_mode="even"),
    dict(rounding="nearest_away"),
    dict(rounding="toward_zero"),
    dict(rounding="stochastic"),
    dict(flush_subnormals=True),
    dict(block_size=2),
    dict(block_size=8),
    dict(block_size=64),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "options", OPTIONS, ids=[f"{k}={v}" for o in OPTIONS for k, v in o.items()]
)
def test_every_option(options):
    _check("triton", X, "mxfp4_e2m1", **_with_key(options))


NVFP4_CASES = {
    "nan-tensor": jnp.asarray(_matrix((48, 64))),  # a NaN: every scale is NaN
    "inf": jnp.asarray(np.nan_to_num(_matrix((48, 64)), nan=1.0, posinf=np.inf, neginf=-np.inf)),
    # amax about 2^-108: the family's exact integer form, with float32 subnormals.
    "tiny-tensor": (jax.random.normal(KEY, (32, 48)) * 2.0**-110).at[1, :5].set(1e-40),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(NVFP4_CASES))
def test_nvfp4_shares_its_tensor_scale(case):
    ref_rows, ref_cols = _check("triton", NVFP4_CASES[case], "nvfp4")
    np.testing.assert_array_equal(_raw(ref_rows.tensor_scale), _raw(ref_cols.tensor_scale))
    scales = _raw(ref_cols.scale)
    if case == "nan-tensor":
        assert ((scales & 0x7F) == 0x7F).all()
    elif case == "inf":
        assert (scales == 0x7E).any()  # the Inf's block: scale 448
    else:
        assert float(ref_rows.tensor_scale) < 2.0**-115


# Tiles (g, tk) smaller than the matrix along both axes, the last ones partial
# (6 groups of 4 rows; 35 and 12 blocks of 4 in a row).
SMALL_TILES = {"mosaic_tpu": ((23, 139), (4, 32)), "triton": ((23, 45), (4, 8))}


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_tiles_along_both_axes_with_partial_last_ones(backend, monkeypatch):
    shape, (g, tk) = SMALL_TILES[backend]
    mb, kb = -(-shape[0] // 4), -(-shape[1] // 4)
    assert mb % g and kb % tk and shape[0] % 4 and shape[1] % 4
    monkeypatch.setattr(_dual, "tiles", lambda *args: (g, tk))
    x = jnp.asarray(_matrix(shape, seed=3))
    ref_rows, ref_cols = _check(backend, x, "mxfp8_e5m2", block_size=4)
    assert (_raw(ref_cols.scale) == 0xFF).any() and (_raw(ref_rows.scale) == 0).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bs", [2, 16, 32, 64])
@pytest.mark.parametrize("mb, kb", [(1, 1), (3, 7), (40, 33), (1000, 300)])
def test_tiles_meet_each_backends_constraints(backend, bs, mb, kb):
    g, tk = _dual.tiles(backend, mb, kb, bs)
    assert 1 <= g and 1 <= tk <= max(kb, 1 << (kb - 1).bit_length())
    assert g * bs * tk * bs <= max(_dual.TILE_ELEMENTS[backend], bs * bs * 32)
    if backend == "mosaic_tpu":  # all of an axis, or whole (32, 128)-tiles of 8-bit arrays
        assert g <= mb and (tk == kb or tk % 32 == 0)
    else:  # powers of two
        assert g & (g - 1) == 0 and tk & (tk - 1) == 0


def test_the_copies_may_differ_in_format_rounding_and_random_bits():
    # What a training step asks for: the forward's copy and the backward's
    # with their own options and random bits (jaxmx's ops draw them per role).
    x = X.astype(jnp.bfloat16)
    rows = QuantSpec.make("mxfp8_e4m3", 2, axis=-1)
    cols = QuantSpec.make("mxfp8_e5m2", 2, axis=-2, rounding="stochastic", scale_mode="rceil")
    r_cols = jax.random.bits(KEY, x.shape, jnp.uint32)
    with jaxmx.pallas.interpret("triton"):
        t_rows, t_cols = _dual.rows_and_columns(x, None, r_cols, None, (rows, cols), "pallas")
    _assert_same_tensor(t_rows, jaxmx.quantize(x, "mxfp8_e4m3"))
    ref = jaxmx.quantize(
        x, "mxfp8_e5m2", axis=-2, rounding="stochastic", scale_mode="rceil", key=KEY
    )
    _assert_same_tensor(t_cols, ref)


def test_the_xla_implementation_is_two_quantize_calls():
    for impl in (None, "xla"):
        rows, cols = jaxmx.pallas.quantize_rows_and_columns(X, "mxfp6", implementation=impl)
        _assert_same_tensor(rows, jaxmx.quantize(X, "mxfp6"))
        _assert_same_tensor(cols, jaxmx.quantize(X, "mxfp6", axis=-2))


def test_it_is_not_differentiable():
    def f(x):
        rows, _ = jaxmx.pallas.quantize_rows_and_columns(x, "mxfp8")
        return rows.data.astype(jnp.float32).sum()

    with pytest.raises(TypeError, match="quantize_rows_and_columns is not differentiable"):
        jax.grad(f)(X)


# --------------------------------------------------------------------------
# What is refused, with a message naming what is allowed.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x, fmt, kwargs, error, message",
    [
        (X[0], "mxfp8", {}, ValueError, r"takes a matrix \(rank >= 2.*got rank 1"),
        (X[:, :64], "nvfp4", dict(block_size=(16, 16)), ValueError, r"2-D tiles.*jaxmx.quantize"),
        (X, "mxfp8", dict(block_size=128), ValueError, r"power of two from 2 to 64.*'xla' takes"),
        (X, "mxfp8", dict(block_size=24), ValueError, r"powers of two from 2 to 1024"),
        (X, "mx6", {}, ValueError, r"cover the families nvfp4, ocp; mx6 is of family"),
        (X[:64, :70], "nvfp4", {}, ValueError, "NVFP4 has no partial blocks"),
        (X, "mxfp8", dict(rounding="stochastic"), ValueError, "needs a PRNG key"),
        (X.astype(jnp.int32), "mxfp8", {}, TypeError, "integer dtype int32"),
        (X, "mxfp8", dict(implementation="mosaic"), ValueError, "unknown implementation 'mosaic'"),
    ],
    ids=["rank-1", "tiles", "block-128", "block-24", "mx6", "nvfp4-part", "no-key", "int", "impl"],
)
def test_what_is_not_taken_is_refused(x, fmt, kwargs, error, message):
    kwargs = dict(implementation="pallas") | kwargs
    with pytest.raises(error, match=message), jaxmx.pallas.interpret("triton"):
        jaxmx.pallas.quantize_rows_and_columns(x, fmt, **kwargs)


def test_the_cpu_refuses_the_kernel_and_says_what_to_do():
    with pytest.raises(
        ValueError,
        match=r"no kernel for platform 'cpu'.*cuda, tpu.*implementation='xla'.*interpret",
    ):
        jaxmx.pallas.quantize_rows_and_columns(X, "mxfp8", implementation="pallas")


# --------------------------------------------------------------------------
# Lowering for the accelerators, on this host.
# --------------------------------------------------------------------------


def _leaves(x, fmt="mxfp4", impl="pallas", **kw):
    rows, cols = jaxmx.pallas.quantize_rows_and_columns(x, fmt, implementation=impl, **kw)
    return rows.data, rows.scale, cols.data, cols.scale


def test_exports_for_a_tpu_as_one_mosaic_kernel():
    exp = jax.export.export(jax.jit(_leaves), platforms=["tpu"])(X)
    text = exp.mlir_module()
    assert text.count("tpu_custom_call") == 1  # both copies from one kernel
    assert "__gpu$xla.gpu.triton" not in text


def test_lowers_for_a_cuda_gpu_as_one_triton_kernel():
    text = jax.jit(_leaves).trace(X).lower(lowering_platforms=("cuda",)).as_text()
    assert len(re.findall(r"custom_call @__gpu\$xla\.gpu\.triton", text)) == 1
    assert "tpu_custom_call" not in text


def test_the_default_lowers_no_kernel():
    # No kernel has run on hardware yet, so None must not choose one anywhere.
    f = lambda x: _leaves(x, impl=None)  # noqa: E731
    text = jax.jit(f).trace(X).lower(lowering_platforms=("tpu", "cuda")).as_text()
    assert not any(marker in text for marker in MARKERS.values())


LOWERING = [
    ("mxfp8_e4m3", jnp.bfloat16, dict(rounding="stochastic", key=KEY)),
    ("mxint8", jnp.float16, dict(flush_subnormals=True, scale_mode="rceil", block_size=16)),
    ("nvfp4", jnp.float32, dict(tensor_amax=3.0)),
]


@pytest.mark.parametrize(
    "fmt, dtype, options",
    [pytest.param(*c, marks=() if c[0] == "nvfp4" else pytest.mark.slow) for c in LOWERING],
    ids=[c[0] for c in LOWERING],
)
def test_lowers_for_a_tpu_and_a_cuda_gpu_at_once(fmt, dtype, options):
    # Lowering runs each backend's rules over the whole body: an operation
    # the backend lacks fails here.
    x = X[:64, :96].astype(dtype)
    lowered = jax.jit(lambda x: _leaves(x, fmt, **options)).trace(x)
    text = lowered.lower(lowering_platforms=("tpu", "cuda")).as_text()
    assert all(marker in text for marker in MARKERS.values())


@pytest.mark.slow
def test_under_vmap():
    # A batch of matrices by vmap: the kernel gains a grid axis.
    x = jnp.asarray(_matrix((3, 40, 70), seed=4))
    f = lambda m: jaxmx.pallas.quantize_rows_and_columns(m, "mxfp8", implementation="pallas")  # noqa: E731
    with jaxmx.pallas.interpret("triton"):
        rows, cols = jax.vmap(f)(x)
    _assert_same_tensor(cols, jax.vmap(lambda m: jaxmx.quantize(m, "mxfp8", axis=-2))(x))
    _assert_same_tensor(rows, jax.vmap(lambda m: jaxmx.quantize(m, "mxfp8"))(x))
