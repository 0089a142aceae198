"""jaxmx.intercept: every matmul a function runs, in MX, by rules.

The reference for each result is the same program written with explicit
``jaxmx.dot_general`` / ``jaxmx.conv_general_dilated`` calls (outputs and
gradients bit for bit), or the unmodified program for what must stay in
high precision (bit for bit). Every MX check also asserts that the result
differs from FP32, so a transformation that did nothing would fail.
"""

import functools
import inspect
import math

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import jaxmx
from jaxmx.intercept import Coverage, MatmulSite, intercept
from tests._arrays import assert_differs, assert_same, normal

CFG = jaxmx.preset("mxfp8")
CFG4 = jaxmx.preset("mxfp4")
NT = (((1,), (0,)), ((), ()))  # x @ w
NN = (((1,), (1,)), ((), ()))  # q @ k.T
CONV_DN = ("NHWC", "HWIO", "NHWC")

W, H, D, V, T, B = 64, 2, 32, 16, 32, 2  # width, heads, head dim, vocab, tokens, batch


# --------------------------------------------------------------------------
# Plain JAX: @, einsum, lax.dot_general, conv; control flow.
# --------------------------------------------------------------------------


def plain(params, x, img):
    h = jnp.tanh(x @ params["w"])  # matmul
    s = jnp.einsum("td,sd->ts", h, params["k"])  # einsum, contracts d
    o = lax.dot_general(s, params["v"], NT)  # lax
    y = lax.conv_general_dilated(img, params["kern"], (1, 1), "SAME", dimension_numbers=CONV_DN)
    return o, y


def plain_explicit(params, x, img, cfg=CFG):
    dot = functools.partial(jaxmx.dot_general, config=cfg)
    h = jnp.tanh(dot(x, params["w"], NT))
    s = dot(h, params["k"], NN)
    o = dot(s, params["v"], NT)
    y = jaxmx.conv_general_dilated(
        img, params["kern"], (1, 1), "SAME", dimension_numbers=CONV_DN, config=cfg
    )
    return o, y


@pytest.fixture(scope="module")
def plain_args():
    params = {
        "w": normal(0, (32, 64), 0.2),
        "k": normal(1, (32, 64)),
        "v": normal(2, (32, 32)),
        "kern": normal(3, (3, 3, 32, 8)),
    }
    return params, normal(4, (8, 32)), normal(5, (2, 6, 6, 32))


def test_plain_function_equals_explicit_jaxmx(plain_args):
    mx = intercept(plain, CFG)
    out = mx(*plain_args)
    assert_same(out, plain_explicit(*plain_args))
    assert_same(jax.jit(mx)(*plain_args), jax.jit(plain_explicit)(*plain_args))
    assert_differs(out, plain(*plain_args))
    cov = mx.coverage
    assert cov.counts == "4 of 4 matmuls in MX"
    assert [s.op for s in cov.sites] == ["dot_general"] * 3 + ["conv_general_dilated"]
    assert [s.operands for s in cov.sites] == [("", "w"), ("", "k"), ("", "v"), ("", "kern")]
    assert cov.sites[1].path == "td,sd->ts/dot_general"  # jnp.einsum names its spec
    assert cov.sites[3].shapes == ((2, 6, 6, 32), (3, 3, 32, 8))
    assert all(s.config == CFG and s.rule == ".*" for s in cov.sites)


def test_grad_equals_grad_of_explicit(plain_args):
    params, x, img = plain_args

    def loss(f):
        return lambda p: sum(jnp.sum(o**2) for o in f(p, x, img))

    g = jax.grad(loss(intercept(plain, CFG)))(params)
    assert_same(g, jax.grad(loss(plain_explicit))(params))
    assert_differs(g, jax.grad(loss(plain))(params))


def test_vmap_equals_vmap_of_explicit(plain_args):
    params, x, img = plain_args
    xs = jnp.stack([x, 2 * x, -x])
    mx = jax.vmap(intercept(plain, CFG), in_axes=(None, 0, None))
    ref = jax.vmap(plain_explicit, in_axes=(None, 0, None))
    assert_same(mx(params, xs, img), ref(params, xs, img))


def layers(params, x):
    """Scan over stacked layers, each rematerialized."""

    @jax.checkpoint
    def layer(h, w):
        return jnp.tanh(h @ w), None

    return lax.scan(layer, x, params["stack"])[0]


def test_scan_over_layers_with_remat(plain_args):
    x = plain_args[1]
    params = {"stack": normal(6, (3, 32, 32), 0.2)}

    def explicit(params, x):
        layer = lambda h, w: (jnp.tanh(jaxmx.dot_general(h, w, NT, config=CFG)), None)  # noqa: E731
        return lax.scan(jax.checkpoint(layer), x, params["stack"])[0]

    mx = intercept(layers, CFG)
    assert_same(mx(params, x), explicit(params, x))
    assert_differs(mx(params, x), layers(params, x))
    (site,) = mx.coverage.sites
    assert site.mx and site.within == "scan(length=3)/checkpoint"
    assert site.operands == ("", "stack")  # the scanned-over slice is still the weight
    loss = lambda f: lambda p: jnp.sum(f(p, x) ** 2)  # noqa: E731
    assert_same(jax.grad(loss(mx))(params), jax.grad(loss(explicit))(params))
    # The rebuilt scan keeps its remat: the jaxpr of the gradient has one.
    assert "remat" in str(jax.make_jaxpr(jax.grad(loss(mx)))(params))


def test_while_cond_jit_and_named_call_are_entered(plain_args):
    x, w = plain_args[1], normal(7, (32, 32), 0.2)

    def f(x, w, n, explicit=False):
        mm = (lambda a, b: jaxmx.dot_general(a, b, NT, config=CFG)) if explicit else jnp.matmul
        y = lax.fori_loop(0, n, lambda i, h: jnp.tanh(mm(h, w)), x)  # n traced: a while loop
        y = lax.cond(y.sum() > 0, lambda a: mm(a, w), lambda a: -mm(a, w), y)
        y = jax.jit(lambda a: mm(a, w))(y)
        return jax.named_call(lambda a: mm(a, w), name="proj")(y)

    mx = intercept(f, CFG)
    n = jnp.int32(2)
    assert_same(mx(x, w, n), f(x, w, n, explicit=True))
    assert_differs(mx(x, w, n), f(x, w, n))
    within = [s.within for s in mx.coverage.sites]
    assert within == ["while", "cond[0]", "cond[1]", "jit(<lambda>)", ""]
    assert mx.coverage.sites[-1].path == "proj/dot_general"
    assert mx.coverage.counts == "5 of 5 matmuls in MX"


def test_shard_map_body_is_entered():
    mesh = jax.make_mesh((2,), ("d",))
    x = jax.device_put(normal(8, (4, 32)), jax.NamedSharding(mesh, jax.P("d")))
    w = normal(9, (32, 32))

    def f(x, w, dot):
        return jax.shard_map(
            lambda a, b: dot(a, b), mesh=mesh, in_specs=(jax.P("d"), jax.P()), out_specs=jax.P("d")
        )(x, w)

    mx = intercept(f, CFG)
    out = mx(x, w, jnp.matmul)
    assert_same(out, f(x, w, lambda a, b: jaxmx.dot_general(a, b, NT, config=CFG)))
    assert_differs(out, f(x, w, jnp.matmul))
    assert mx.coverage.sites[0].within == "shard_map"


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_inlined_jit_keeps_its_shardings(axis_type):
    mesh = jax.make_mesh((2,), ("d",), axis_types=(getattr(jax.sharding.AxisType, axis_type),))
    rows = jax.NamedSharding(mesh, jax.P("d"))

    def f(x, w):
        return jax.jit(jnp.matmul, in_shardings=(rows, None), out_shardings=rows)(x, w)

    x, w = np.ones((4, 32), np.float32), np.ones((32, 32), np.float32)  # uncommitted
    mx = intercept(f, CFG)
    for out in (mx(x, w), jax.jit(mx)(x, w)):
        assert out.sharding.spec[0] == "d"
    assert mx.coverage.sites[0].within == "jit(matmul)"


def test_weights_get_the_weight_formats_wherever_they_sit():
    cfg = jaxmx.preset("mxfp4_weights")  # MXFP4 weights, MXFP6 activations

    def f(p, x):
        h = p["weight"] @ x  # weight on the left, as in Equinox's Linear
        s = jnp.einsum("ij,kj->ik", h, h)  # two activations
        return s @ p["kernel"]

    p = {"weight": normal(16, (32, 32)), "kernel": normal(17, (32, 16))}
    x = normal(18, (32, 32))
    mx = intercept(f, cfg, weights=r"kernel|weight")
    left, acts, right = mx.coverage_for(p, x).sites
    fmt = lambda c, role: c.role(role).name  # noqa: E731
    assert (fmt(left.config, "lhs"), fmt(left.config, "rhs")) == ("mxfp4_e2m1", "mxfp6_e3m2")
    assert (fmt(left.config, "lhs_bwd"), fmt(left.config, "rhs_bwd")) == (
        "mxfp4_e2m1",
        "mxfp6_e3m2",
    )
    assert left.reason.endswith("(weight on the left: roles swapped)")
    assert acts.config == cfg.for_activations() and right.config == cfg

    dot = lambda a, b, dims, c: jaxmx.dot_general(a, b, dims, config=c)  # noqa: E731
    h = dot(p["weight"], x, NT, left.config)
    ref = dot(dot(h, h, NN, acts.config), p["kernel"], NT, cfg)
    assert_same(mx(p, x), ref)
    assert_differs(mx(p, x), intercept(f, cfg)(p, x))  # without weights=: other formats


# --------------------------------------------------------------------------
# What stays in high precision, and is reported.
# --------------------------------------------------------------------------


def test_integer_dots_and_none_rules_stay_exact(plain_args):
    params, x, _ = plain_args

    def f(params, x):
        with jax.named_scope("keep"):
            kept = x @ params["w"]
        idx = jnp.arange(6) @ jnp.arange(6).reshape(6, 1)
        return kept, x @ params["w"], idx

    mx = intercept(f, [("keep", None), (".*", CFG)])
    kept, quant, idx = mx(params, x)
    ref_kept, ref, ref_idx = f(params, x)
    assert_same((kept, idx), (ref_kept, ref_idx))
    assert_differs(quant, ref)
    sites = mx.coverage.sites
    assert [s.mx for s in sites] == [False, False, True]  # program order
    assert sites[0].reason == "high (rule 'keep' says high precision)"
    assert sites[0].rule == "keep" and sites[0].config is None
    assert "int32 operands" in sites[1].reason and sites[1].dtypes == ("int32", "int32")
    assert mx.coverage.counts == "1 of 3 matmuls in MX"


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp8"])
def test_a_widening_cast_keeps_the_narrow_rounding_of_an_mx_weight(fmt):
    # w.astype(bf16).astype(f32): the weight's values are rounded to bf16
    # first; folding both casts into the MXTensor's decode dtype would skip
    # that rounding (NVFP4's values, scaled by a float32 tensor scale, are
    # not bf16 numbers).
    w = normal(3, (64, 32))
    t = jaxmx.quantize(w, fmt, axis=0)

    def f(w, x):
        return x @ w.astype(jnp.bfloat16).astype(jnp.float32)

    x = normal(4, (4, 64))
    got = jax.jit(intercept(f, None))(t, x)
    assert_same(got, f(jaxmx.dequantize(t), x))
    if fmt == "nvfp4":  # the bf16 rounding does something to these values
        assert_differs(got, x @ jaxmx.dequantize(t))


def test_no_rule_matched_is_reported():
    mx = intercept(lambda x, w: x @ w, [("nothing", CFG)], warn=False)
    cov = mx.coverage_for(jax.ShapeDtypeStruct((4, 32), jnp.float32), jnp.ones((32, 8)))
    assert cov.counts == "0 of 1 matmuls in MX"
    assert cov.sites[0].reason == "high (no rule matched)"
    assert cov.unmatched == ("nothing",)


def test_custom_vjp_kept_or_inlined():
    @jax.custom_vjp
    def proj(x, w):
        return x @ w

    proj.defvjp(lambda x, w: (x @ w, (x, w)), lambda r, g: (g @ r[1].T, r[0].T @ g))
    x, w = normal(10, (4, 32)), normal(11, (32, 32))

    kept = intercept(proj, CFG)
    assert_same(kept(x, w), proj(x, w))
    (site,) = kept.coverage.sites
    assert not site.mx and "custom_vjp function 'proj'" in site.reason

    inlined = intercept(proj, CFG, custom_derivatives="inline")
    assert_same(inlined(x, w), jaxmx.dot_general(x, w, NT, config=CFG))
    assert inlined.coverage.sites[0].mx
    loss = lambda f: lambda w: jnp.sum(f(x, w) ** 2)  # noqa: E731
    ref = jax.grad(loss(lambda x, w: jaxmx.dot_general(x, w, NT, config=CFG)))(w)
    assert_same(jax.grad(loss(inlined))(w), ref)


def test_jaxmx_ops_are_not_quantized_again():
    x, w = normal(12, (4, 32)), normal(13, (32, 32))

    def f(x, w):
        return jaxmx.dot_general(x, w, NT, config=CFG4) + x @ w

    mx = intercept(f, CFG)
    ref = jaxmx.dot_general(x, w, NT, config=CFG4) + jaxmx.dot_general(x, w, NT, config=CFG)
    assert_same(mx(x, w), ref)
    first, second = mx.coverage.sites
    assert first.mx and first.reason == "jaxmx op in the function (its own config)"
    assert second.mx and second.config == CFG
    # Intercepting an intercepted function changes nothing either.
    again = intercept(mx, CFG4, warn=False)
    assert_same(again(x, w), ref)
    assert again.coverage.unmatched == (".*",)  # every matmul was jaxmx's already


# --------------------------------------------------------------------------
# Models: linen, nnx, Equinox, each with attention in plain functions.
# --------------------------------------------------------------------------


def attend(q, k, v):
    """Third-party style attention: two einsums no layer owns."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        q, k, v = (nn.DenseGeneral((H, D), name=n)(h) for n in "qkv")
        x = x + nn.DenseGeneral(W, axis=(-2, -1), name="out")(attend(q, k, v))
        h = nn.gelu(nn.Dense(2 * W, name="mlp_in")(nn.LayerNorm()(x)))
        return x + nn.Dense(W, name="mlp_out")(h)


class LinenLM(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(W, name="embed")(x)
        for i in range(2):
            x = nn.remat(Block)(name=f"block_{i}")(x)
        return x, nn.Dense(V, name="head")(x)  # features, logits


@pytest.fixture(scope="module")
def tokens():
    return normal(20, (B, T, 32))


@pytest.fixture(scope="module")
def linen_lm(tokens):
    model = LinenLM()
    return model, model.init(jax.random.key(0), tokens)


def test_linen_every_matmul_in_mx(linen_lm, tokens):
    model, params = linen_lm
    mx = intercept(model.apply, [(".*", CFG)])
    _, logits = mx(params, tokens)
    assert_differs(logits, model.apply(params, tokens)[1])
    cov = mx.coverage
    assert cov.counts == "18 of 18 matmuls in MX"  # embed, 2 x (q k v qk pv out in out), head
    paths = [s.path for s in cov.sites]
    assert paths[:7] == [
        "LinenLM/embed/dot_general",
        "LinenLM/block_0/q/dot_general",
        "LinenLM/block_0/k/dot_general",
        "LinenLM/block_0/v/dot_general",
        "LinenLM/block_0/bqhd,bkhd->bhqk/dot_general",
        "LinenLM/block_0/bhqk,bkhd->bqhd/dot_general",
        "LinenLM/block_0/out/dot_general",
    ]
    assert cov.sites[1].operands == ("", "params/block_0/q/kernel")
    assert cov.sites[1].within == "checkpoint"  # nn.remat


def test_linen_none_rule_keeps_head_exact(linen_lm, tokens):
    model, params = linen_lm
    mx = intercept(model.apply, [("head", None), (".*", CFG)])
    feats, logits = mx(params, tokens)
    assert_differs(feats, model.apply(params, tokens)[0])
    head = nn.Dense(V).apply({"params": params["params"]["head"]}, feats)
    assert_same(logits, head)
    assert mx.coverage.counts == "17 of 18 matmuls in MX"
    assert [s.path for s in mx.coverage.high_precision] == ["LinenLM/head/dot_general"]
    # Rules that say None everywhere give back the model, bit for bit.
    assert_same(intercept(model.apply, [(".*", None)])(params, tokens), model.apply(params, tokens))


def test_linen_path_root_gives_module_paths(linen_lm, tokens):
    model, params = linen_lm
    mx = intercept(model.apply, [("^block_1/", None), (".*", CFG)], path_root="LinenLM")
    cov = mx.coverage_for(params, tokens)
    assert cov.sites[0].path == "embed/dot_general"
    assert [s.path for s in cov.high_precision][:2] == [
        "block_1/q/dot_general",
        "block_1/k/dot_general",
    ]
    assert cov.counts == "10 of 18 matmuls in MX"


def test_linen_attention_by_op_path(linen_lm, tokens):
    model, params = linen_lm
    # The einsums of attend() have no module of their own; their op path names them.
    mx = intercept(model.apply, [(r"bhqk", CFG4), (".*", CFG)])
    cfgs = {s.path.split("/")[-2]: s.config for s in mx.coverage_for(params, tokens).sites}
    assert cfgs["bqhd,bkhd->bhqk"] == cfgs["bhqk,bkhd->bqhd"] == CFG4
    assert cfgs["q"] == cfgs["head"] == CFG


def test_linen_quantize_model_covers_plain_function_matmuls(linen_lm, tokens):
    """quantize_model swaps the layers, and its top-level apply intercepts what no layer owns."""
    import jaxmx.flax

    model, params = linen_lm
    layers = jaxmx.flax.quantize_model(model, CFG)
    layers.apply(params, tokens)
    cov = layers.coverage
    assert cov.counts == "18 of 18 matmuls in MX"
    jaxmx_ops = [s for s in cov.sites if s.config is None]  # quantized by the layers
    assert len(jaxmx_ops) == 14
    assert {s.path.split("/")[-2] for s in cov.sites if s.config == CFG} == {
        "bqhd,bkhd->bhqk",
        "bhqk,bkhd->bqhd",
    }
    # An intercept on top finds every matmul already a jaxmx op.
    outer = intercept(layers.apply, CFG, warn=False).coverage_for(params, tokens)
    assert outer.counts == "18 of 18 matmuls in MX"
    assert all(s.config is None for s in outer.sites)
    # scope="modules": the layers only; the attention einsums stay as written.
    modules = jaxmx.flax.quantize_model(model, CFG, scope="modules")
    only = intercept(modules.apply, None, warn=False).coverage_for(params, tokens)
    assert only.counts == "14 of 18 matmuls in MX"


class NNXBlock(nnx.Module):
    def __init__(self, rngs):
        self.attn = nnx.MultiHeadAttention(H, W, qkv_features=H * D, decode=False, rngs=rngs)
        self.q, self.k = nnx.Linear(W, W, rngs=rngs), nnx.Linear(W, W, rngs=rngs)
        self.mlp = nnx.Linear(W, W, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(x)  # flax's own attention
        split = lambda t: t.reshape(*t.shape[:-1], H, D)  # noqa: E731
        q, k = split(self.q(x)), split(self.k(x))
        x = x + attend(q, k, q).reshape(x.shape)  # attention in a plain function
        return x + self.mlp(jax.nn.gelu(x))


class NNXLM(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Linear(32, W, rngs=rngs)
        self.blocks = nnx.List([NNXBlock(rngs) for _ in range(2)])
        self.head = nnx.Linear(W, V, rngs=rngs)

    def __call__(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return x, self.head(x)


def test_nnx_model(tokens):
    model = NNXLM(nnx.Rngs(0))
    ref_feats, ref_logits = model(tokens)

    mx = intercept(model, [(".*", CFG)])  # the module is the function (a pytree)
    feats, logits = mx(tokens)
    assert_differs(logits, ref_logits)
    # embed + 2 x (q k v qk pv out, q k qk pv, mlp) + head
    assert mx.coverage.counts == "24 of 24 matmuls in MX"
    # nnx names no scopes: its layers are found by their weights' paths.
    assert mx.coverage.sites[-1].operands == ("", "head/kernel/value")

    mx = intercept(lambda m, x: m(x), [("head", None), (".*", CFG)])
    feats, logits = jax.jit(mx)(model, tokens)
    assert_differs(feats, ref_feats)
    assert_same(logits, jax.jit(lambda m, f: m.head(f))(model, feats))
    assert [s.operands[1] for s in mx.coverage.high_precision] == ["head/kernel/value"]


class EqxBlock(eqx.Module):
    attn: eqx.nn.MultiheadAttention
    mlp: eqx.nn.MLP

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.attn = eqx.nn.MultiheadAttention(H, W, qk_size=D, vo_size=D, key=k1)
        self.mlp = eqx.nn.MLP(W, W, 2 * W, 1, key=k2)

    def __call__(self, x):
        x = x + self.attn(x, x, x)
        return x + jax.vmap(self.mlp)(x)


class EqxLM(eqx.Module):
    embed: eqx.nn.Linear
    blocks: list
    head: eqx.nn.Linear

    def __init__(self, key):
        keys = jax.random.split(key, 4)
        self.embed = eqx.nn.Linear(32, W, key=keys[0])
        self.blocks = [EqxBlock(k) for k in keys[1:3]]
        self.head = eqx.nn.Linear(W, V, key=keys[3])

    def __call__(self, x):  # one sequence; vmap for a batch
        x = jax.vmap(self.embed)(x)
        for block in self.blocks:
            x = block(x)
        return x, jax.vmap(self.head)(x)


def test_equinox_model(tokens):
    model = EqxLM(jax.random.key(0))
    ref_feats, ref_logits = jax.vmap(model)(tokens)

    mx = intercept(model, CFG)
    feats, logits = jax.vmap(mx)(tokens)
    assert_differs(logits, ref_logits)
    # embed + 2 x (q k v qk pv out, mlp 2) + head
    assert mx.coverage.counts == "18 of 18 matmuls in MX"
    assert mx.coverage.sites[-1].operands == ("head/weight", "")

    # "head" alone would also match eqx.nn.MultiheadAttention's path.
    mx = intercept(model, [("^head/", None), (".*", CFG)])
    feats, logits = jax.vmap(mx)(tokens)
    assert_differs(feats, ref_feats)
    assert_same(logits, jax.vmap(jax.vmap(model.head))(feats))
    assert len(mx.coverage.high_precision) == 1


# --------------------------------------------------------------------------
# The record, caching, errors.
# --------------------------------------------------------------------------


def test_coverage_record_and_summary(plain_args):
    mx = intercept(plain, [("einsum_never", CFG4), ("^k$", None), (".*", CFG)], warn=False)
    cov = mx.coverage_for(*plain_args)
    assert isinstance(cov, Coverage) and all(isinstance(s, MatmulSite) for s in cov.sites)
    assert cov.counts == "3 of 4 matmuls in MX"
    assert cov.unmatched == ("einsum_never",)
    assert [s.path for s in cov.high_precision] == ["td,sd->ts/dot_general"]  # by operand "k"
    assert cov.rules[1] == ("^k$", None) and cov.rules[2] == (".*", CFG)
    text = cov.summary()
    lines = text.splitlines()
    assert lines[0] == "3 of 4 matmuls in MX"
    assert lines[2].split()[:4] == ["high", "td,sd->ts/dot_general", "<-", "k"]
    assert "(8, 64) x (32, 64)" in lines[2]
    assert lines[-1] == "  rule 'einsum_never' matched no matmul"
    assert str(cov) == text


def test_unmatched_rule_warns_once_at_the_intercept_call(plain_args):
    mx = intercept(plain, [("no_such_layer", None), (".*", CFG)])
    line = inspect.currentframe().f_lineno - 1
    with pytest.warns(UserWarning, match="'no_such_layer' matched no matmul") as record:
        mx(*plain_args)
    assert (record[0].filename, record[0].lineno) == (__file__, line)
    mx(*plain_args)  # once is enough: no second warning (warnings are errors here)


def test_traces_once_per_signature(plain_args):
    calls = []

    def f(x, w, scale):
        calls.append(scale)
        return scale * (x @ w)

    mx = intercept(f, CFG)
    x, w = plain_args[1], plain_args[0]["w"]
    mx(x, w, 2.0)
    mx(x + 1, w, 2.0)
    assert len(calls) == 1
    mx(x, w, 3.0)  # non-array leaves are static
    mx(x[:4], w, 3.0)
    assert calls == [2.0, 3.0, 3.0]


def test_jit_of_closure_over_tracers():
    w = normal(14, (32, 32))

    @jax.jit
    def f(x, w):
        return intercept(lambda x: x @ w, CFG)(x)  # w is an outer tracer

    x = normal(15, (4, 32))
    assert_same(f(x, w), jaxmx.dot_general(x, w, NT, config=CFG))


@pytest.mark.parametrize(
    ("rules", "error", "match"),
    [
        ([("(", CFG)], ValueError, r"rule pattern '\(' is not a regular expression"),
        ([(3, CFG)], TypeError, "a rule pattern is a regular expression string"),
        ([("x", 3)], TypeError, "the config of rule 'x' must be a DotConfig"),
        ([("x", "mxfp5")], ValueError, "the config of rule 'x': unknown config 'mxfp5'"),
        ([("x", CFG, 1)], TypeError, r"a rule is a Rule or a \(pattern, config\) pair"),
        (3, TypeError, r"rules must be a list of \(pattern, config\) pairs"),
    ],
)
def test_bad_rules(rules, error, match):
    with pytest.raises(error, match=match):
        intercept(jnp.matmul, rules)


def test_bad_arguments():
    with pytest.raises(TypeError, match="intercept takes a callable"):
        intercept(3, CFG)
    with pytest.raises(ValueError, match="custom_derivatives must be 'keep' or 'inline'"):
        intercept(jnp.matmul, CFG, custom_derivatives="drop")
    with pytest.raises(ValueError, match="no call traced yet"):
        _ = intercept(jnp.matmul, CFG).coverage
    with pytest.raises(ValueError, match=r"weights '\[' is not a regular expression"):
        intercept(jnp.matmul, CFG, weights="[")
    with pytest.raises(TypeError, match="ShapeDtypeStruct arguments are for coverage_for"):
        intercept(jnp.matmul, CFG)(jax.ShapeDtypeStruct((2, 32), jnp.float32), jnp.ones((32, 2)))


def test_rule_objects_and_dicts():
    rules = {"head": None, ".*": "mxfp8"}
    assert intercept(jnp.matmul, rules).rules[1].config == CFG
    from jaxmx.flax import Rule

    assert intercept(jnp.matmul, [Rule("a", "mxfp4")]).rules[0].config == CFG4
