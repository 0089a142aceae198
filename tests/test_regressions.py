"""Regression tests for the reliability review of the core (one test per bug).

Each test fails on the code before its fix. The Flax ones live in
tests/test_flax_regressions.py; the fuzzers that would have found them in
tests/test_fuzz.py.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxmx

DIMS = (((1,), (0,)), ((), ()))


def _same(a, b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _changed(q, x):
    """Quantization did something: these tests must not pass on a no-op."""
    assert not np.array_equal(np.asarray(q, np.float32), np.asarray(x, np.float32))


# 1. vmap: the block axis must follow the leaves, not a stale static index.


def test_vmap_out_axes_after_the_block_axis():
    x = jax.random.normal(jax.random.key(0), (32, 32))
    t = jax.vmap(lambda r: jaxmx.quantize(r, "mxfp8", axis=0), in_axes=1, out_axes=1)(x)
    want = jaxmx.fake_quantize(x, "mxfp8", axis=0)
    assert not np.array_equal(np.asarray(want), np.asarray(x))
    _same(jaxmx.dequantize(t), want)
    assert t.shape == (32, 32)


def test_vmap_dequantize_over_an_axis_after_the_block_axis():
    x = jax.random.normal(jax.random.key(1), (4, 64, 3))
    t = jaxmx.quantize(x, "mxfp8", axis=1)
    got = jax.vmap(jaxmx.dequantize, in_axes=2, out_axes=2)(t)
    _same(got, jaxmx.fake_quantize(x, "mxfp8", axis=1))
    _changed(got, x)


def test_shape_of_a_non_square_tensor_made_under_vmap():
    x = jax.random.normal(jax.random.key(2), (64, 4))
    t = jax.vmap(lambda r: jaxmx.quantize(r, "mxfp4"), in_axes=1, out_axes=1)(x)
    assert t.shape == (64, 4)
    _same(jaxmx.dequantize(t), jaxmx.fake_quantize(x, "mxfp4", axis=0))
    _changed(jaxmx.dequantize(t), x)


def test_vmap_in_axes_1_on_a_2d_tensor():
    x = jax.random.normal(jax.random.key(3), (64, 4))
    t = jaxmx.quantize(x, "mxfp8", axis=0)
    got = jax.vmap(jaxmx.dequantize, in_axes=1, out_axes=1)(t)
    _same(got, jaxmx.dequantize(t))
    _same(got, jaxmx.fake_quantize(x, "mxfp8", axis=0))
    _changed(got, x)


def test_leaves_that_fit_no_block_axis_are_refused():
    t = jaxmx.quantize(jnp.ones((4, 64)), "mxfp8")
    bad = dataclasses.replace(t, scale=t.scale[:, :1].repeat(3, axis=1))
    with pytest.raises(ValueError, match="cannot tell the block axis"):
        jaxmx.dequantize(bad)


def test_vmap_over_a_block_axis_with_one_code_per_block_is_refused():
    # Packed FP4 in blocks of 2: one byte and one scale per block, so vmap can
    # map over the block axis and the slices look like a valid tensor.
    x = jax.random.normal(jax.random.key(4), (3, 8))
    t = jaxmx.quantize(x, "mxfp4", axis=1, block_size=2, packed=True)
    with pytest.raises(ValueError, match="as many packed bytes as blocks"):
        jax.vmap(jaxmx.dequantize, in_axes=1)(t)
    # The same tensor mapped over its other axis is refused too (it cannot be
    # told apart); unmapped it decodes as usual.
    with pytest.raises(ValueError, match="made with rank 2"):
        jax.vmap(jaxmx.dequantize)(t)
    _same(jaxmx.dequantize(t), jaxmx.fake_quantize(x, "mxfp4", axis=1, block_size=2))


# 2. dot_general dimension numbers are validated by lax's own rule.


def test_out_of_range_dimension_numbers_raise_like_lax():
    a, b = jnp.ones((2, 8)), jnp.ones((8, 3))
    bad = (((5,), (0,)), ((), ()))
    with pytest.raises(TypeError) as lax_err:
        lax.dot_general(a, b, bad)
    with pytest.raises(TypeError) as mx_err:
        jaxmx.dot_general(a, b, bad, config="mxfp8")
    assert str(mx_err.value) == str(lax_err.value)


# 3. conv checks operand dtypes.


@pytest.mark.parametrize("dtype", [jnp.complex64, jnp.int32, jnp.bool_])
def test_conv_refuses_non_float_operands(dtype):
    x = jnp.ones((1, 4, 4, 8), dtype)
    w = jnp.ones((3, 3, 8, 8), jnp.float32)
    with pytest.raises(TypeError, match=str(jnp.dtype(dtype))):
        jaxmx.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), config="mxfp8"
        )


def test_conv_feature_groups_that_do_not_divide_raise_lax_error():
    with pytest.raises(ValueError, match="feature_group_count"):
        jaxmx.conv_general_dilated(
            jnp.ones((1, 4, 4, 8)),
            jnp.ones((3, 3, 3, 8)),
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=3,
            config="mxfp8",
        )


# 4. scan over an MXFP4 tensor.


def test_scan_over_an_unpacked_mxfp4_tensor():
    x = jax.random.normal(jax.random.key(4), (3, 4, 64))
    t = jaxmx.quantize(x, "mxfp4")
    total, _ = lax.scan(lambda c, q: (c + jaxmx.dequantize(q).sum(), None), 0.0, t)
    total_p, _ = lax.scan(lambda c, q: (c + jaxmx.dequantize(jaxmx.pack(q)).sum(), None), 0.0, t)
    want = jaxmx.fake_quantize(x, "mxfp4").sum(axis=(1, 2))
    assert float(want.sum()) != float(x.sum())
    # Sums of the same n float32 values in other orders: within n 2^-24 sum |v|.
    fq = jaxmx.fake_quantize(x, "mxfp4")
    bound = 2 * fq.size * 2.0**-24 * float(jnp.abs(fq).sum())
    assert abs(float(total) - float(want.sum())) <= bound
    assert abs(float(total_p) - float(want.sum())) <= bound


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the XLA:CPU bug")
def test_upstream_float4_scan_bug_still_present():
    """Watches the XLA:CPU bug that makes jaxmx hold 4-bit codes in bytes on CPU.

    When this test fails, XLA:CPU compiles float4 arrays in scans again:
    jaxmx.codes.storage_dtype can then keep float4_e2m1fn on CPU too.
    """
    t = jaxmx.quantize(jnp.ones((3, 4, 64)), "mxfp4")
    raw = jaxmx.codes.storage_to_raw(t.data, t.format.element)
    f4 = dataclasses.replace(
        t, data=lax.bitcast_convert_type(raw.astype(jnp.uint4), jnp.float4_e2m1fn)
    )
    # The OCP integer decode in the scan body (jaxmx.dequantize wraps it in a
    # lax.cond, whose operand boundary happens to dodge the miscompile).
    from jaxmx.families.ocp._kernels import _decode_exact

    def body(c, q):
        biased = jnp.expand_dims(lax.bitcast_convert_type(q.scale, jnp.uint8), q.axis)
        return c + _decode_exact(q.data, biased, q, jnp.float32).sum(), None

    with pytest.raises(Exception, match="LLVM IR|bitcast"):
        lax.scan(body, 0.0, f4)


# 5. The bf16 compute path must run every legal layout.


@pytest.mark.parametrize(
    "shapes,dims",
    [
        (((64, 15), (64, 14, 32)), (((0,), (0,)), ((), ()))),
        (((3, 64, 5), (64, 3, 7)), (((1,), (0,)), ((0,), (1,)))),
        (((5, 2, 64), (7, 64, 2)), (((2,), (1,)), ((1,), (2,)))),
    ],
)
def test_bf16_compute_runs_non_canonical_layouts(shapes, dims):
    a = jax.random.normal(jax.random.key(5), shapes[0])
    b = jax.random.normal(jax.random.key(6), shapes[1])
    bf = jaxmx.DotConfig(lhs="mxfp8", rhs="mxfp8", grad="mxfp8", compute_dtype="bfloat16")
    f32 = bf.replace(compute_dtype="float32")
    got = jaxmx.dot_general(a, b, dims, config=bf)
    want = jaxmx.dot_general(a, b, dims, config=f32)
    # Both multiply the same exact MX values with float32 accumulation, in
    # possibly different orders: each sum is within (K - 1) * 2^-24 of the
    # sum of |products|, so the two differ by at most twice that.
    k = np.prod([a.shape[i] for i in dims[0][0]])
    bound = lax.dot_general(jnp.abs(a), jnp.abs(b), dims) * (2 * (k - 1) * 2.0**-24)
    assert np.all(np.abs(np.asarray(got) - np.asarray(want)) <= np.asarray(bound))
    _changed(want, lax.dot_general(a, b, dims, precision=lax.Precision.HIGHEST))


# 6. Custom formats: supported fully or refused.


# (8, 7), bfloat16, is refused: under E8M0 its grid reaches 2^-260 (test_families).
@pytest.mark.parametrize("e,m", [(2, 2), (3, 3), (4, 4), (5, 4), (5, 5), (5, 6)])
def test_custom_widths_pack_and_decode_exactly(e, m):
    f = jaxmx.MXFormat(
        name=f"c{e}{m}", element=jaxmx.formats.float_format(e, m), scale=jaxmx.formats.E8M0
    )
    x = jax.random.normal(jax.random.key(7), (4, 64)) * 3
    fq = jaxmx.fake_quantize(x, f)
    assert not np.array_equal(np.asarray(fq), np.asarray(x))
    _same(jaxmx.dequantize(jaxmx.quantize(x, f)), fq)
    _same(jaxmx.dequantize(jaxmx.quantize(x, f, packed=True)), fq)
    assert jaxmx.quantize(x, f, packed=True).nbytes == 4 * (64 * (1 + e + m) // 8 + 2)


def test_bad_formats_are_refused_at_construction():
    with pytest.raises(ValueError, match="block_size"):
        jaxmx.MXFormat(
            name="b0", element=jaxmx.formats.FP8_E4M3, scale=jaxmx.formats.E8M0, block_size=0
        )
    with pytest.raises(ValueError, match="max_normal"):
        dataclasses.replace(jaxmx.formats.FP8_E4M3, max_normal=400.0)
    with pytest.raises(ValueError, match="bits must be 2..16"):
        jaxmx.formats.ElementFormat(
            name="i32",
            kind="int",
            bits=32,
            exponent_bits=0,
            mantissa_bits=6,
            bias=1,
            max_normal=1.0,
            min_normal=1.0,
            min_subnormal=1.0,
            max_code=1,
        )


def test_storage_dtype_is_part_of_format_equality():
    a = jaxmx.formats.FP6_E3M2
    b = dataclasses.replace(a, storage_dtype=np.dtype(np.uint16))
    assert a != b and hash(a) != hash(b)


# 7. residuals="quantized" stashes the forward MX copy itself.


@pytest.mark.parametrize("rounding", ["toward_zero", "nearest_away"])
def test_quantized_residuals_reuse_the_forward_copy(rounding):
    x = jax.random.normal(jax.random.key(8), (16, 64))
    w = jax.random.normal(jax.random.key(9), (64, 32))
    cfg = jaxmx.DotConfig(
        lhs="mxfp8", rhs="mxfp8", grad="mxfp8", rounding=rounding, residuals="quantized"
    )
    got = jax.grad(lambda x: jaxmx.dot_general(x, w, DIMS, config=cfg).sum())(x)
    # Documented: the backward pass re-quantizes the forward MX copy of w.
    wq = jaxmx.fake_quantize(w, "mxfp8", axis=0, rounding=rounding)
    hp = cfg.replace(residuals="high_precision")
    want = jax.grad(lambda x: jaxmx.dot_general(x, wq, DIMS, config=hp).sum())(x)
    _same(got, want)
    plain = jax.grad(lambda x: jaxmx.dot_general(x, w, DIMS, config=hp).sum())(x)
    assert not np.array_equal(np.asarray(got), np.asarray(plain))


# Smaller ones.


def test_dequantize_to_none_names_none():
    t = jaxmx.quantize(jnp.ones((2, 32)), "mxfp8")
    with pytest.raises(TypeError, match="got None"):
        jaxmx.dequantize(t, None)


def test_dot_config_takes_numpy_ints():
    assert jaxmx.DotConfig(block_size=np.int64(16)).block_size == 16


def test_einsum_with_two_arrows_is_refused():
    with pytest.raises(ValueError, match="more than one"):
        jaxmx.einsum("ij,jk->ik->ik", jnp.ones((2, 2)), jnp.ones((2, 2)), config="mxfp8")


@pytest.mark.parametrize("value", ["no", 0, None, 1.0])
def test_flags_take_bools_only(value):
    with pytest.raises(TypeError, match=repr(value)):
        jaxmx.quantize(jnp.ones((2, 32)), "mxfp8", flush_subnormals=value)


def test_key_without_stochastic_rounding_is_refused():
    x = jnp.ones((2, 32))
    with pytest.raises(ValueError, match="key was given"):
        jaxmx.quantize(x, "mxfp8", key=jax.random.key(0))
    with pytest.raises(ValueError, match="key was given"):
        jaxmx.round_to(x, "bfloat16", key=jax.random.key(0))
    with pytest.raises(ValueError, match="key was given"):
        jaxmx.dot_general(x, x.T, DIMS, config="mxfp8", key=jax.random.key(0))


def test_differentiating_quantize_raises_instead_of_a_silent_zero():
    x = jnp.linspace(0.1, 1, 64).reshape(2, 32)
    with pytest.raises(TypeError, match="fake_quantize"):
        jax.grad(lambda v: jaxmx.dequantize(jaxmx.quantize(v, "mxfp8")).sum())(x)
    # Not differentiating through it is fine.
    g = jax.grad(lambda w: (w * jaxmx.dequantize(jaxmx.quantize(x, "mxfp8"))).sum())(1.0)
    assert float(g) != 0.0


def test_format_names_are_configs():
    x = jax.random.normal(jax.random.key(10), (4, 64))
    w = jax.random.normal(jax.random.key(11), (64, 8))
    got = jaxmx.dot_general(x, w, DIMS, config="mxint8")
    want = jaxmx.dot_general(
        x, w, DIMS, config=jaxmx.DotConfig(lhs="mxint8", rhs="mxint8", grad="mxint8")
    )
    _same(got, want)
    _changed(got, lax.dot_general(x, w, DIMS, precision=lax.Precision.HIGHEST))


# Found by the fuzzers (tests/test_fuzz.py) after the ten above.


def test_bf16_operands_through_jit_grad_on_every_path():
    # XLA:CPU has no BF16 x BF16 -> F32 dot for this layout; jaxmx widens on CPU.
    a = jax.random.normal(jax.random.key(12), (8, 3)).astype(jnp.bfloat16)
    b = jax.random.normal(jax.random.key(13), (8, 4, 5)).astype(jnp.bfloat16)
    dims = (((0,), (0,)), ((), ()))
    want = lax.dot_general(a.astype(jnp.float32), b.astype(jnp.float32), dims)
    for cfg in ("fp32", jaxmx.preset("mxfp8", compute_dtype="bfloat16")):

        def loss(x, y, cfg=cfg):
            out = jaxmx.dot_general(x, y, dims, preferred_element_type=jnp.float32, config=cfg)
            return (out**2).sum()

        ga, gb = jax.jit(jax.grad(loss, (0, 1)))(a, b)
        assert ga.dtype == jnp.bfloat16 and gb.shape == b.shape
    out = jaxmx.dot_general(a, b, dims, preferred_element_type=jnp.float32, config="fp32")
    _same(out, want)  # products of bf16 values are exact in float32


def test_dimension_numbers_lax_takes_and_malformed_ones():
    a, b = jnp.ones((2, 8)), jnp.ones((8, 3))
    for dn in (None, ((1, 0), ((), ()))):
        assert jaxmx.dot_general(a, b, dn, config="mxfp8").shape == (2, 3)
    with pytest.raises(ValueError, match="'ij'"):
        jaxmx.dot_general(a, b, "ij", config="mxfp8")
    with pytest.raises(ValueError, match="only allowed for an un-batched"):
        jaxmx.dot_general(jnp.ones((2, 2, 8)), jnp.ones((8, 3)), None, config="mxfp8")


def test_conv_window_arguments_are_checked_before_lax():
    x, w = jnp.ones((1, 8, 8, 32)), jnp.ones((3, 3, 32, 4))
    dn = ("NHWC", "HWIO", "NHWC")
    with pytest.raises(
        ValueError, match=r"window_strides must be a sequence of 2 ints.*\(1, 1, 1\)"
    ):
        jaxmx.conv_general_dilated(x, w, (1, 1, 1), "SAME", dimension_numbers=dn, config="mxfp8")
    with pytest.raises(ValueError, match="padding must be one of.*'FOO'"):
        jaxmx.conv_general_dilated(x, w, (1, 1), "FOO", dimension_numbers=dn, config="mxfp8")
    y = jaxmx.conv_general_dilated(x, w, (1, 1), "same", dimension_numbers=dn, config="mxfp8")
    assert y.shape == (1, 8, 8, 4)


def test_small_argument_checks():
    with pytest.raises(ValueError, match="must be one term"):
        jaxmx.einsum("ij,jk->ik,", jnp.ones((2, 32)), jnp.ones((32, 2)), config="mxfp8")
    with pytest.raises(TypeError, match="warn must be True or False"):
        jaxmx.intercept(jnp.matmul, "mxfp8", warn="no")
    fmt = jaxmx.MXFormat(
        name="regress_alias", element=jaxmx.formats.FP8_E4M3, scale=jaxmx.formats.E8M0
    )
    with pytest.raises(TypeError, match="aliases must be a tuple"):
        jaxmx.register_format(fmt, aliases=None)
    with pytest.raises(ValueError, match="already registered; names and aliases must be new"):
        jaxmx.register_format(fmt, aliases=("mxfp8",))


def test_element_formats_outside_float32_are_refused():
    with pytest.raises(ValueError, match=r"2\^-149 \.\. 2\^127"):
        jaxmx.formats.float_format(12, 3)
    with pytest.raises(ValueError, match=r"2\^-149 \.\. 2\^127"):
        jaxmx.formats.float_format(9, 2)
    assert jaxmx.formats.float_format(8, 7).min_subnormal == 2.0**-133  # bfloat16 stays


def test_intercept_puts_bfloat16_matmuls_in_mx():
    # np.issubdtype(bfloat16, np.floating) is False: intercept once kept them high.
    f = jaxmx.intercept(jnp.matmul, "mxfp8")
    a = jnp.linspace(-1, 1, 8 * 64).reshape(8, 64).astype(jnp.bfloat16)
    y = f(a, jnp.ones((64, 4), jnp.bfloat16))
    assert f.coverage.counts == "1 of 1 matmuls in MX"
    _changed(y, a.astype(jnp.float32) @ jnp.ones((64, 4)))


def test_structural_ops_keep_the_recorded_rank_in_step():
    # Packed FP4 in blocks of 2 (one byte per block): made_ndim guards vmap;
    # ops that change the rank on purpose must update it.
    x = jax.random.normal(jax.random.key(14), (4, 6, 8))
    t = jaxmx.quantize(x, "mxfp4", axis=-1, block_size=2, packed=True)
    fq = jaxmx.fake_quantize(x, "mxfp4", axis=-1, block_size=2)
    _same(t.reshape(24, 8).dequantize(), fq.reshape(24, 8))
    _same(t[0].dequantize(), fq[0])
    _same(jaxmx.stack([t, t]).dequantize(), jnp.stack([fq, fq]))
    _changed(fq, x)


def test_division_by_a_broadcast_scale_is_correctly_rounded():
    """XLA:CPU rewrites x / broadcast(s) into x * (1 / s), off by an ulp for
    about a third of quotients; per-tensor FP8 and torchao's NVFP4 divide
    by a tensor scale and by 6, so both must stay true divisions. Found on
    MiniLM activations: -0.17675766 / (6.3349943 / 448) is 12.500001 (code
    13), where the reciprocal product gives 12.499999 (code 12)."""
    from tests import _torchao_nvfp4 as torchao
    from tests import reference_blockformats as ref

    x = np.array([6.3349943, -0.17675766], np.float32)
    got = np.asarray(jaxmx.fake_quantize(x, "tensor_fp8_e4m3"))
    np.testing.assert_array_equal(got, ref.tensor_fp8(x, "e4m3").y)
    assert got[1] == -np.float32(13) * (np.float32(6.3349943) / np.float32(448))
    # Block maxima whose amax / 6 differs from amax * (1/6) in float32 (the
    # e4m3 rounding that follows hid the ulp in every case tried; a guard).
    rng = np.random.default_rng(0)
    amax = rng.random(4096).astype(np.float32) * 100
    amax = amax[(amax / np.float32(6)) != (amax * (np.float32(1) / np.float32(6)))][:64]
    xs = rng.uniform(-1, 1, (amax.size, 16)).astype(np.float32) * amax[:, None]
    xs[:, 0] = amax
    want = ref.nvfp4_torchao(xs)
    got = torchao.quantize(xs)
    np.testing.assert_array_equal(np.asarray(got.block_scales).view(np.uint8), want.scales)
    np.testing.assert_array_equal(np.asarray(got.codes), want.codes)


# Reliability round 3: an empty NVFP4 tensor.


@pytest.mark.parametrize("name", jaxmx.list_formats())
@pytest.mark.parametrize("shape,axis", [((0, 32), -1), ((32, 0), -1), ((0, 32), 0)])
def test_empty_arrays_quantize_or_are_refused_consistently(name, shape, axis):
    """quantize and fake_quantize of an empty array agree: both empty, or both refused.

    NVFP4 failed in both with NumPy's "zero-size array to reduction operation
    max" (the tensor amax of nothing); it now takes the amax of an empty
    tensor as 0, as TE's reduction does, so the tensor scale is the degenerate 1.
    """
    x = jnp.zeros(shape, jnp.float32)
    fmt = jaxmx.get_format(name)
    outcomes = []
    for fn in (jaxmx.quantize, jaxmx.fake_quantize):
        try:
            out = fn(x, fmt, axis=axis)
        except ValueError as e:
            outcomes.append("refused")
            assert "empty" in str(e), str(e)
            continue
        outcomes.append("empty")
        got = jaxmx.dequantize(out) if fn is jaxmx.quantize else out
        assert got.shape == shape and got.dtype == x.dtype
    assert outcomes[0] == outcomes[1], outcomes
    if fmt.block_size is not None:  # block formats have nothing to refuse
        assert outcomes == ["empty", "empty"]
