"""Bad input gets a clear error naming what was given and what is allowed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmx

X = jnp.ones((4, 32), jnp.float32)


def test_unknown_format_lists_known_ones():
    with pytest.raises(ValueError, match="unknown format 'mxfp5'.*mxfp8_e4m3.*mxint2.*mxfp4 ->"):
        jaxmx.quantize(X, "mxfp5")
    with pytest.raises(TypeError, match="format name or an MXFormat"):
        jaxmx.quantize(X, 8)


def test_a_misspelled_format_name_gets_a_suggestion():
    with pytest.raises(ValueError, match=r"unknown format 'nvfp' \(did you mean 'nvfp4'\?\)"):
        jaxmx.quantize(X, "nvfp")
    with pytest.raises(ValueError, match=r"'MXFP8_E4M2' \(did you mean .*'mxfp8_e4m3'"):
        jaxmx.get_format("MXFP8_E4M2")
    with pytest.raises(ValueError) as e:
        jaxmx.get_format("bogus")
    assert "did you mean" not in str(e.value)


def test_aliases_and_case():
    assert jaxmx.get_format("MXFP8").name == "mxfp8_e4m3"
    assert jaxmx.get_format("mxfp6").name == "mxfp6_e3m2"  # as the preset "mxfp6"
    assert jaxmx.preset("mxfp6").lhs is jaxmx.get_format("mxfp6")
    assert jaxmx.get_format("mxfp4").name == "mxfp4_e2m1"
    assert set(jaxmx.list_formats(aliases=True)) >= {"mxfp8", "mxfp6", "mxfp4"}


@pytest.mark.parametrize(
    ("x", "kind"),
    [
        (jnp.ones((2, 32), jnp.int32), "integer"),
        (np.ones((2, 32), np.complex64), "complex"),
        (np.ones((2, 32), np.bool_), "integer"),
    ],
)
def test_non_float_input_is_a_type_error(x, kind):
    with pytest.raises(TypeError, match=kind):
        jaxmx.quantize(x, "mxfp8")
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        jaxmx.fake_quantize(x, "mxfp8")


def test_float64():
    # NumPy float64 is converted to float32 like every JAX function does...
    x = np.random.default_rng(0).standard_normal((2, 32))
    np.testing.assert_array_equal(
        np.asarray(jaxmx.fake_quantize(x, "mxfp4")),
        np.asarray(jaxmx.fake_quantize(x.astype(np.float32), "mxfp4")),
    )
    # ...but a float64 JAX array (x64 mode) is refused rather than rounded twice.
    with jax.enable_x64(True):
        with pytest.raises(TypeError, match="float64.*convert float64 to float32 yourself"):
            jaxmx.quantize(jnp.ones((2, 32), jnp.float64), "mxfp8")


def test_bad_axis():
    with pytest.raises(ValueError, match=r"axis 2 is out of range.*rank 2.*-2\.\.1"):
        jaxmx.quantize(X, "mxfp8", axis=2)
    with pytest.raises(TypeError, match="axis must be an int"):
        jaxmx.quantize(X, "mxfp8", axis=1.0)
    with pytest.raises(ValueError, match="scalar"):
        jaxmx.quantize(jnp.float32(1.0), "mxfp8")


@pytest.mark.parametrize("bs", [0, -32])
def test_bad_block_size(bs):
    with pytest.raises(ValueError, match=f"block_size must be a positive int, got {bs}"):
        jaxmx.quantize(X, "mxfp8", block_size=bs)
    with pytest.raises(TypeError, match="block_size"):
        jaxmx.quantize(X, "mxfp8", block_size=8.0)


def test_bad_rounding_and_scale_mode():
    with pytest.raises(ValueError, match="unknown rounding 'nearest'.*nearest_even.*stochastic"):
        jaxmx.quantize(X, "mxfp8", rounding="nearest")
    with pytest.raises(ValueError, match="unknown scale_mode 'round'.*floor, rceil, ceil, even"):
        jaxmx.fake_quantize(X, "mxfp8", scale_mode="round")


def test_stochastic_without_key():
    with pytest.raises(ValueError, match="stochastic.*needs a PRNG key"):
        jaxmx.quantize(X, "mxfp4", rounding="stochastic")


def test_dequantize_checks():
    with pytest.raises(TypeError, match="expects an MXTensor, got ArrayImpl"):
        jaxmx.dequantize(X)
    t = jaxmx.quantize(X, "mxfp8")
    with pytest.raises(TypeError, match="cannot dequantize to int8"):
        jaxmx.dequantize(t, jnp.int8)
    with pytest.raises(TypeError, match="already an MXTensor"):
        jaxmx.quantize(t, "mxfp8")
    with pytest.raises(TypeError, match="pack expects an MXTensor"):
        jaxmx.pack(X)


def test_register_format_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        jaxmx.register_format(jaxmx.get_format("mxfp8"))
    with pytest.raises(TypeError, match="expects an MXFormat"):
        jaxmx.register_format("mxfp8")


def test_errors_are_raised_under_jit_too():
    with pytest.raises(ValueError, match="unknown format"):
        jax.jit(lambda v: jaxmx.fake_quantize(v, "fp8"))(X)
