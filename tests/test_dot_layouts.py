"""bfloat16 matmuls on XLA:CPU: every layout runs, and runs where it is fast.

XLA:CPU multiplies bf16 x bf16 -> f32 in its library kernels only (YNNPACK,
oneDNN: ``[B,] M x K`` times ``[B,] K x N`` or ``[B,] N x K``); a bf16 dot in
any other layout reaches DotThunk and fails ("UNIMPLEMENTED: Unsupported
element type for DotThunk::Execute: BF16 x BF16 = F32"). XLA's own passes
re-create such layouts after its bf16-or-not decision (transpose folding,
transpose(dot(a, b)) -> dot(b, a)), so jaxmx emits bf16 dots in the library
layout behind optimization barriers (``jaxmx._operand._cpu_bf16_dot``).

Each case below crashed at some point: b31c0fd (plain bf16 dot_general),
c75a079 (transposes into a canonical layout, undone by XLA in a scan's
gradient), or a first version of the barrier without one on the result.
Each runs forward and both gradients under jit with ``compute_dtype=
"bfloat16"``, agrees with ``compute_dtype="float32"`` (the same exact
products, summed in another order), and every bf16 dot XLA compiled is a
library dot.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxmx
from jaxmx import _operand

BF16 = jaxmx.preset("mxfp8", compute_dtype="bfloat16")
F32 = BF16.replace(compute_dtype="float32")
NT = (((1,), (0,)), ((), ()))
C0 = (((0,), (0,)), ((), ()))

on_cpu = pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's dot kernels")

_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\w+)\[.*? ([a-z-]+)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY )?%(\S+) \(")


def _dots(fn, *args):
    """(operand dtypes, in a library fusion?) of each dot ``fn`` compiles to."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    types, library, dots, comp = {}, set(), [], None
    for line in text.splitlines():
        if m := _COMP.match(line):
            comp = m.group(1)
        elif m := _INSTR.match(line):
            name, dtype, op, rest = m.groups()
            types[name] = dtype
            if op == "fusion" and "kind=kCustom" in rest:
                library.update(re.findall(r"calls=%([\w.-]+)", rest))
            if op == "dot":
                dots.append((comp, *re.match(r"%(\S+?), %(\S+?)\)", rest).groups()))
    return [((types[a], types[b]), comp in library) for comp, a, b in dots]


def _moves(fn, *args):
    """Copies and transposes in the entry computation of ``fn``'s compiled step."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    entry = text[text.index("\nENTRY") :]
    return len(re.findall(r" (?:copy|transpose)\(", entry))


def _check(fn, args, bf16=BF16):
    """``fn(cfg, *args)`` under jit(value_and_grad): ``bf16`` agrees with the
    same config in float32, and every bf16 dot is a library dot."""

    def run(cfg):
        return jax.jit(jax.value_and_grad(lambda *a: fn(cfg, *a), range(len(args))))(*args)

    got, want = run(bf16), run(bf16.replace(compute_dtype="float32"))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        w = np.asarray(w, np.float64)
        np.testing.assert_allclose(
            np.asarray(g, np.float64), w, rtol=1e-5, atol=1e-5 * np.abs(w).max()
        )
    if jax.default_backend() == "cpu":
        dots = _dots(jax.value_and_grad(lambda *a: fn(bf16, *a), range(len(args))), *args)
        assert all(lib for dtypes, lib in dots if "bf16" in dtypes), dots
        return dots
    return None


def _normal(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape).astype(dtype)


def _loss(y):
    return jnp.sum(jnp.tanh(y) * y)


CRASHED = {
    # b31c0fd: XLA's dot decomposer transposes lhs, transpose folding puts it back.
    "contract-first, two rhs free axes": ((8, 3), (8, 4, 5), C0),
    "contract-first, larger": ((64, 15), (64, 14, 32), C0),
    # b31c0fd: batch axes not leading.
    "batch axes not leading": ((3, 64, 5), (64, 3, 7), (((1,), (0,)), ((0,), (1,)))),
    "batch axes last": ((5, 2, 64), (7, 64, 2), (((2,), (1,)), ((1,), (2,)))),
    # A barrier on the operands only: the weight gradient is transposed back
    # to rhs's (N, K) layout, and XLA turns transpose(dot(a, b)) into dot(b, a).
    "weight gradient transposed back": ((8, 8), (5, 8), (((0,), (1,)), ((), ()))),
    "dense": ((4, 32), (32, 8), NT),
    "attention scores": ((2, 8, 2, 32), (2, 8, 2, 32), (((3,), (3,)), ((0, 2), (0, 2)))),
}


@pytest.mark.parametrize("case", list(CRASHED))
def test_layouts_that_crashed_run_in_bf16(case):
    lshape, rshape, dn = CRASHED[case]

    def f(cfg, a, b):
        return _loss(jaxmx.dot_general(a, b, dn, config=cfg))

    _check(f, (_normal(1, lshape), _normal(2, rshape)))


@pytest.mark.parametrize("remat", [False, True])
def test_dense_layers_in_a_scan_gradient(remat):
    # c75a079: canonical-layout transposes, folded back into the bf16 dot by
    # XLA in the gradient of a scan (with or without remat).
    def f(cfg, x, ws):
        def layer(h, w):
            return jnp.tanh(jaxmx.dot_general(h, w, NT, config=cfg)), None

        return _loss(lax.scan(jax.checkpoint(layer) if remat else layer, x, ws)[0])

    _check(f, (_normal(3, (4, 32)), 0.2 * _normal(4, (3, 32, 32))))


@pytest.mark.parametrize("in_axes", [(None, 0), (None, 2), (0, None), (1, 0), (0, 2)])
def test_vmap_adds_axes_anywhere(in_axes):
    # b31c0fd: vmap over the weight alone makes it (V, K, N), whose bf16 dot
    # XLA decomposes with transposes.
    x, w = _normal(5, (4, 32)), _normal(6, (32, 8))
    x = jnp.stack([x, -x], in_axes[0]) if in_axes[0] is not None else x
    w = jnp.stack([w, 2 * w], in_axes[1]) if in_axes[1] is not None else w

    def f(cfg, x, w):
        return _loss(jax.vmap(lambda a, b: jaxmx.dot_general(a, b, NT, config=cfg), in_axes)(x, w))

    _check(f, (x, w))


@pytest.mark.parametrize("side", ["lhs", "rhs"])
def test_a_transposed_bf16_operand_left_unquantized(side):
    # The caller's transpose feeds the dot directly when the role is not
    # quantized; the barrier keeps XLA from folding it into the bf16 dot
    # (for lhs, into a layout with no bf16 kernel).
    cfg = BF16.replace(**{side: None, f"{side}_bwd": None})
    shape = (32, 4) if side == "lhs" else (8, 32)
    stored = _normal(7, shape, jnp.bfloat16)

    def f(cfg, other, s):
        a, b = (s.T, other) if side == "lhs" else (other, s.T)
        return _loss(jaxmx.dot_general(a, b, NT, config=cfg))

    other = _normal(8, (32, 8) if side == "lhs" else (4, 32))
    _check(f, (other, stored), cfg)


def test_higher_order_derivatives_and_nested_vmap():
    x, w = _normal(9, (4, 32)), 0.1 * _normal(10, (32, 8))

    def hess(cfg):
        return jax.jit(jax.hessian(lambda w: _loss(jaxmx.dot_general(x, w, NT, config=cfg))))(w)

    np.testing.assert_allclose(hess(BF16), hess(F32), rtol=1e-4, atol=1e-6)
    xs = _normal(11, (3, 2, 4, 32))

    def nested(cfg):
        return jax.jit(jax.vmap(jax.vmap(lambda x: jaxmx.dot_general(x, w, NT, config=cfg))))(xs)

    np.testing.assert_allclose(nested(BF16), nested(F32), rtol=1e-5, atol=1e-6)


@on_cpu
def test_plans_need_no_copy_for_dense_layers():
    plan = _operand.matmul_plan
    # Forward, input gradient: bf16 in the library's layout, reshapes only.
    assert plan((2, 12, 64), (64, 24), (((2,), (0,)), ((), ()))) == (
        None,
        None,
        (24, 64),
        (64, 24),
        False,
        False,
    )
    assert plan((2, 12, 24), (64, 24), (((2,), (1,)), ((), ()))).rhs_nk
    # Weight gradient of a 2-D layer (lhs K x M): float32, no copy, as XLA
    # runs a plain bf16 dot_general there.
    wgrad = plan((32, 64), (32, 24), C0)
    assert (wgrad.lhs_perm, wgrad.rhs_perm, wgrad.lhs_km) == (None, None, True)
    # Of a 3-D one (contracting batch and tokens): XLA copies lhs into its
    # library's layout; so does the plan, in bf16.
    wgrad = plan((2, 12, 64), (2, 12, 24), (((0, 1), (0, 1)), ((), ())))
    assert (wgrad.lhs_perm, wgrad.rhs_perm, wgrad.lhs_km) == ((2, 0, 1), None, False)
    assert wgrad.lhs_shape == (64, 24)
    # Attention's batch axes (b, h) are not leading: transposed into bf16's layout.
    att = plan((2, 8, 2, 32), (2, 8, 2, 32), (((3,), (3,)), ((0, 2), (0, 2))))
    assert att.lhs_perm == (0, 2, 1, 3) and not att.lhs_km
    assert att.lhs_shape == (4, 8, 32) and att.rhs_shape == (4, 8, 32) and att.rhs_nk


@on_cpu
@pytest.mark.parametrize("has_bf16", [True, False])
def test_default_compute_dtype_follows_the_cpu(monkeypatch, has_bf16):
    """None: bf16 on CPUs with bf16 dot instructions, where it is the faster
    dot; float32 elsewhere (XLA:CPU's bf16 dot without them converts its
    operands on the fly, 1.5x slower than float32 on AVX2). Either way the
    default runs every layout."""
    monkeypatch.setattr(_operand, "cpu_has_bf16_dot", lambda: has_bf16)
    cfg = jaxmx.preset("mxfp8")
    cpu = jaxmx.platforms.PLATFORMS["cpu"]
    assert _operand.dot_compute_dtype(cfg, cpu) == (jnp.bfloat16 if has_bf16 else jnp.float32)
    x, w1, w2 = _normal(12, (16, 64)), _normal(13, (64, 64)), _normal(14, (64, 32))

    def step(x, w1, w2, cfg=cfg):
        h = jax.nn.gelu(jaxmx.dot_general(x, w1, NT, config=cfg))
        return _loss(jaxmx.dot_general(h, w2, NT, config=cfg))

    dots = _dots(jax.grad(step, (1, 2)), x, w1, w2)
    # Forward and input gradients in bf16 on the library; weight gradients
    # (contracting rows: lhs is K x M) in float32, without a copy.
    bf16 = [lib for dtypes, lib in dots if "bf16" in dtypes]
    assert len(bf16) == (3 if has_bf16 else 0) and all(bf16), dots
    # No copy or transpose the float32 step does not have.
    assert _moves(jax.grad(step, (1, 2)), x, w1, w2) == _moves(
        jax.grad(functools.partial(step, cfg=F32), (1, 2)), x, w1, w2
    )
    want = jax.grad(
        lambda *a: _loss(
            jaxmx.dot_general(
                jax.nn.gelu(jaxmx.dot_general(a[0], a[1], NT, config=F32)), a[2], NT, config=F32
            )
        ),
        (1, 2),
    )(x, w1, w2)
    for g, w in zip(jax.jit(jax.grad(step, (1, 2)))(x, w1, w2), want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.abs(w).max()))
