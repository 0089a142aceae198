"""Every matmul of transformers' Flax BERT and Flax Llama in MX, models unmodified.

The report behind issue 9: module substitution alone put every Dense of
these models in MX but left attention's q.k and p.v (``jnp.einsum`` inside
the attention function) in FP32. ``quantize_model`` on the linen module and
``jaxmx.intercept`` on the apply function must both cover all of them, and
agree bit for bit. Small random configurations (no download).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmx
from jaxmx.flax import quantize_model

transformers = pytest.importorskip("transformers")

pytestmark = [
    # transformers announces the end of its Flax models on import and use.
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

T = 32  # tokens: a multiple of the MX block along every contraction
SMALL = dict(
    vocab_size=96,
    hidden_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=128,
    max_position_embeddings=64,
)


def _ids():
    return (jnp.arange(T, dtype=jnp.int32)[None] * 7) % SMALL["vocab_size"]


def _bert():
    model = transformers.FlaxBertModel(transformers.BertConfig(**SMALL), seed=0)
    ids = _ids()
    args = (ids, jnp.ones_like(ids), jnp.zeros_like(ids), jnp.arange(T)[None], None)
    return model, args, dict(deterministic=True), 6  # matmuls per layer: q k v o up down + 2


def _llama():
    cfg = transformers.LlamaConfig(**SMALL, num_key_value_heads=1)
    model = transformers.FlaxLlamaForCausalLM(cfg, seed=0)
    ids = _ids()
    return model, (ids, jnp.ones_like(ids), jnp.arange(T)[None]), {}, 7


def _out(y):
    return y.logits if hasattr(y, "logits") else y.last_hidden_state


@pytest.mark.parametrize("make", [_bert, _llama], ids=["bert", "llama"])
def test_every_matmul_of_a_transformers_flax_model_runs_in_mx(make):
    model, args, kwargs, dense_per_layer = make()
    variables = {"params": model.params}
    module = model.module

    def fp32(v):
        return _out(module.apply(v, *args, **kwargs))

    ref = fp32(variables)
    # intercept on the unmodified apply function.
    mx_fn = jaxmx.intercept(fp32, "mxfp8")
    y_intercept = jax.jit(mx_fn)(variables)
    cov = mx_fn.coverage
    einsums = [s for s in cov.sites if "->" in s.path]
    # Both attention einsums of every layer, and every Dense.
    assert len(einsums) == 2 * SMALL["num_hidden_layers"]
    assert len(cov.sites) >= (dense_per_layer + 2) * SMALL["num_hidden_layers"]
    assert not cov.high_precision, cov.summary()

    # quantize_model on the linen module: a real nn.Module, same variables.
    mx_module = quantize_model(module, [(".*", "mxfp8")])
    y_module = _out(mx_module.apply(variables, *args, **kwargs))
    assert len(mx_module.coverage.sites) == len(cov.sites)
    assert not mx_module.coverage.high_precision, mx_module.coverage.summary()
    np.testing.assert_array_equal(np.asarray(y_module), np.asarray(y_intercept))
    # Quantization did something (and nothing else changed the model).
    assert not np.array_equal(np.asarray(y_module), np.asarray(ref))
    np.testing.assert_array_equal(
        np.asarray(_out(jaxmx.intercept(module.apply, None)(variables, *args, **kwargs))),
        np.asarray(ref),
    )
