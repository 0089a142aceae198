"""The Pallas kernels give the XLA path's bits, checked in Pallas's interpreters on this CPU.

Each kernel runs through the interpreter of its backend (``mosaic_tpu``:
the TPU interpreter with its race detector; ``triton``: the generic one)
and its codes, scales and fake-quantized values are compared bit for bit
with ``implementation="xla"``, which tests/test_vectors.py and
tests/test_conformance.py check against independent references. The
inputs hold every kind of block the arithmetic distinguishes: NaN, +-Inf,
zero, float32 subnormal, huge and ordinary blocks, and a partial last
block. The export tests lower the kernels for a TPU and for a CUDA GPU on
this host; nothing here compiles or runs them on either.

Each interpreted kernel costs a compile of seconds, so the default run gives
each program one test that checks as much as it can: every format runs once,
on one backend, with its own combination of scale rule, rounding, block size
and storage, so that together they cover every backend, scale rule (on float
and integer formats), rounding, axis, input dtype and kind of block. The
full cross products (every format on both backends, every option on MXFP4,
one NVFP4 case per program) are marked ``slow`` (``make test-slow``).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmx
from jaxmx import platforms
from jaxmx.pallas import _bits, _call
from tests._arrays import pallas_calls

BACKENDS = platforms.PALLAS_BACKENDS
# What a kernel lowers to: Mosaic's custom call on a TPU, Triton's on CUDA.
MARKERS = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
OCP = [f for f in jaxmx.list_formats() if jaxmx.get_format(f).family == "ocp"]


def _special_rows(shape, seed=0) -> np.ndarray:
    """float32 rows, each of its own magnitude, with NaN/Inf/zero/subnormal blocks."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    rows = x.reshape(-1, shape[-1])
    exps = [0, -20, 24, 120, -133, -140, 3]
    for i in range(rows.shape[0]):
        rows[i] *= np.float32(2.0 ** exps[i % len(exps)])
    flat = rows.reshape(-1)
    n = flat.size
    # A NaN, +Inf and -Inf each in its own block; a zero block; signed zeros;
    # float32 extremes.
    flat[min(5, n - 1)] = np.nan
    if n > 40:
        flat[40] = np.inf
    if n > 75:
        flat[75] = -np.inf
    if n > 160:
        flat[128:160] = 0.0
        flat[130] = -0.0
    if n > 200:
        flat[190] = np.float32(3.4e38)
        flat[191] = np.float32(-1e-45)
    return rows.reshape(shape)


X = jnp.asarray(_special_rows((7, 77)))  # 3 blocks per row, the last one partial


def _raw(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(np.dtype(f"uint{8 * a.dtype.itemsize}"))


def _assert_same_tensor(t, ref):
    assert t.data.dtype == ref.data.dtype and t.data.shape == ref.data.shape
    assert t.scale.dtype == ref.scale.dtype and t.scale.shape == ref.scale.shape
    np.testing.assert_array_equal(_raw(t.data), _raw(ref.data))
    np.testing.assert_array_equal(_raw(t.scale), _raw(ref.scale))
    assert (t.axis, t.block_size, t.length, t.packed) == (
        ref.axis,
        ref.block_size,
        ref.length,
        ref.packed,
    )


def _pallas(fn, backend, x, fmt, **kw):
    with jaxmx.pallas.interpret(backend):
        return fn(x, fmt, implementation="pallas", **kw)


# Each row is one program per backend: a format, the backend that runs it and
# the options it runs with. Together: every format, both backends, every scale
# rule on float and integer formats, every rounding, flushing, block sizes 16,
# 32 and 64 (each with a partial last block), packed codes.
KEY = jax.random.key(3)
ROWS = [
    ("mxfp8_e4m3", "mosaic_tpu", {}),
    ("mxfp8_e5m2", "triton", dict(scale_mode="rceil", rounding="toward_zero")),
    ("mxfp6_e3m2", "mosaic_tpu", dict(scale_mode="ceil", rounding="nearest_away", packed=True)),
    ("mxfp6_e2m3", "triton", dict(scale_mode="even", rounding="stochastic", block_size=16)),
    ("mxfp4_e2m1", "triton", dict(flush_subnormals=True, block_size=64, packed=True)),
    ("mxint8", "mosaic_tpu", dict(scale_mode="even", rounding="stochastic")),
    ("mxint8", "triton", {}),
    ("mxint4", "triton", dict(scale_mode="ceil", rounding="toward_zero", packed=True)),
    ("mxint2", "mosaic_tpu", dict(scale_mode="rceil", rounding="nearest_away")),
]


def _with_key(options: dict) -> dict:
    """A copy of ``options``, with the key that stochastic rounding needs."""
    return options | (dict(key=KEY) if options.get("rounding") == "stochastic" else {})


@pytest.mark.parametrize(
    "fmt, backend, options",
    ROWS,
    ids=[f"{f}-{b}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'defaults'}" for f, b, o in ROWS],
)
def test_each_format_matches_the_xla_path(fmt, backend, options):
    kw = _with_key(options)
    ref = jaxmx.quantize(X, fmt, **kw)
    _assert_same_tensor(_pallas(jaxmx.quantize, backend, X, fmt, **kw), ref)
    assert ref.packed == bool(options.get("packed"))
    kw.pop("packed", None)
    ref_fake = jaxmx.fake_quantize(X, fmt, **kw)
    out = _pallas(jaxmx.fake_quantize, backend, X, fmt, **kw)
    assert out.dtype == ref_fake.dtype
    np.testing.assert_array_equal(_raw(out), _raw(ref_fake))
    # The input reaches every case: NaN scales (NaN, +Inf, -Inf; two may
    # share a block of 64), the zero block's 2^-127, codes that are not all
    # zero, values that round; and the options change the values.
    scales = _raw(ref.scale)
    assert (scales == 0xFF).sum() >= 2 and (scales == 0).any()
    assert np.count_nonzero(_raw(ref.data)) > 30  # MXINT2 has few nonzero codes
    finite = np.isfinite(np.asarray(X))
    assert (np.asarray(ref_fake)[finite] != np.asarray(X)[finite]).any()
    if kw:
        assert (_raw(ref_fake) != _raw(jaxmx.fake_quantize(X, fmt))).any(), options


@pytest.mark.slow
@pytest.mark.parametrize("fmt", OCP)
@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_matches_the_xla_path(backend, fmt):
    ref = jaxmx.quantize(X, fmt)
    t = _pallas(jaxmx.quantize, backend, X, fmt)
    _assert_same_tensor(t, ref)
    # The input reaches every case: NaN scales, the zero block's 2^-127, codes
    # that are not all zero.
    scales = _raw(ref.scale)
    assert (scales == 0xFF).sum() >= 3 and (scales == 0).any()
    assert np.count_nonzero(_raw(ref.data)) > 50


@pytest.mark.slow
@pytest.mark.parametrize("fmt", OCP)
def test_fake_quantize_matches_the_xla_path(fmt):
    # The body is the backends' shared one; the tiling is checked by quantize.
    ref = jaxmx.fake_quantize(X, fmt)
    out = _pallas(jaxmx.fake_quantize, "triton", X, fmt)
    assert out.dtype == ref.dtype
    np.testing.assert_array_equal(_raw(out), _raw(ref))
    finite = np.isfinite(np.asarray(X))
    assert (np.asarray(ref)[finite] != np.asarray(X)[finite]).any()  # it rounds


OPTIONS = [
    dict(scale_mode="rceil"),
    dict(scale_mode="ceil"),
    dict(scale_mode="even"),
    dict(rounding="nearest_away"),
    dict(rounding="toward_zero"),
    dict(rounding="stochastic", key=jax.random.key(3)),
    dict(flush_subnormals=True),
    dict(block_size=16),
    dict(block_size=64),
]


# The scale rules against an integer format too (its emax and "even" rule differ).
OPTION_CASES = [("mxfp4_e2m1", o) for o in OPTIONS] + [
    ("mxint8", o) for o in OPTIONS if "scale_mode" in o
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "fmt, options",
    OPTION_CASES,
    ids=[f"{f}-{'-'.join(o)}-{next(iter(o.values()))}" for f, o in OPTION_CASES],
)
def test_every_scale_rule_rounding_and_block_size(fmt, options):
    # The kernel body is the same for both backends; the faster interpreter runs it.
    ref = jaxmx.quantize(X, fmt, **options)
    _assert_same_tensor(_pallas(jaxmx.quantize, "triton", X, fmt, **options), ref)
    ref = jaxmx.fake_quantize(X, fmt, **options)
    out = _pallas(jaxmx.fake_quantize, "triton", X, fmt, **options)
    np.testing.assert_array_equal(_raw(out), _raw(ref))


@pytest.mark.slow
def test_the_options_change_the_result():
    # Each option above is a case of its own: its codes differ from the defaults'.
    base = _raw(jaxmx.quantize(X, "mxfp4_e2m1").data)
    for options in OPTIONS:
        if "block_size" in options:
            continue
        t = jaxmx.quantize(X, "mxfp4_e2m1", **options)
        assert (_raw(t.data) != base).any() or (_raw(t.scale) != 0).any(), options


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["mxfp4_e2m1", "mxfp6_e3m2", "mxint4"])
def test_packed_codes(fmt):
    ref = jaxmx.quantize(X, fmt, packed=True)
    t = _pallas(jaxmx.quantize, "triton", X, fmt, packed=True)
    assert t.packed
    _assert_same_tensor(t, ref)


def _fast_first(cases, fast):
    """``cases`` as pytest params, those not in ``fast`` marked slow."""
    return [pytest.param(*c, marks=() if c in fast else pytest.mark.slow) for c in cases]


AXIS_CASES = [(b, a, s) for b in BACKENDS for a, s in [(0, (45, 7)), (1, (2, 33, 5))]]


@pytest.mark.parametrize(
    "backend, axis, shape",
    _fast_first(AXIS_CASES, [("mosaic_tpu", 0, (45, 7)), ("triton", 1, (2, 33, 5))]),
)
def test_blocks_along_another_axis(backend, axis, shape):
    # The special rows become the blocks along axis (the last one partial):
    # each block of its own magnitude, subnormal ones included.
    moved = shape[:axis] + shape[axis + 1 :] + (shape[axis],)
    x = jnp.moveaxis(jnp.asarray(_special_rows(moved, seed=1)), -1, axis)
    ref = jaxmx.quantize(x, "mxfp8", axis=axis)
    assert (_raw(ref.scale) == 0xFF).any() and (_raw(ref.scale) == 0).any()
    _assert_same_tensor(_pallas(jaxmx.quantize, backend, x, "mxfp8", axis=axis), ref)


DTYPE_CASES = [
    (b, d, f)
    for b in BACKENDS
    for d in ("bfloat16", "float16")
    for f in ("mxfp8_e4m3", "mxfp4_e2m1")
]


@pytest.mark.parametrize(
    "backend, dtype, fmt",
    _fast_first(
        DTYPE_CASES, [("mosaic_tpu", "float16", "mxfp8_e4m3"), ("triton", "bfloat16", "mxfp4_e2m1")]
    ),
)
def test_bfloat16_and_float16_input(backend, dtype, fmt):
    # bfloat16 has float32's range: the subnormal rows are bfloat16 subnormals.
    dtype = jnp.dtype(dtype)
    x = jnp.asarray(_special_rows((6, 40), seed=2)).astype(dtype)
    if dtype == jnp.float16:  # float16's own range: its subnormals, its max, overflow to Inf
        x = (x * 1e-3).astype(dtype).at[0, 3].set(65504.0).at[1, 7].set(6e-8)
    _assert_same_tensor(_pallas(jaxmx.quantize, backend, x, fmt), jaxmx.quantize(x, fmt))
    out = _pallas(jaxmx.fake_quantize, backend, x, fmt)
    assert out.dtype == dtype
    np.testing.assert_array_equal(_raw(out), _raw(jaxmx.fake_quantize(x, fmt)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_row_tiles_with_a_partial_last_one(backend):
    # More blocks than one tile holds; the last tile runs past the last row.
    rows = _call.TILE_ROWS[backend] + 37
    x = jnp.asarray(_special_rows((rows, 32), seed=4))
    assert _call.tile_rows(backend, rows) < rows and rows % _call.tile_rows(backend, rows)
    ref = jaxmx.quantize(x, "mxfp8_e5m2")
    _assert_same_tensor(_pallas(jaxmx.quantize, backend, x, "mxfp8_e5m2"), ref)


def test_triton_calls_see_whole_tiles():
    # Pallas's Triton lowering does not mask a block that runs past the end
    # of an array (the interpreter pads, a GPU would read and write out of
    # bounds), so jaxmx pads the rows to whole tiles before the call.
    rows = _call.TILE_ROWS["triton"] + 37
    x = jnp.ones((rows, 32))

    def calls(backend):
        with jaxmx.pallas.interpret(backend):
            jaxpr = jax.make_jaxpr(lambda x: jaxmx.quantize(x, "mxfp8", implementation="pallas"))(x)
        return [v.aval.shape[0] for e in pallas_calls(jaxpr.jaxpr) for v in (*e.invars, *e.outvars)]

    tile = _call.tile_rows("triton", rows)
    shapes = calls("triton")
    assert shapes and all(r % tile == 0 for r in shapes), shapes


def test_bits_in_and_out_of_a_kernel_match_xla_on_every_16_bit_pattern():
    from jaxmx import numerics

    # Jitted: one compile each instead of one dispatch per operation.
    f32_bits = jax.jit(_bits.f32_bits, static_argnums=1)
    narrow = jax.jit(_bits.narrow, static_argnums=1)
    xla_wide = jax.jit(
        lambda v, dtype: numerics.f32_to_bits(jax.lax.bitcast_convert_type(v, dtype)),
        static_argnums=1,
    )
    xla_narrow = jax.jit(
        lambda b, dtype: jax.lax.bitcast_convert_type(numerics.bits_to_dtype(b, dtype), jnp.uint16),
        static_argnums=1,
    )
    v = jnp.arange(1 << 16, dtype=jnp.uint32).astype(jnp.uint16)
    for dtype in (jnp.bfloat16, jnp.float16):
        wide = f32_bits(v, dtype)
        ref = xla_wide(v, dtype)
        finite = (ref & 0x7FFFFFFF) <= 0x7F800000  # NaN payloads may differ; NaN stays NaN
        np.testing.assert_array_equal(np.asarray(wide)[finite], np.asarray(ref)[finite])
        assert bool(((wide & 0x7FFFFFFF) > 0x7F800000)[~finite].all())
    # Narrowing: every float16/bfloat16 value, the float32 patterns next to it
    # and the ties halfway between neighbours, and random patterns.
    rng = np.random.default_rng(0)
    for dtype in (jnp.bfloat16, jnp.float16):
        base = np.asarray(xla_wide(v, dtype))
        base = base[(base & 0x7FFFFFFF) < 0x7F800000]
        step = np.uint32(1 << 13) if dtype == jnp.float16 else np.uint32(1 << 16)
        cand = np.concatenate(
            [base, base + 1, base - 1, base + step // 2, base + step // 2 + 1,
             rng.integers(0, 1 << 32, 1 << 18, dtype=np.uint64).astype(np.uint32)]
        )  # fmt: skip
        cand = cand[(cand & 0x7FFFFFFF) <= 0x7F800000]  # finite and Inf (kernels make no NaN)
        bits = jnp.asarray(cand)
        got = narrow(bits, dtype)
        want = xla_narrow(bits, dtype)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_gradient_and_vmap():
    with jaxmx.pallas.interpret("triton"):
        g = jax.grad(lambda x: jaxmx.fake_quantize(x, "mxfp4", implementation="pallas").sum())(X)
        batched = jax.vmap(lambda r: jaxmx.quantize(r, "mxfp8", implementation="pallas"))(X)
    np.testing.assert_array_equal(np.asarray(g), np.ones(X.shape))  # straight through
    ref = jax.vmap(lambda r: jaxmx.quantize(r, "mxfp8"))(X)
    np.testing.assert_array_equal(_raw(batched.data), _raw(ref.data))
    np.testing.assert_array_equal(_raw(batched.scale), _raw(ref.scale))


# --------------------------------------------------------------------------
# NVFP4: TransformerEngine's chain, a tensor scale computed before the kernel.
# --------------------------------------------------------------------------

X16 = jnp.asarray(_special_rows((7, 80)))  # holds a NaN: every scale is NaN
X16_FINITE = jnp.where(jnp.isnan(X16), 1.0, X16)
NVFP4_CASES = {
    "nan-tensor": (X16, {}),
    "nan-block": (X16, dict(tensor_amax=100.0)),
    "inf": (X16_FINITE, {}),
    # amax about 2^-108: the family's exact integer form, with float32 subnormals.
    "tiny-tensor": (
        (jax.random.normal(jax.random.key(6), (4, 64)) * 2.0**-110).at[1, :5].set(1e-40),
        {},
    ),
    "stochastic": (X16_FINITE, dict(rounding="stochastic", key=jax.random.key(2))),
    "bfloat16-axis0": (X16_FINITE[:, :64].T.astype(jnp.bfloat16), dict(axis=0)),
}


def _assert_same_nans(out, ref):
    """Bit-identical, except that NaNs need only be NaN in the same places."""
    a, b = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    keep = ~np.isnan(b)
    np.testing.assert_array_equal(_raw(np.asarray(out))[keep], _raw(np.asarray(ref))[keep])


TINY = (jax.random.normal(jax.random.key(6), (7, 80)) * 2.0**-110).at[1, :5].set(1e-40)
# One program per backend, each run over several tensors of one shape (the
# tensor scale is per tensor, so the cases cannot share one call). With what
# each tensor must reach.
NVFP4_PROGRAMS = {
    "triton-float32-stochastic": (
        "triton",
        dict(rounding="stochastic", key=jax.random.key(2)),
        {"nan-tensor": X16, "inf": X16_FINITE, "tiny-tensor": TINY},
    ),
    "mosaic_tpu-bfloat16-axis0-tensor_amax": (
        "mosaic_tpu",
        dict(axis=0, tensor_amax=100.0),
        {"nan-block": X16.T.astype(jnp.bfloat16)},
    ),
}


def _nvfp4_reaches(case, t) -> bool:
    scales = _raw(t.scale)
    nan_blocks = (scales & 0x7F) == 0x7F
    if case == "nan-tensor":
        return bool(nan_blocks.all())
    if case == "nan-block":
        return bool(nan_blocks.any() and not nan_blocks.all())
    if case == "inf":
        return bool((scales == 0x7E).any())  # the Inf's block: scale 448
    assert case == "tiny-tensor"  # amax about 2^-108: the family's exact integer form
    return float(t.tensor_scale) < 2.0**-115  # below the family's float form's bound


@pytest.mark.parametrize("program", sorted(NVFP4_PROGRAMS))
def test_nvfp4_matches_the_xla_path(program):
    backend, kw, inputs = NVFP4_PROGRAMS[program]
    for case, x in inputs.items():
        ref = jaxmx.quantize(x, "nvfp4", **kw)
        assert _nvfp4_reaches(case, ref), case
        t = _pallas(jaxmx.quantize, backend, x, "nvfp4", **kw)
        _assert_same_tensor(t, ref)
        np.testing.assert_array_equal(_raw(t.tensor_scale), _raw(ref.tensor_scale))
        out = _pallas(jaxmx.fake_quantize, backend, x, "nvfp4", **kw)
        _assert_same_nans(out, jaxmx.fake_quantize(x, "nvfp4", **kw))


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(NVFP4_CASES))
def test_nvfp4_case_by_case(case):
    x, kw = NVFP4_CASES[case]
    # The TPU interpreter is the slower one: it runs one case, Triton's the rest.
    backend = "mosaic_tpu" if case == "nan-block" else "triton"
    ref = jaxmx.quantize(x, "nvfp4", **kw)
    t = _pallas(jaxmx.quantize, backend, x, "nvfp4", **kw)
    _assert_same_tensor(t, ref)
    np.testing.assert_array_equal(_raw(t.tensor_scale), _raw(ref.tensor_scale))
    out = _pallas(jaxmx.fake_quantize, backend, x, "nvfp4", **kw)
    _assert_same_nans(out, jaxmx.fake_quantize(x, "nvfp4", **kw))


@pytest.mark.slow
def test_nvfp4_cases_reach_what_they_name():
    scales = {c: _raw(jaxmx.quantize(x, "nvfp4", **kw).scale) for c, (x, kw) in NVFP4_CASES.items()}
    assert ((scales["nan-tensor"] & 0x7F) == 0x7F).all()
    nan_blocks = (scales["nan-block"] & 0x7F) == 0x7F
    assert nan_blocks.any() and not nan_blocks.all()
    assert (scales["inf"] == 0x7E).any()  # the Inf's block: scale 448
    t = jaxmx.quantize(NVFP4_CASES["tiny-tensor"][0], "nvfp4")
    assert float(t.tensor_scale) < 2.0**-115  # below the family's float form's bound


def test_nvfp4_refusals_name_what_is_allowed():
    with pytest.raises(ValueError, match=r"not 2-D tiles; got block_size=\(16, 16\)"):
        jaxmx.quantize(X16[:, :64], "nvfp4", block_size=(16, 16), implementation="pallas")
    with pytest.raises(ValueError, match="NVFP4 has no partial blocks"):
        with jaxmx.pallas.interpret("triton"):
            jaxmx.quantize(X16[:, :70], "nvfp4", implementation="pallas")


# --------------------------------------------------------------------------
# The choice of implementation.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_the_default_is_the_xla_path_everywhere(platform):
    # No kernel has run on hardware yet, so None must not choose one anywhere.
    def lowered(impl):
        f = lambda x: jaxmx.quantize(x, "mxfp8", implementation=impl).data  # noqa: E731
        return jax.jit(f).trace(X).lower(lowering_platforms=(platform,)).as_text()

    for impl in (None, "xla"):
        assert MARKERS[platform] not in lowered(impl)
    assert MARKERS[platform] in lowered("pallas")


def test_the_cpu_refuses_the_kernels_and_says_what_to_do():
    with pytest.raises(
        ValueError,
        match=r"no kernel for platform 'cpu'.*cuda, tpu.*implementation='xla'.*interpret",
    ):
        jaxmx.quantize(X, "mxfp8", implementation="pallas")
    with pytest.raises(ValueError, match="no kernel for platform 'cpu'"):
        jax.jit(lambda x: jaxmx.fake_quantize(x, "mxfp4", implementation="pallas"))(X)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(format="mx6"),
            r"cover the families nvfp4, ocp; mx6 is of family 'microexp'.*'xla' takes it",
        ),
        (dict(format="mxfp8", block_size=24), r"powers of two from 2 to 1024.*block_size=24"),
        (
            dict(format="mxfp8", implementation="mosaic"),
            r"unknown implementation 'mosaic'; allowed: None",
        ),
    ],
)
def test_what_the_kernels_do_not_take_is_refused(kwargs, message):
    kwargs = dict(implementation="pallas") | kwargs
    fmt = kwargs.pop("format")
    with pytest.raises(ValueError, match=message):
        jaxmx.quantize(X[:, :48], fmt, **kwargs)
    with pytest.raises(
        ValueError, match="unknown Pallas backend 'gpu'; allowed: mosaic_tpu, triton"
    ):
        with jaxmx.pallas.interpret("gpu"):
            pass


# --------------------------------------------------------------------------
# Lowering for the accelerators, on this host.
# --------------------------------------------------------------------------


def _quantize_pallas(x):
    t = jaxmx.quantize(x, "mxfp4", implementation="pallas")
    return t.data, t.scale


def test_exports_for_a_tpu_as_a_mosaic_kernel():
    exp = jax.export.export(jax.jit(_quantize_pallas), platforms=["tpu"])(X)
    text = exp.mlir_module()
    assert "tpu_custom_call" in text
    assert "__gpu$xla.gpu.triton" not in text


def test_lowers_for_a_cuda_gpu_as_a_triton_kernel():
    text = jax.jit(_quantize_pallas).trace(X).lower(lowering_platforms=("cuda",)).as_text()
    assert re.search(r"custom_call @__gpu\$xla\.gpu\.triton", text)
    assert "tpu_custom_call" not in text


def test_one_program_lowers_for_a_tpu_and_a_cuda_gpu_at_once():
    # Each platform's kernel is lowered for its own platform only.
    lowered = jax.jit(_quantize_pallas).trace(X).lower(lowering_platforms=("tpu", "cuda"))
    text = lowered.as_text()
    assert "tpu_custom_call" in text and "__gpu$xla.gpu.triton" in text


@pytest.mark.parametrize("platforms_", [("cpu", "tpu"), ("rocm",)])
def test_a_platform_without_kernels_refuses_even_beside_one_with(platforms_):
    with pytest.raises(ValueError, match=f"no kernel for platform '{platforms_[0]}'"):
        jax.jit(_quantize_pallas).trace(X).lower(lowering_platforms=platforms_)


def _lowered(f, platform, *args) -> str:
    if platform == "tpu":
        return jax.export.export(jax.jit(f), platforms=["tpu"])(*args).mlir_module()
    # jax.export refuses Triton calls (no compatibility guarantee): lower instead.
    return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


FORMATS = [*OCP, "nvfp4"]


def _lowering_cases(fmt: str) -> list:
    """float32 with the defaults; bfloat16, stochastic; float16, flushing and rceil."""
    key = jax.random.key(0)
    cases = [
        (jnp.float32, {}),
        (jnp.bfloat16, dict(rounding="stochastic", key=key)),
        (jnp.float16, dict(flush_subnormals=True, scale_mode="rceil")),
    ]
    if fmt == "nvfp4":  # it has its own scale rule and no flushing
        cases[2] = (jnp.float16, dict(tensor_amax=3.0))
    return cases


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_lowers_for_a_tpu_and_a_cuda_gpu(fmt):
    # Lowering runs each backend's rules over the whole kernel body: an
    # operation the backend lacks fails here. One program per format holds
    # its float32 kernels and, alternating between formats, the bfloat16 and
    # stochastic or the float16, flushing and rceil ones, quantize and
    # fake_quantize each; it is traced once and lowered for both platforms.
    first, *others = _lowering_cases(fmt)
    cases = [first, others[FORMATS.index(fmt) % 2]]

    def f(x):
        outs = []
        for dtype, kw in cases:
            xd = x.astype(dtype)
            outs.append(jaxmx.quantize(xd, fmt, implementation="pallas", **kw).data)
            outs.append(jaxmx.fake_quantize(xd, fmt, implementation="pallas", **kw))
        return outs

    text = jax.jit(f).trace(X[:, :64]).lower(lowering_platforms=("tpu", "cuda")).as_text()
    for marker in MARKERS.values():  # every kernel, for each platform
        assert text.count(marker) >= 2 * len(cases), marker


@pytest.mark.slow
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_dtype_and_option_lowers(fmt, platform):
    for dtype, kw in _lowering_cases(fmt):
        x = X[:, :64].astype(dtype)
        q = lambda x, kw=kw: jaxmx.quantize(x, fmt, implementation="pallas", **kw).data  # noqa: E731
        f = lambda x, kw=kw: jaxmx.fake_quantize(x, fmt, implementation="pallas", **kw)  # noqa: E731
        assert MARKERS[platform] in _lowered(q, platform, x)
        assert MARKERS[platform] in _lowered(f, platform, x)


def test_the_xla_path_exports_no_kernel():
    f = lambda x: jaxmx.quantize(x, "mxfp4").data  # noqa: E731
    text = jax.export.export(jax.jit(f), platforms=["tpu"])(X).mlir_module()
    assert "tpu_custom_call" not in text
