"""The weight-only matmul kernel, checked in Pallas's interpreters on this CPU.

``jaxmx.pallas.weight_only_matmul(x, w, implementation="pallas")`` runs
through the interpreter of each backend (``mosaic_tpu``: the TPU
interpreter with its race detector; ``triton``: the generic one) and is
compared with ``x @ w.dequantize()`` computed in float64 by NumPy, whose
decode tests/test_vectors.py and tests/test_conformance.py check against
independent references.

The bound: every decoded weight is exact in the kernel's operand dtype, and
so is every product of two operands (bfloat16 products are exact in
float32; a float32 product is rounded once); each output is a float32 sum of
K products, in whatever order the tiles add them, so (Higham, "Accuracy and
Stability of Numerical Algorithms", 2002, section 3.1) its error is at most
``gamma_(K + 1) * sum_k |x_k| |w_k|`` with ``gamma_n = n u / (1 - n u)``,
``u = 2^-24``. NVFP4 adds two roundings: its reference decodes ``E2M1 *
round(s8 * tensor_scale)`` while the kernel multiplies ``E2M1 * s8`` and
applies the tensor scale to the float32 sum, so ``gamma_(K + 3)``. A
bfloat16 result adds its own rounding, ``2^-8 |y|``. The weights' blocks
carry scales from 2^-8 to 2^8, so a kernel that ignored the scales (or
returned zeros) misses the reference by many times the bound; the tests
assert that the reference is far above the bound and that the scales vary.

The export tests lower the kernel for a TPU and for a CUDA GPU on this host;
nothing here compiles or runs it on either.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmx
from jaxmx.pallas import _wtiles

MARKERS = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
U = 2.0**-24
MX_FLOAT = ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_e2m1"]


@functools.cache
def _weight(fmt, k, n, *, packed=False, seed=0, nan_at=None):
    """A (K, N) weight blocked along K whose blocks span scales 2^-8 .. 2^8.

    Cached: tests share weights (and their compiled quantize and dequantize)."""
    rng = np.random.default_rng(seed)
    bs = jaxmx.get_format(fmt).block_size
    w = rng.standard_normal((k, n))
    w *= 2.0 ** rng.integers(-8, 9, size=(-(-k // bs), n)).repeat(bs, axis=0)[:k]
    if nan_at is not None:
        w[nan_at] = np.nan
    return jaxmx.quantize(jnp.asarray(w, jnp.float32), fmt, axis=0, packed=packed)


def _x(m, k, dtype, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((m, k)), dtype)


def _run(backend, x, w, **kw):
    with jaxmx.pallas.interpret(backend):
        return jaxmx.pallas.weight_only_matmul(x, w, implementation="pallas", **kw)


def _reference(x, w):
    """``(x @ W, bound)`` in float64: the exact product and the float32 error bound."""
    x64 = np.asarray(x, np.float64)
    w64 = np.asarray(w.dequantize(jnp.float32), np.float64)
    k = w64.shape[0]
    n = k + (3 if w.format.name == "nvfp4" else 1)
    gamma = n * U / (1 - n * U)
    with np.errstate(invalid="ignore"):
        return x64 @ w64, gamma * (np.abs(x64) @ np.abs(w64))


def _assert_within(y, x, w):
    ref, bound = _reference(x, w)
    y = np.asarray(y, np.float64)
    assert y.shape == ref.shape
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    ok = ~np.isnan(ref)
    if y.dtype != np.float32:  # a bfloat16 result's own rounding
        bound = bound + 2.0**-8 * np.abs(ref)
    err = np.abs(y - ref)[ok]
    assert (err <= bound[ok]).all(), f"worst error {(err / bound[ok]).max():.3g} x the bound"
    # The comparison could not pass for zeros, nor for the product of the
    # elements without their scales: both miss the reference by more than
    # the bound almost everywhere.
    assert np.mean(np.abs(ref[ok]) > bound[ok]) > 0.9
    unscaled = np.asarray(x, np.float64) @ _elements(w)
    assert np.mean(np.abs(unscaled - ref)[ok] > bound[ok]) > 0.9


def _elements(w):
    """W's element values, its block scales (and tensor scale) left out."""
    scale = np.asarray(w.scale.astype(jnp.float32), np.float64)
    if w.tensor_scale is not None:
        scale = scale * float(w.tensor_scale)
    scale = scale.repeat(w.block_size, axis=0)[: w.shape[0]]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(w.dequantize(jnp.float32), np.float64) / scale


# One program each: every packed format and MXFP8 on both backends, decode
# (M 1 and 7) and prefill rows (M 67: two Triton M tiles; N 129: two Triton
# N tiles), odd N, K of an odd number of blocks, bfloat16 and float32 x.
# The other formats and combinations are in the slow cross product below.
MX_K, NV_K, N = 96, 80, 33
CASES = [
    ("mxfp4_e2m1", True, "triton", 1, MX_K, N, jnp.bfloat16),
    ("mxfp4_e2m1", True, "mosaic_tpu", 7, MX_K, N, jnp.float32),
    ("mxfp4_e2m1", False, "mosaic_tpu", 1, MX_K, N, jnp.bfloat16),
    ("nvfp4", True, "mosaic_tpu", 7, NV_K, N, jnp.bfloat16),
    ("nvfp4", True, "triton", 67, NV_K, N, jnp.float32),
    ("nvfp4", False, "triton", 1, NV_K, N, jnp.bfloat16),
    ("mxfp8_e4m3", False, "mosaic_tpu", 1, MX_K, N, jnp.bfloat16),
    ("mxfp8_e4m3", False, "triton", 67, MX_K, 129, jnp.float32),
]


def _id(case):
    fmt, packed, backend, m, k, n, dtype = case
    return f"{fmt}{'-packed' if packed else ''}-{backend}-{m}x{k}x{n}-{jnp.dtype(dtype).name}"


@pytest.mark.parametrize("case", CASES, ids=map(_id, CASES))
def test_matches_float64_within_the_accumulation_bound(case):
    fmt, packed, backend, m, k, n, dtype = case
    w = _weight(fmt, k, n, packed=packed)
    assert w.packed == packed and w.block_axis() == -2
    x = _x(m, k, dtype)
    y = _run(backend, x, w, out_dtype=jnp.float32)
    assert y.dtype == jnp.float32
    _assert_within(y, x, w)


ALL = [
    (fmt, packed, backend, m)
    for fmt in [*MX_FLOAT, "nvfp4"]
    for packed in ([False, True] if fmt in ("mxfp4_e2m1", "nvfp4") else [False])
    for backend in jaxmx.platforms.PALLAS_BACKENDS
    for m in (1, 7, 67)
]


@pytest.mark.slow
@pytest.mark.parametrize("fmt, packed, backend, m", ALL)
def test_every_format_backend_and_row_count(fmt, packed, backend, m):
    k = NV_K if fmt == "nvfp4" else MX_K
    w = _weight(fmt, k, N, packed=packed)
    for dtype in (jnp.bfloat16, jnp.float32):
        x = _x(m, k, dtype, seed=m + 1)
        _assert_within(_run(backend, x, w, out_dtype=jnp.float32), x, w)


def test_nan_blocks_and_a_bfloat16_result():
    # A NaN in W makes its block's scale NaN: that column is NaN in every row.
    w = _weight("mxfp4_e2m1", MX_K, N, packed=True, nan_at=(40, 5))
    assert (np.asarray(jax.lax.bitcast_convert_type(w.scale, jnp.uint8)) == 0xFF).sum() == 1
    x = _x(7, MX_K, jnp.bfloat16)
    y = _run("triton", x, w)
    assert y.dtype == jnp.bfloat16 and np.isnan(np.asarray(y, np.float32)[:, 5]).all()
    _assert_within(y, x, w)


def test_mosaic_steps_over_k_with_a_partial_last_step():
    # K = 1056 = 33 blocks, which no step of 512, 1024 or 2048 rows divides:
    # three steps of 512, the last mostly past K, whose rows are zeroed;
    # packed, so x's halves are tiles of 256 columns.
    k = 1056
    w = _weight("mxfp4_e2m1", k, 24, packed=True)  # shared with the export tests
    t = _wtiles.tiling("mosaic_tpu", jaxmx.pallas._matmul.check_weight(w), 3, k, 24)
    assert (t.tk, t.steps, t.kp) == (512, 3, 1536)
    x = _x(3, k, jnp.bfloat16)
    _assert_within(_run("mosaic_tpu", x, w, out_dtype=jnp.float32), x, w)


@pytest.mark.slow
@pytest.mark.parametrize("k", [1536, 2048 + 512])
def test_mosaic_steps_over_k_and_tiles_over_m_and_n(k):
    # Steps that divide K (512 rows: 1536 and 2560 have no 1024 or 2048
    # divisor), and M and N past one tile (the last tiles partial).
    m, n = _wtiles.TPU_TILE_M + 3, _wtiles.TPU_TILE_N + 5
    w = _weight("nvfp4", k, n, packed=True)
    x = _x(m, k, jnp.bfloat16)
    _assert_within(_run("mosaic_tpu", x, w, out_dtype=jnp.float32), x, w)


def test_leading_axes_jit_and_the_xla_path():
    w = _weight("mxfp8_e4m3", MX_K, N)
    x = _x(6, MX_K, jnp.float32).reshape(2, 3, MX_K)
    f = jax.jit(lambda x, w: jaxmx.pallas.weight_only_matmul(x, w, implementation="pallas"))
    with jaxmx.pallas.interpret("triton"):
        y = f(x, w)
    assert y.shape == (2, 3, N) and y.dtype == jnp.float32
    x2 = x.reshape(6, MX_K)
    _assert_within(y.reshape(6, N), x2, w)
    for impl in (None, "xla"):
        ref = jaxmx.pallas.weight_only_matmul(x, w, implementation=impl)
        _assert_within(ref.reshape(6, N), x2, w)
    # The XLA path takes what the kernel refuses: blocks along N.
    wn = jaxmx.quantize(w.dequantize(), "mxfp8", axis=1)
    assert wn.block_axis() == -1
    yn = jaxmx.pallas.weight_only_matmul(x2, wn)
    ref, bound = _reference(x2, wn)
    assert (np.abs(np.asarray(yn, np.float64) - ref) <= bound).all()


def test_float4_codes_held_as_float4_on_an_accelerator():
    # On a TPU or GPU unpacked FP4 codes are float4_e2m1fn, widened to bytes
    # before the kernel; float16 x is multiplied in float32.
    with jaxmx.platforms.force("tpu"):
        w = _weight("mxfp4_e2m1", MX_K, N, seed=1)  # its own cache entry: float4 codes
        assert w.data.dtype == jnp.float4_e2m1fn
        x = _x(5, MX_K, jnp.float16)
        y = _run("mosaic_tpu", x, w, out_dtype=jnp.float32)
    _assert_within(y, x, w)


# --------------------------------------------------------------------------
# What the kernel refuses, and the choice of implementation.
# --------------------------------------------------------------------------

X = jnp.ones((3, 64), jnp.float32)


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: jaxmx.quantize(jnp.ones((64, 64)), "mxfp4", axis=1),
            r"blocked along axis 1; the kernel takes weights \(K, N\) blocked along axis 0",
        ),
        (
            lambda: jaxmx.quantize(jnp.ones((64, 8)), "mxint8", axis=0),
            r"float elements .* got mxint8 \(family 'ocp', int elements\)",
        ),
        (
            lambda: jaxmx.quantize(jnp.ones((64, 8)), "mx6", axis=0),
            r"nvfp4; got mx6 \(family 'microexp'.*implementation='xla' takes every format",
        ),
        (
            lambda: jaxmx.quantize(jnp.ones((64, 8)), "mxfp6_e3m2", axis=0, packed=True),
            r"packed 6-bit mxfp6_e3m2 codes: jaxmx.unpack\(w\) first",
        ),
        (
            lambda: jaxmx.quantize(jnp.ones((64, 8)), "mxfp8", axis=0, block_size=8),
            r"block sizes 16, 32, 64, 128 along K; w has block_size=8",
        ),
    ],
    ids=["blocks-along-n", "mxint8", "mx6", "packed-fp6", "block-size-8"],
)
def test_what_the_kernel_does_not_take_is_refused(make, message):
    with pytest.raises(ValueError, match=message):
        jaxmx.pallas.weight_only_matmul(X, make(), implementation="pallas")


def test_partial_blocks_and_bad_arguments_are_refused():
    w70 = jaxmx.quantize(jnp.ones((70, 8)), "mxfp8", axis=0)
    with pytest.raises(ValueError, match=r"K=70 is not a multiple of w's block size 32"):
        jaxmx.pallas.weight_only_matmul(jnp.ones((2, 70)), w70, implementation="pallas")
    w = jaxmx.quantize(jnp.ones((64, 8)), "mxfp8", axis=0)
    with pytest.raises(ValueError, match=r"x of shape \(3, 32\) cannot multiply .* K=64"):
        jaxmx.pallas.weight_only_matmul(X[:, :32], w)
    with pytest.raises(TypeError, match="x must be a float array, got dtype int32"):
        jaxmx.pallas.weight_only_matmul(jnp.ones((3, 64), jnp.int32), w)
    with pytest.raises(TypeError, match="w must be an MXTensor, got ArrayImpl"):
        jaxmx.pallas.weight_only_matmul(X, jnp.ones((64, 8)))
    with pytest.raises(ValueError, match=r"2-D MXTensor \(K, N\), got shape \(2, 64, 8\)"):
        w3 = jaxmx.quantize(jnp.ones((2, 64, 8)), "mxfp8", axis=1)
        jaxmx.pallas.weight_only_matmul(X, w3, implementation="pallas")
    with pytest.raises(ValueError, match="unknown implementation 'mosaic'; allowed: None"):
        jaxmx.pallas.weight_only_matmul(X, w, implementation="mosaic")
    with pytest.raises(TypeError, match="cannot dequantize to int8"):
        jaxmx.pallas.weight_only_matmul(X, w, out_dtype=jnp.int8)


def test_the_cpu_refuses_the_kernel_and_says_what_to_do():
    w = _weight("mxfp4_e2m1", MX_K, N, packed=True)
    with pytest.raises(ValueError, match=r"no kernel for platform 'cpu'.*implementation='xla'"):
        jaxmx.pallas.weight_only_matmul(X[:, :1].repeat(MX_K, 1), w, implementation="pallas")


def _matmuls(x4, x16, x8, w4, w16, w8):
    """The kernel for every claimed kind of weight, in one program."""
    f = lambda x, w: jaxmx.pallas.weight_only_matmul(x, w, implementation="pallas")  # noqa: E731
    return [f(x4, w4), f(x16, w16), f(x8, w8)]


def _program():
    """``_matmuls``' arguments: MXFP4 of 1056 rows (three K steps on a TPU),
    NVFP4 with float32 x, MXFP8 with bfloat16 x."""
    w4 = _weight("mxfp4_e2m1", 1056, 24, packed=True)
    w16, w8 = _weight("nvfp4", NV_K, N, packed=True), _weight("mxfp8_e4m3", MX_K, N)
    xs = [_x(7, 1056, jnp.bfloat16), _x(7, NV_K, jnp.float32), _x(7, MX_K, jnp.bfloat16)]
    return (*xs, w4, w16, w8)


def test_exports_for_a_tpu_as_mosaic_kernels():
    exp = jax.export.export(jax.jit(_matmuls), platforms=["tpu"])(*_program())
    text = exp.mlir_module()
    assert text.count("tpu_custom_call") >= 3
    assert "__gpu$xla.gpu.triton" not in text


def test_lowers_for_a_cuda_gpu_as_triton_kernels():
    # jax.export refuses Triton calls (no compatibility guarantee): lower instead.
    lowered = jax.jit(_matmuls).trace(*_program()).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert len(re.findall(r"custom_call @__gpu\$xla\.gpu\.triton", text)) >= 3
    assert "tpu_custom_call" not in text


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_the_default_is_the_xla_path_everywhere(platform):
    x, w = _x(3, MX_K, jnp.bfloat16), _weight("mxfp4_e2m1", MX_K, N, packed=True)

    def lowered(impl):
        f = lambda x: jaxmx.pallas.weight_only_matmul(x, w, implementation=impl)  # noqa: E731
        return jax.jit(f).trace(x).lower(lowering_platforms=(platform,)).as_text()

    for impl in (None, "xla"):
        assert MARKERS[platform] not in lowered(impl)
    assert MARKERS[platform] in lowered("pallas")
