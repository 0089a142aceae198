"""Serving N:M-sparse weights under jaxmx.intercept: compact until the op that reads them.

``jaxmx.intercept`` hands an :class:`~jaxmx.NMSparseTensor` argument to the
interpreter as it is stored; each one is densified (to the MXTensor of
``densify()``) by the equation that reads it, and passes compact through
float casts and into control flow (a ``lax.scan`` over stacked layers slices
it, so each iteration densifies one layer).

What is checked, and against what:

* results: bit for bit those of densifying every sparse weight at the start
  of the call (what ``intercept`` did before; ``expand_sparse`` is that),
  with MX and weight-only rules, jitted and eager, through scan, while,
  cond, checkpoint, jit, float casts and ``vector_ops``; gradients too. Each
  also differs from the unquantized model, so a no-op would fail;
* where the densify happens: the scan's operands are the compact leaves
  (no dense stack goes in), and in an unrolled model each layer's densify
  is emitted after the previous layer's matmul;
* memory: ``memory_analysis().temp_size_in_bytes`` of the compiled program
  against bounds derived from the sizes of one layer's dense codes (one
  byte each) and its float32 decode; never against a measured number.
"""

import jax
import jax.numpy as jnp
import pytest
from jax import lax

import jaxmx

from ._arrays import assert_differs, assert_same, normal

SP = jaxmx.NMSparsity(2, 4)


def sparse_stack(seed, layers, d, fmt="mxfp4"):
    """``layers`` (d, d) weights, 2:4 sparse along their contraction axis, stacked."""
    w = normal(seed, (layers, d, d), scale=d**-0.5)
    return jaxmx.quantize_sparse(w, fmt, SP, axis=1)


def scan_model(params, x):
    def layer(h, w):
        return jnp.tanh(h @ w), None

    return lax.scan(layer, x, params["stack"])[0] @ params["head"]


def loop_model(params, x):
    for w in params["layers"]:
        x = jnp.tanh(x @ w)
    return x


def expand_sparse(tree):
    """``tree`` with every NMSparseTensor densified at once (what intercept did
    at the start of a call before it kept them compact)."""
    sparse = lambda x: isinstance(x, jaxmx.NMSparseTensor)  # noqa: E731
    return jax.tree.map(lambda x: x.densify() if sparse(x) else x, tree, is_leaf=sparse)


def densify_at_start(served):
    """The same served function, every NMSparseTensor densified when it is called."""
    return lambda params, x: served(expand_sparse(params), x)


def float_params(params):
    return jax.tree.map(
        lambda t: t.dequantize() if isinstance(t, jaxmx.NMSparseTensor) else t,
        params,
        is_leaf=lambda t: isinstance(t, jaxmx.NMSparseTensor),
    )


RULES = {
    "mxfp8": "mxfp8",
    "fp4-weights": jaxmx.DotConfig(lhs="mxfp8", rhs="mxfp4"),
    "weight-only": None,
}


# --------------------------------------------------------------------------
# Results: those of densifying at the start, bit for bit.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("rules", list(RULES), ids=list(RULES))
def test_scan_over_stacked_layers_equals_densify_at_start(rules):
    params = {"stack": sparse_stack(0, 4, 64), "head": normal(1, (64, 16))}
    x = normal(2, (8, 64))
    served = jaxmx.intercept(scan_model, RULES[rules], warn=False)
    y = jax.jit(served)(params, x)
    assert_same(y, jax.jit(densify_at_start(served))(params, x))
    assert_same(served(params, x), densify_at_start(served)(params, x))  # eager
    if rules == "weight-only":  # the decoded weights, in the program's own matmuls
        assert_same(y, jax.jit(scan_model)(float_params(params), x))
    else:
        assert_differs(y, jax.jit(scan_model)(float_params(params), x))
        assert served.coverage.counts == "2 of 2 matmuls in MX"
    grad = jax.jit(jax.grad(lambda x: served(params, x).sum()))(x)
    old = jax.jit(jax.grad(lambda x: densify_at_start(served)(params, x).sum()))(x)
    assert_same(grad, old)


def test_the_scan_takes_the_compact_leaves():
    t = sparse_stack(3, 6, 64)
    params = {"stack": t, "head": normal(4, (64, 16))}
    x = normal(5, (8, 64))
    for rules in ("mxfp8", None):
        jaxpr = jax.make_jaxpr(jaxmx.intercept(scan_model, rules, warn=False))(params, x)
        (scan,) = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
        shapes = {tuple(v.aval.shape) for v in scan.invars}
        assert tuple(t.values.data.shape) in shapes and tuple(t.indices.shape) in shapes
        assert (6, 64, 64) not in shapes  # no dense (or decoded) stack goes in
        old = jax.make_jaxpr(densify_at_start(jaxmx.intercept(scan_model, rules, warn=False)))
        (scan,) = [e for e in old(params, x).eqns if e.primitive.name == "scan"]
        assert (6, 64, 64) in {tuple(v.aval.shape) for v in scan.invars}


def _names(jaxpr):
    """Equation names in program order: jit names for jit equations."""
    return [e.params.get("name", e.primitive.name) for e in jaxpr.eqns]


@pytest.mark.parametrize("rules", ["mxfp8", None])
def test_unrolled_layers_densify_each_just_before_its_matmul(rules):
    ws = normal(6, (3, 64, 64), scale=0.125)
    params = {"layers": [jaxmx.quantize_sparse(w, "mxfp4", SP, axis=0) for w in ws]}
    x = normal(7, (8, 64))
    served = jaxmx.intercept(loop_model, rules, warn=False)
    names = _names(jax.make_jaxpr(served)(params, x))
    densify = [i for i, n in enumerate(names) if n == "_densify"]
    tanh = [i for i, n in enumerate(names) if n == "tanh"]
    assert len(densify) == len(tanh) == 3
    assert densify[0] < tanh[0] < densify[1] < tanh[1] < densify[2] < tanh[2]
    assert_same(jax.jit(served)(params, x), jax.jit(densify_at_start(served))(params, x))


def flow_model(params, x):
    """Sparse weights through a cast, cond, while, checkpoint, jit and a non-matmul op."""
    w, v, u = params["w"], params["v"], params["u"]
    h = jnp.tanh(x @ w.astype(jnp.bfloat16))  # the cast keeps it compact
    h = lax.cond(h.sum() > 0, lambda h, v: h @ v, lambda h, v: -(h @ v), h, v)
    h = lax.fori_loop(0, 2, lambda i, h: jnp.tanh(h @ u), h)  # a while, u a const
    h = jax.checkpoint(lambda h, w: jnp.tanh(h @ w))(h, w)
    h = jax.jit(lambda h, v: h @ v)(h, v)
    return h + jnp.sum(u)  # an op that reads the values: decoded


@pytest.mark.parametrize("vector_ops", [None, "bfloat16"])
@pytest.mark.parametrize("rules", ["mxfp8", None])
def test_control_flow_casts_and_other_ops_equal_densify_at_start(rules, vector_ops):
    params = {
        "w": jaxmx.quantize_sparse(normal(8, (64, 64), 0.125), "mxfp4", SP, axis=0),
        "v": jaxmx.quantize_sparse(
            normal(9, (64, 64), 0.125), "mxfp8", jaxmx.NMSparsity(4, 8), axis=0
        ),
        "u": jaxmx.quantize_sparse(normal(10, (64, 64), 0.125), "nvfp4", SP, axis=0),
    }
    x = normal(11, (8, 64))
    served = jaxmx.intercept(flow_model, rules, warn=False, vector_ops=vector_ops)
    y = jax.jit(served)(params, x)
    assert_same(y, jax.jit(densify_at_start(served))(params, x))
    assert_same(served(params, x), densify_at_start(served)(params, x))
    decoded = jax.jit(flow_model)(float_params(params), x)
    if rules is None and vector_ops is None:
        assert_same(y, decoded)  # the decoded weights in the program's own ops
    else:
        assert_differs(y, decoded)


# --------------------------------------------------------------------------
# Memory: the compiled program's temporaries.
# --------------------------------------------------------------------------


def _temp(fn, *args) -> int:
    return int(jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes)


@pytest.mark.parametrize("rules", ["mxfp8", None], ids=["mxfp8", "weight-only"])
def test_a_scan_over_six_sparse_layers_holds_one_dense_layer_at_a_time(rules):
    layers, d = 6, 512
    params = {"stack": sparse_stack(12, layers, d), "head": normal(13, (d, 16))}
    x = normal(14, (8, d))
    served = jaxmx.intercept(scan_model, rules, warn=False)
    new, old = _temp(served, params, x), _temp(densify_at_start(served), params, x)
    codes = d * d  # one layer densified: a byte per code
    decoded = 4 * d * d  # one layer decoded to float32
    # Densified at the start, the scan's input is every layer's dense codes
    # (weight-only: decoded, since the scan was not rebuilt), all live at once.
    per_layer = codes if rules else decoded
    assert old >= layers * per_layer
    # Now each iteration densifies (and decodes) its own layer: about one
    # layer's codes and decode, never more than two layers' worth, and at
    # least layers - 2 dense layers fewer than before.
    assert new <= 2 * (codes + decoded)
    assert new <= old - (layers - 2) * per_layer


def test_unrolled_layers_never_hold_more_than_densified_at_the_start():
    # XLA:CPU's default (concurrency-optimized) scheduler starts every decode
    # that reads only arguments at the top of the program, whichever point
    # the trace emits it at, so an unrolled model holds every layer's decode
    # either way (docs/sparsity.md): not more than before, not less.
    layers, d = 6, 512
    ws = normal(15, (layers, d, d), scale=d**-0.5)
    params = {"layers": [jaxmx.quantize_sparse(w, "mxfp4", SP, axis=0) for w in ws]}
    x = normal(16, (8, d))
    served = jaxmx.intercept(loop_model, "mxfp8", warn=False)
    assert _temp(served, params, x) <= _temp(densify_at_start(served), params, x)
