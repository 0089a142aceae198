"""Platform choices are made when lowering: each platform's record, exported from this CPU.

``jax.export(jax.jit(f), platforms=[p])`` lowers for a platform this host
does not have; the exported module must carry that platform's choices
(bfloat16 operands in the emulated MX matmuls on cuda and tpu, float32 on
cpu). Under ``jaxmx.platforms.force`` the accelerator records also run here,
so their branches (float4 code storage, bfloat16 compute) are executed, not
only lowered.
"""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmx
from jaxmx import platforms

DIMS = (((1,), (0,)), ((), ()))
X = jax.random.normal(jax.random.key(0), (8, 64), jnp.float32)
W = jax.random.normal(jax.random.key(1), (64, 16), jnp.float32)


def _dot_operand_types(f, platform, *args) -> set[str]:
    """Element types of the operands of every dot_general in f's module for ``platform``."""
    text = jax.export.export(jax.jit(f), platforms=[platform])(*args).mlir_module()
    found = re.findall(r"stablehlo\.dot_general[^\n]*?: \(tensor<[^>]*x(\w+)>, tensor<", text)
    assert found, f"no dot_general in the {platform} module"
    return set(found)


def _loss(x, w):
    return jaxmx.dot_general(x, w, DIMS, config="mxfp8").sum()


@pytest.mark.parametrize("platform, dtype", [("cpu", "f32"), ("cuda", "bf16"), ("tpu", "bf16")])
def test_mx_matmul_forward_and_backward_carry_the_platforms_compute_dtype(platform, dtype):
    if platform == "cpu" and jaxmx._operand.cpu_has_bf16_dot():
        dtype = "bf16"  # CPUs with bfloat16 dot instructions multiply in bfloat16
    fwd = _dot_operand_types(
        lambda x, w: jaxmx.dot_general(x, w, DIMS, config="mxfp8"), platform, X, W
    )
    bwd = _dot_operand_types(jax.grad(_loss, argnums=(0, 1)), platform, X, W)
    assert fwd == bwd == {dtype}


def test_an_intercepted_model_is_lowered_per_platform():
    def mlp(params, x):
        return jnp.tanh(x @ params["w1"]) @ params["w2"]

    params = {"w1": W, "w2": jnp.ones((16, 4))}
    f = jaxmx.intercept(mlp, "mxfp8")
    assert _dot_operand_types(f, "tpu", params, X) == {"bf16"}
    assert _dot_operand_types(f, "cuda", params, X) == {"bf16"}
    assert "bf16" not in _dot_operand_types(f, "cpu", params, X) or (
        jaxmx._operand.cpu_has_bf16_dot()
    )


@pytest.mark.parametrize("platform", ["cpu", "cuda", "tpu"])
def test_quantize_and_fake_quantize_export_for_every_platform(platform):
    for fn in (
        lambda x: jaxmx.quantize(x, "mxfp4", axis=0).data,
        lambda x: jaxmx.fake_quantize(x, "nvfp4"),
        lambda x: jaxmx.quantize(x, "mx6").micro,
    ):
        exported = jax.export.export(jax.jit(fn), platforms=[platform])(X)
        assert exported.platforms == (platform,)
    if platform == "cpu":
        np.testing.assert_array_equal(np.asarray(exported.call(X)), np.asarray(fn(X)))


def test_a_multi_platform_export_runs_the_cpu_branch_here():
    exported = jax.export.export(jax.jit(_loss), platforms=["cpu", "tpu", "cuda"])(X, W)
    assert float(exported.call(X, W)) == float(jax.jit(_loss)(X, W))


def test_forced_accelerator_records_run_here_and_agree_with_the_cpu():
    want = jax.jit(jax.value_and_grad(_loss, argnums=(0, 1)))(X, W)
    for name in ("tpu", "cuda"):
        with platforms.force(name):
            t = jaxmx.quantize(X, "mxfp4")
            assert t.data.dtype == jnp.float4_e2m1fn  # the accelerator's storage
            np.testing.assert_array_equal(
                np.asarray(jaxmx.dequantize(t)), np.asarray(jaxmx.fake_quantize(X, "mxfp4"))
            )
            got = jax.jit(jax.value_and_grad(_loss, argnums=(0, 1)))(X, W)
            # A new function: jit's cache would return a trace made outside the force.
            text = jax.jit(lambda x, w: _loss(x, w)).lower(X, W).as_text()
        assert "bf16" in text
        # The same exact products (MXFP8 values are bfloat16 numbers) summed in
        # float32 in another order: two orders of n terms differ by at most
        # 2 n 2^-24 times the sum of |terms| (|Q(v)| <= 1.0625 |v| for E4M3).
        ax, aw = jnp.abs(X) * 1.0625, jnp.abs(W) * 1.0625
        bounds = (
            8 * 16 * 64 * 2.0**-23 * float(jnp.sum(ax @ aw)),  # the loss
            16 * 2.0**-23 * jnp.sum(aw, axis=1)[None, :],  # dx = 1 . Q(W)^T
            8 * 2.0**-23 * jnp.sum(ax, axis=0)[:, None],  # dw = Q(X)^T . 1
        )
        for a, b, bound in zip(jax.tree.leaves(got), jax.tree.leaves(want), bounds, strict=True):
            assert np.all(np.abs(np.asarray(a) - np.asarray(b)) <= np.asarray(bound)), name
    assert jaxmx.quantize(X, "mxfp4").data.dtype == jnp.uint8  # no force: one byte per code


def test_force_refuses_unknown_platforms():
    with pytest.raises(ValueError, match="unknown platform 'gpu'; allowed: cpu, cuda, rocm, tpu"):
        with platforms.force("gpu"):
            pass
    assert platforms.forced() is None


def test_no_platform_choice_reads_the_default_backend():
    src = pathlib.Path(jaxmx.__file__).parent
    readers = [p for p in src.rglob("*.py") if "default_backend" in p.read_text()]
    assert not readers, f"jax.default_backend() read in {readers}"
