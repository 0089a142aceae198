"""jaxmx.intercept(..., vector_ops=...): every vector op rounded, matmuls by their rules.

The reference is an interpreter written here, independently of jaxmx's: it
walks the traced jaxpr itself (Python loops for ``scan`` and ``while``, a
Python branch for ``cond``) and rounds each vector op's output with
``jaxmx.round_to``. Results must equal it bit for bit, and must differ from
the float32 program, so a transformation that rounded nothing would fail.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax import lax

import jaxmx
from jaxmx import VectorOps, intercept, round_to
from tests._arrays import assert_differs, assert_same, normal

CFG = jaxmx.preset("mxfp8")
OPS = VectorOps.DEFAULT_OPS
ROUNDABLE = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))
REMAT = jax.extend.core.primitives.remat_p.name  # jax.checkpoint


def assert_on_grid(tree, fmt):
    """Every element is a value of ``fmt`` (rounding it again changes nothing)."""
    for x in jax.tree.leaves(tree):
        np.testing.assert_array_equal(np.asarray(round_to(x, fmt)), np.asarray(x))


# --------------------------------------------------------------------------
# The reference: a per-equation interpreter of its own.
# --------------------------------------------------------------------------


def _floating(x):
    return hasattr(x, "dtype") and np.dtype(x.dtype) in ROUNDABLE


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _ste(x, fmt, rounding, key):
    """round_to with the identity as its derivative (straight-through)."""
    return round_to(x, fmt, rounding=rounding, key=key)


@_ste.defjvp
def _ste_jvp(fmt, rounding, primals, tangents):
    x, key = primals
    return _ste(x, fmt, rounding, key), tangents[0]


def _subjaxprs(eqn):
    """(kind, closed-or-open jaxpr) of the equations the reference enters."""
    p, name = eqn.params, eqn.primitive.name
    if name in ("jit", "scan", REMAT):
        return [p["jaxpr"]]
    if name in ("custom_jvp_call", "custom_vjp_call"):
        return [p["call_jaxpr"]]
    if name == "while":
        return [p["cond_jaxpr"], p["body_jaxpr"]]
    if name == "cond":
        return list(p["branches"])
    return []


def _open(j):
    return (j.jaxpr, j.consts) if hasattr(j, "consts") else (j, ())


def number_sites(jaxpr, fmt_dtype, counter=None, out=None):
    """The documented key numbering: rounded equations and loops, in program
    order, depth first."""
    counter = [0] if counter is None else counter
    out = {} if out is None else out
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        subs = _subjaxprs(eqn)
        if name in ("scan", "while"):
            out[id(eqn)] = counter[0]
            counter[0] += 1
        if subs:
            for s in subs:
                number_sites(_open(s)[0], fmt_dtype, counter, out)
        elif name in OPS and any(
            np.dtype(v.aval.dtype) in ROUNDABLE and np.dtype(v.aval.dtype) != fmt_dtype
            for v in eqn.outvars
        ):
            out[id(eqn)] = counter[0]
            counter[0] += 1
    return out


class Reference:
    """Interprets a jaxpr, rounding each vector op's float outputs with round_to."""

    def __init__(self, fmt, rounding="nearest_even", key=None, matmul=None, ste=False):
        self.fmt, self.rounding, self.key, self.matmul, self.ste = fmt, rounding, key, matmul, ste
        self.fmt_dtype = {"bfloat16": np.dtype(jnp.bfloat16), "float16": np.dtype(np.float16)}[fmt]

    def __call__(self, fn):
        def run(*args):
            closed = jax.make_jaxpr(fn)(*args)
            self.numbers = number_sites(closed.jaxpr, self.fmt_dtype)
            outs = self.run(closed.jaxpr, closed.consts, jax.tree.leaves(args), self.key)
            shape = jax.tree.structure(jax.eval_shape(fn, *args))
            return jax.tree.unflatten(shape, outs)

        return run

    def round(self, eqn, outs, ctx):
        key = None if ctx is None else jax.random.fold_in(ctx, self.numbers[id(eqn)])
        todo = [k for k, x in enumerate(outs) if _floating(x) and x.dtype != self.fmt_dtype]
        new = list(outs)
        for k in todo:
            kk = key if key is None or len(todo) == 1 else jax.random.fold_in(key, k)
            if self.ste:
                new[k] = _ste(outs[k], self.fmt, self.rounding, kk)
            else:
                new[k] = round_to(outs[k], self.fmt, rounding=self.rounding, key=kk)
        return new

    def loop_key(self, eqn, ctx, i):
        if ctx is None:
            return None
        return jax.random.fold_in(jax.random.fold_in(ctx, self.numbers[id(eqn)]), i)

    def run(self, jaxpr, consts, args, ctx):
        env = dict(zip([*jaxpr.constvars, *jaxpr.invars], [*consts, *args], strict=True))
        for eqn in jaxpr.eqns:
            ins = [v.val if hasattr(v, "val") else env[v] for v in eqn.invars]
            outs = self.eqn(eqn, ins, ctx)
            env.update(zip(eqn.outvars, outs, strict=True))
        return [v.val if hasattr(v, "val") else env[v] for v in jaxpr.outvars]

    def sub(self, j, args, ctx):
        jaxpr, consts = _open(j)
        return self.run(jaxpr, consts, args, ctx)

    def eqn(self, eqn, ins, ctx):
        name, p = eqn.primitive.name, eqn.params
        if name in ("jit", REMAT):
            return self.sub(p["jaxpr"], ins, ctx)
        if name in ("custom_jvp_call", "custom_vjp_call"):
            return self.sub(p["call_jaxpr"], ins, ctx)
        if name == "cond":
            return self.sub(p["branches"][int(ins[0])], ins[1:], ctx)
        if name == "scan":
            nc, ncar = p["num_consts"], p["num_carry"]
            consts, carry, xs = ins[:nc], ins[nc : nc + ncar], ins[nc + ncar :]
            ys = []
            order = range(p["length"])
            for i, t in enumerate(reversed(order) if p["reverse"] else order):
                outs = self.sub(
                    p["jaxpr"], [*consts, *carry, *(x[t] for x in xs)], self.loop_key(eqn, ctx, i)
                )
                carry, y = outs[:ncar], outs[ncar:]
                ys.append(y)
            ys = ys[::-1] if p["reverse"] else ys
            stacked = [jnp.stack(col) for col in zip(*ys, strict=True)] if ys and ys[0] else []
            return [*carry, *stacked]
        if name == "while":
            cn, bn = p["cond_nconsts"], p["body_nconsts"]
            cc, bc, carry = ins[:cn], ins[cn : cn + bn], ins[cn + bn :]
            i = 0
            while bool(self.sub(p["cond_jaxpr"], [*cc, *carry], self.loop_key(eqn, ctx, i))[0]):
                carry = self.sub(p["body_jaxpr"], [*bc, *carry], self.loop_key(eqn, ctx, i))
                i += 1
            return carry
        if name == "dot_general" and self.matmul is not None:
            outs = [
                jaxmx.dot_general(*ins, p["dimension_numbers"], config=self.matmul).astype(
                    eqn.outvars[0].aval.dtype
                )
            ]
        else:
            outs = eqn.primitive.bind(*ins, **eqn.params)
            outs = outs if eqn.primitive.multiple_results else [outs]
        if name in OPS:
            outs = self.round(eqn, outs, ctx)
        return outs


# --------------------------------------------------------------------------
# Programs
# --------------------------------------------------------------------------


def mlp(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    h2 = jax.nn.relu(h @ params["w2"])  # relu is a custom_jvp function
    return h2 @ params["w3"], h


def mlp_params():
    return {
        "w1": normal(1, (32, 64), 0.2),
        "b1": normal(2, (64,), 0.1),
        "w2": normal(3, (64, 64), 0.15),
        "w3": normal(4, (64, 8), 0.15),
    }


def block(params, x):
    """layernorm, softmax attention over tokens, GELU MLP."""
    mean = x.mean(-1, keepdims=True)
    var = jnp.mean((x - mean) ** 2, -1, keepdims=True)
    h = (x - mean) * lax.rsqrt(var + 1e-5) * params["g"]
    p = jax.nn.softmax(h @ h.T / math.sqrt(x.shape[-1]), axis=-1)
    a = p @ h
    return x + jax.nn.gelu(a @ params["w"]) + jax.nn.gelu(a, approximate=False), p


def block_params():
    return {"g": 1.0 + normal(5, (32,), 0.1), "w": normal(6, (32, 32), 0.2)}


def rnn(params, xs):
    def step(h, x):
        h = jnp.tanh(h @ params["wh"] + x @ params["wx"])
        return h, jnp.exp(-h * h)

    return lax.scan(step, jnp.zeros((4, 16)), xs)


def rnn_params():
    return {"wh": normal(7, (16, 16), 0.3), "wx": normal(8, (8, 16), 0.3)}


def branchy(x, flag):
    return lax.cond(flag, lambda v: jnp.exp(v) / 3.0, lambda v: jnp.sqrt(jnp.abs(v)) * 1.7, x)


# --------------------------------------------------------------------------
# Nearest-even: bit for bit against the reference
# --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["bfloat16", "float16"])
def test_mlp_equals_reference(fmt):
    params, x = mlp_params(), normal(0, (16, 32))
    f = intercept(mlp, [], vector_ops=fmt)
    ref = Reference(fmt)(mlp)(params, x)
    assert_same(f(params, x), ref)
    assert_same(jax.jit(f)(params, x), ref)
    assert_differs(f(params, x), mlp(params, x))
    assert_on_grid(f(params, x)[1], fmt)  # h: a vector op's output
    cov = f.coverage.vector_ops
    assert dict(cov.rounded) == {"add": 1, "max": 1, "tanh": 1}
    assert dict(cov.left_alone) == {"broadcast_in_dim": 1, "dot_general": 3}


def test_block_equals_reference():
    params, x = block_params(), normal(9, (16, 32))
    f = intercept(block, [], vector_ops="bfloat16")
    ref = Reference("bfloat16")(block)(params, x)
    assert_same(jax.jit(f)(params, x), ref)
    assert_same(f(params, x), ref)
    assert_differs(ref, block(params, x))
    assert_on_grid(ref[1], "bfloat16")  # softmax probabilities
    rounded = dict(f.coverage.vector_ops.rounded)
    for op in ("reduce_sum", "reduce_max", "rsqrt", "exp", "tanh", "erfc", "integer_pow", "div"):
        assert rounded.get(op, 0) >= 1, op
    left = dict(f.coverage.vector_ops.left_alone)
    assert {"broadcast_in_dim", "dot_general", "transpose"} <= set(left)
    assert not set(left) & OPS


def test_scan_rnn_equals_reference():
    params, xs = rnn_params(), normal(10, (6, 4, 8))
    f = intercept(rnn, [], vector_ops="bfloat16")
    ref = Reference("bfloat16")(rnn)(params, xs)
    assert_same(jax.jit(f)(params, xs), ref)
    assert_differs(ref, rnn(params, xs))
    assert_on_grid(ref, "bfloat16")
    assert dict(f.coverage.vector_ops.rounded) == {
        "exp": 1,
        "add": 1,
        "mul": 1,
        "neg": 1,
        "tanh": 1,
    }


@pytest.mark.parametrize("flag", [True, False])
def test_cond_equals_reference(flag):
    x = normal(11, (64,))
    f = intercept(branchy, [], vector_ops="float16")
    ref = Reference("float16")(branchy)(x, flag)
    assert_same(jax.jit(f)(x, flag), ref)
    assert_differs(ref, branchy(x, flag))
    assert_on_grid(ref, "float16")


def test_while_loop_equals_reference():
    def newton(x):  # sqrt(2) by Newton steps while the step is large
        def body(c):
            y, _ = c
            new = 0.5 * (y + x / y)
            return new, jnp.max(jnp.abs(new - y))

        return lax.while_loop(lambda c: c[1] > 1e-3, body, (x, jnp.float32(1.0)))[0]

    x = 1.0 + jnp.abs(normal(12, (32,)))
    f = intercept(newton, [], vector_ops="bfloat16")
    ref = Reference("bfloat16")(newton)(x)
    assert_same(jax.jit(f)(x), ref)
    assert_on_grid(ref, "bfloat16")
    assert_differs(ref, newton(x))


def test_checkpointed_scan_over_layers():
    def layers(stack, x):
        layer = jax.checkpoint(lambda h, w: (jax.nn.gelu(h @ w) + h, None))
        return jnp.sum(lax.scan(layer, x, stack)[0] ** 2)

    stack, x = normal(18, (3, 32, 32), 0.2), normal(19, (8, 32))
    f = intercept(layers, CFG, vector_ops="bfloat16")
    ref = Reference("bfloat16", matmul=CFG, ste=True)(layers)
    assert_same(jax.jit(f)(stack, x), ref(stack, x))
    assert_differs(f(stack, x), intercept(layers, CFG)(stack, x))
    assert_same(jax.jit(jax.grad(f))(stack, x), jax.jit(jax.grad(ref))(stack, x))


def test_mx_matmuls_still_quantized():
    params, x = mlp_params(), normal(0, (16, 32))
    f = intercept(mlp, CFG, vector_ops="bfloat16")
    ref = Reference("bfloat16", matmul=CFG)(mlp)(params, x)
    assert_same(jax.jit(f)(params, x), ref)
    assert f.coverage.counts == "3 of 3 matmuls in MX"
    assert_differs(ref, Reference("bfloat16")(mlp)(params, x))  # the MX matmuls matter
    assert_differs(ref, intercept(mlp, CFG)(params, x))  # and so does the rounding


def test_matmul_outputs_rounded_when_listed():
    params, x = mlp_params(), normal(0, (16, 32))
    ops = OPS | {"dot_general"}
    f = intercept(mlp, [], vector_ops=VectorOps("bfloat16", ops=ops))
    logits, _ = f(params, x)
    assert_on_grid(logits, "bfloat16")
    assert dict(f.coverage.vector_ops.rounded)["dot_general"] == 3
    assert_differs(logits, intercept(mlp, [], vector_ops="bfloat16")(params, x)[0])


def test_representable_program_is_unchanged():
    # Small integers: every op's exact result is on the bfloat16 grid, so
    # rounding must change nothing, while the program still runs rounded ops.
    def f(x, y):
        return jnp.maximum(x * y - 3.0, -x) + jnp.sum(x, keepdims=True)

    x = jnp.arange(-8.0, 8.0)
    y = jnp.flip(x) / 2
    g = intercept(f, [], vector_ops="bfloat16")
    assert_same(g(x, y), f(x, y))
    assert g.coverage.vector_ops.total == 6


# --------------------------------------------------------------------------
# Gradients: the VJP of the rounded program, rounding's derivative the identity
# --------------------------------------------------------------------------


def smooth_mlp(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean(jax.nn.gelu(h @ params["w2"]) @ params["w3"])


def test_grad_is_vjp_of_rounded_program():
    params, x = mlp_params(), normal(0, (16, 32))
    f = intercept(smooth_mlp, [], vector_ops="bfloat16")
    g = jax.jit(jax.grad(f))(params, x)
    ref = jax.jit(jax.grad(Reference("bfloat16", ste=True)(smooth_mlp)))(params, x)
    assert_same(g, ref)
    assert_differs(g, jax.grad(smooth_mlp)(params, x))
    # The forward value under differentiation is the rounded one.
    value, _ = jax.value_and_grad(f)(params, x)
    assert_same(value, f(params, x))


def test_grad_through_scan():
    params, xs = rnn_params(), normal(10, (6, 4, 8))

    def loss(p, xs):
        h, ys = rnn(p, xs)
        return jnp.sum(h) + jnp.mean(ys)

    g = jax.jit(jax.grad(intercept(loss, CFG, vector_ops="bfloat16")))(params, xs)
    ref = jax.jit(jax.grad(Reference("bfloat16", matmul=CFG, ste=True)(loss)))(params, xs)
    assert_same(g, ref)


def test_custom_derivative_rules_are_kept():
    @jax.custom_jvp
    def f(x):
        return jnp.sin(x) * 1.3

    f.defjvp(lambda p, t: (f(*p), 3.0 * t[0]))  # deliberately not sin's derivative

    @jax.custom_vjp
    def g(x):
        return jnp.exp(x) / 3.0

    g.defvjp(lambda x: (g(x), x), lambda x, ct: (-2.0 * ct,))

    x = normal(13, (64,))
    for fn, slope in ((f, 3.0), (g, -2.0)):
        h = intercept(fn, [], vector_ops="bfloat16")
        loss = lambda v, h=h: jnp.sum(h(v))  # noqa: E731
        assert_same(h(x), Reference("bfloat16")(fn)(x))
        assert_differs(h(x), fn(x))
        assert_same(jax.grad(loss)(x), jnp.full_like(x, slope))
        assert_same(jax.jit(jax.value_and_grad(loss))(x)[0], loss(x))
        assert sum(n for _, n in h.coverage.vector_ops.rounded) == 2


def test_mx_tensor_argument_into_kept_custom_function():
    @jax.custom_jvp
    def f(w, x):
        return jnp.tanh(x @ w) * 1.5

    f.defjvp(lambda p, t: (f(*p), t[1] @ p[0]))
    w, x = normal(20, (64, 32)), normal(21, (4, 64))
    served = jaxmx.quantize_params({"w": w}, "mxfp8", axes={"w": 0})
    h = intercept(lambda p, x: f(p["w"], x), CFG, vector_ops="bfloat16")
    dense = jaxmx.dequantize(served["w"])
    assert_same(h(served, x), Reference("bfloat16")(f)(dense, x))
    assert_same(jax.grad(lambda v: jnp.sum(h(served, v)))(x), jnp.ones((4, 32)) @ dense.T)


def test_inline_custom_derivatives_drop_the_rule():
    @jax.custom_jvp
    def f(x):
        return jnp.sin(x) * 1.3

    f.defjvp(lambda p, t: (f(*p), 3.0 * t[0]))
    x = normal(13, (64,))
    h = intercept(f, [], vector_ops="bfloat16", custom_derivatives="inline")
    assert_same(h(x), Reference("bfloat16")(f)(x))
    # The rounded sin's derivative, straight through: cos(x) * 1.3.
    assert_same(jax.grad(lambda v: jnp.sum(h(v)))(x), jnp.cos(x) * 1.3)


# --------------------------------------------------------------------------
# Stochastic rounding
# --------------------------------------------------------------------------


def sr(key, fmt="bfloat16"):
    return VectorOps(fmt, "stochastic", key=key)


def test_stochastic_equals_reference_with_documented_keys():
    key = jax.random.key(42)
    params, x = mlp_params(), normal(0, (16, 32))
    ref = Reference("bfloat16", "stochastic", key)(mlp)(params, x)
    assert_same(jax.jit(intercept(mlp, [], vector_ops=sr(key)))(params, x), ref)
    params, xs = rnn_params(), normal(10, (6, 4, 8))
    ref = Reference("bfloat16", "stochastic", key)(rnn)(params, xs)
    assert_same(jax.jit(intercept(rnn, [], vector_ops=sr(key)))(params, xs), ref)
    assert_on_grid(ref, "bfloat16")


def test_stochastic_same_key_same_result_other_key_differs():
    params, x = block_params(), normal(9, (16, 32))
    run = jax.jit(lambda key: intercept(block, [], vector_ops=sr(key))(params, x))
    one = run(jax.random.key(1))
    assert_same(one, run(jax.random.key(1)))
    assert_same(one, intercept(block, [], vector_ops=sr(jax.random.key(1)))(params, x))
    assert_differs(one, run(jax.random.key(2)))
    assert_differs(one, intercept(block, [], vector_ops="bfloat16")(params, x))
    assert_on_grid(one[1], "bfloat16")


def test_stochastic_key_differs_per_iteration():
    # Every iteration rounds the same value: with one key per iteration the
    # rows differ, with one key for all they would be equal.
    x = normal(14, (256,))

    def scanned(x):
        return lax.scan(lambda c, _: (c, jnp.exp(x) / 3.0), 0.0, None, length=4)[1]

    def looped(x):
        def body(c):
            i, acc = c
            return i + 1, acc.at[i].set(jnp.exp(x) / 3.0)

        return lax.while_loop(lambda c: c[0] < 4, body, (0, jnp.zeros((4, 256))))[1]

    for fn in (scanned, looped):
        rows = np.asarray(jax.jit(intercept(fn, [], vector_ops=sr(jax.random.key(3))))(x))
        for i in range(1, 4):
            assert not np.array_equal(rows[0], rows[i]), fn.__name__


def test_stochastic_rounding_is_unbiased():
    # Each output is x * c rounded up or down to a neighbour one bfloat16 ulp
    # apart. Over K keys the mean of such a bounded variable is within
    # t = ulp * sqrt(ln(2 M / delta) / (2 K)) of its expectation for all M
    # elements with probability >= 1 - delta (Hoeffding, union bound); the
    # expectation is the float32 product when the rounding is unbiased.
    # Rounding to nearest instead would be off by up to half an ulp.
    m, k, delta = 64, 2000, 1e-6
    x = normal(15, (m,))
    c = jnp.float32(1.1)
    keys = jax.random.split(jax.random.key(7), k)
    samples = jax.jit(jax.vmap(lambda key: intercept(lambda v: v * c, [], vector_ops=sr(key))(x)))(
        keys
    )
    exact = np.asarray(x * c, np.float64)
    _, e = np.frexp(exact)
    ulp = np.ldexp(1.0, e - 8)  # bfloat16: 8 significant bits
    t = ulp * math.sqrt(math.log(2 * m / delta) / (2 * k))
    mean = np.asarray(samples, np.float64).mean(0)
    assert np.all(np.abs(mean - exact) <= t)
    assert np.all(np.asarray(samples) != exact[None])  # all rounded, none exact
    assert np.all(np.abs(np.asarray(samples) - exact[None]) < ulp)  # to a neighbour


def test_traced_key_inside_jit():
    params, x = mlp_params(), normal(0, (16, 32))

    @jax.jit
    def step(params, x, key):
        f = intercept(mlp, [], vector_ops=sr(key))
        return jax.grad(lambda p: jnp.sum(f(p, x)[0]))(params), f(params, x)

    g1, y1 = step(params, x, jax.random.key(1))
    g2, y2 = step(params, x, jax.random.key(2))
    assert_differs(y1, y2)
    assert_differs(g1, g2)
    assert_same(y1, intercept(mlp, [], vector_ops=sr(jax.random.key(1)))(params, x))


# --------------------------------------------------------------------------
# Arguments, errors and the coverage record
# --------------------------------------------------------------------------


def test_default_is_unchanged():
    params, x = mlp_params(), normal(0, (16, 32))
    f = intercept(mlp, CFG)
    assert f.coverage_for(params, x).vector_ops is None
    assert_same(f(params, x), intercept(mlp, CFG, vector_ops=None)(params, x))
    assert "vector ops" not in f.coverage.summary()


def test_coverage_summary_lists_rounded_and_left_alone():
    f = intercept(lambda x: jnp.exp(x.T) + 1.0, [], vector_ops="bfloat16")
    cov = f.coverage_for(jnp.ones((2, 3)))
    assert cov.vector_ops.rounded == (("add", 1), ("exp", 1))
    assert cov.vector_ops.left_alone == (("transpose", 1),)
    assert cov.summary().splitlines()[1:] == [
        "2 vector ops rounded to bfloat16 (nearest_even)",
        "  rounded:    add 1, exp 1",
        "  left alone: transpose 1 (float outputs not rounded)",
    ]


def test_ops_choose_what_is_rounded():
    x = normal(16, (64,))
    f = intercept(lambda v: jnp.exp(v) * 3.0, [], vector_ops=VectorOps("bfloat16", ops={"exp"}))
    e = round_to(jnp.exp(x), "bfloat16")
    assert_same(f(x), e * 3.0)
    assert f.coverage.vector_ops.left_alone == (("mul", 1),)


def test_unsupported_float_outputs_are_left_alone():
    def f(x):
        return (x * 2.0).astype(ml_dtypes.float8_e4m3fn), x * 3.0

    g = intercept(f, [], vector_ops="bfloat16")
    _, y = g(normal(17, (8,)))
    assert dict(g.coverage.vector_ops.left_alone) == {"convert_element_type[float8_e4m3fn]": 1}
    assert dict(g.coverage.vector_ops.rounded) == {"mul": 2}
    assert_on_grid(y, "bfloat16")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"format": "bfloat17"}, ValueError, r"format: unknown float format 'bfloat17'; known:"),
        ({"format": 3}, TypeError, r"format: fmt must be a format name"),
        (
            {"format": "bfloat16", "rounding": "nearest"},
            ValueError,
            r"unknown VectorOps rounding 'nearest'; allowed: nearest_even, .*stochastic",
        ),
        (
            {"format": "bfloat16", "rounding": "stochastic"},
            ValueError,
            r"rounding='stochastic' needs a PRNG key",
        ),
        (
            {"format": "bfloat16", "key": jax.random.key(0)},
            ValueError,
            r"a key was given but VectorOps rounding is 'nearest_even'",
        ),
        (
            {"format": "bfloat16", "rounding": "stochastic", "key": 3},
            TypeError,
            r"key must be one PRNG key.*got 3",
        ),
        (
            {"format": "bfloat16", "ops": {"exq"}},
            ValueError,
            r"unknown primitive name 'exq'; did you mean .*'exp'.*Allowed: .*VectorOps.DEFAULT_OPS",
        ),
        ({"format": "bfloat16", "ops": {"scan"}}, ValueError, r"'scan' is a control-flow"),
        ({"format": "bfloat16", "ops": "exp"}, TypeError, r"set of primitive names.*got 'exp'"),
    ],
)
def test_errors_name_given_and_allowed(kwargs, error, match):
    with pytest.raises(error, match=match):
        VectorOps(**kwargs)


def test_vector_ops_argument_type():
    with pytest.raises(TypeError, match=r"vector_ops must be None, a format name .* got 16"):
        intercept(jnp.exp, [], vector_ops=16)
    with pytest.raises(ValueError, match="unknown float format 'bf17'"):
        intercept(jnp.exp, [], vector_ops="bf17")
    assert intercept(jnp.exp, [], vector_ops="fp16").vector_ops == VectorOps("fp16")
