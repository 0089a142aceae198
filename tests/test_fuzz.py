"""Hypothesis fuzzers that state jaxmx's contracts over random inputs.

Four families, each checked against something that shares no code with
jaxmx (``lax.dot_general``'s own validation, the float64 models of
tests/reference.py and tests/test_dot.py, or plain axis bookkeeping):

1. ``dot_general`` over random dimension numbers and layouts: valid ones
   match a float64 model of the six-quantization recipe (forward and both
   gradients); invalid ones raise like ``lax.dot_general`` does.
2. ``vmap`` with random ``in_axes``/``out_axes`` around ``quantize`` and
   ``dequantize``: bit for bit equal to ``fake_quantize`` on the unbatched
   array, or a clear ValueError/TypeError.
3. Random custom formats: either they work fully (quantize, dequantize,
   fake_quantize, packing and jit agree bit for bit with each other and
   with a float64 model), or they are refused when built or registered.
4. Bad arguments to every public function: a ValueError/TypeError whose
   message names what was given and what is allowed, never a silent result.

The example counts below are for the default profile (the fast suite);
``JAXMX_FUZZ=large`` (see conftest.py) multiplies them for a long run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import re
import string
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax import lax

import jaxmx
from jaxmx import formats as F
from jaxmx.formats import _catalog
from tests import reference

FORMATS = reference.OCP_FORMATS
# Presets whose formats the float64 model describes (NVFP4's has its own tests).
PRESETS = [
    p
    for p in jaxmx.list_presets()
    if all(
        jaxmx.preset(p).role(r) is None or jaxmx.preset(p).role(r).family == "ocp"
        for r in ("lhs", "rhs", "grad", "lhs_bwd", "rhs_bwd")
    )
]
# The roundings the float64 models reproduce (stochastic rounding is tested
# for unbiasedness in test_properties.py, not bit for bit).
DETERMINISTIC = ("nearest_even", "nearest_away", "toward_zero")
SCALE_MODES = ("floor", "rceil", "ceil", "even")


def _examples(n: int) -> int:
    """``n`` examples under the default profile (100), scaled with the loaded one."""
    return max(1, n * settings.default.max_examples // 100)


def _fuzz(n: int):
    # Every new shape compiles, so shrinking a failure can take many minutes:
    # the default profile reports the failing example as found (its message
    # says what went wrong); the large profile shrinks it to a minimal one.
    default = settings.default
    large = default.max_examples > 100
    return settings(
        max_examples=_examples(n),
        phases=default.phases if large else tuple(p for p in default.phases if p.name != "shrink"),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def _bits(a) -> np.ndarray:
    """The bit patterns of a float array, to compare -0.0 and NaN payloads too."""
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _assert_same_bits(got, want, what: str) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    differ = _bits(got) != _bits(want)
    if differ.any():
        i = tuple(int(j) for j in np.argwhere(differ)[0])
        raise AssertionError(
            f"{what}: {int(differ.sum())} of {differ.size} elements differ, first at {i}: "
            f"got {got[i]!r}, want {want[i]!r}"
        )


_ALLOWED_WORDS = re.compile(
    r"allowed|must|expect|need|known|take|support|only|one of|should|valid|range|"
    r"requires?|positive|divisible|divide|\bis (not )?an? |more than one|at most|does not match",
    re.IGNORECASE,
)


def _names_of(bad) -> set[str]:
    """Ways a message may name the bad value: its repr, str, type or dtype name."""
    names = {repr(bad), type(bad).__name__}
    if bad is None or isinstance(bad, (str, bytes, int, float, complex, np.generic)):
        names.add(str(bad))
    with contextlib.suppress(Exception):  # an array: its dtype or shape names it
        names |= {str(np.dtype(bad.dtype)), str(tuple(bad.shape))}
    with contextlib.suppress(Exception):  # a dtype-like
        names.add(np.dtype(bad).name)
    if isinstance(bad, (list, tuple)):  # a container: naming a bad leaf is enough
        for leaf in bad:
            names |= _names_of(leaf) - {"str", "int", "tuple", "list"}
    return {n for n in names if n}


def _assert_clear(err: BaseException, bad, *, what: str = "") -> None:
    """The message names the given value and says what is allowed."""
    msg = str(err)
    names = _names_of(bad)
    assert any(n in msg for n in names), (
        f"{what}: the message does not name the bad value {bad!r} (any of {sorted(names)}): "
        f"{type(err).__name__}: {msg}"
    )
    assert _ALLOWED_WORDS.search(msg), (
        f"{what}: the message does not say what is allowed: {type(err).__name__}: {msg}"
    )


def _seeded(seed: int, shape, dtype=np.float32, spread: int = 8) -> np.ndarray:
    """Normal values times a random power of two per row (exact zeros sprinkled in)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    if x.ndim:
        x = x * np.exp2(rng.integers(-spread, spread + 1, shape[:1]).astype(np.float64)).reshape(
            (-1,) + (1,) * (x.ndim - 1)
        )
    x = np.where(rng.random(shape) < 0.05, 0.0, x)
    return x.astype(dtype)


# ==========================================================================
# 1. dot_general: random dimension numbers and layouts.
# ==========================================================================


@dataclasses.dataclass(frozen=True)
class Layout:
    lshape: tuple[int, ...]
    rshape: tuple[int, ...]
    lc: tuple[int, ...]  # lhs contracting, in pair order
    rc: tuple[int, ...]
    lb: tuple[int, ...]  # lhs batch, in pair order
    rb: tuple[int, ...]
    llab: str  # einsum labels of the lhs axes
    rlab: str
    olab: str  # labels of lax.dot_general's result: batch, lhs free, rhs free

    @property
    def dn(self):
        return ((self.lc, self.rc), (self.lb, self.rb))

    @property
    def lf(self) -> tuple[int, ...]:
        return tuple(d for d in range(len(self.lshape)) if d not in self.lc + self.lb)

    @property
    def rf(self) -> tuple[int, ...]:
        return tuple(d for d in range(len(self.rshape)) if d not in self.rc + self.rb)


def layout_of(lshape, rshape, dn) -> Layout:
    """The Layout of explicit dimension numbers (for pinned examples)."""
    (lc, rc), (lb, rb) = dn
    letters = iter(string.ascii_letters)
    llab, rlab = [""] * len(lshape), [""] * len(rshape)
    for a, b in (*zip(lb, rb, strict=True), *zip(lc, rc, strict=True)):
        llab[a] = rlab[b] = next(letters)
    llab = [c or next(letters) for c in llab]
    rlab = [c or next(letters) for c in rlab]
    free_l = [c for i, c in enumerate(llab) if i not in (*lc, *lb)]
    free_r = [c for i, c in enumerate(rlab) if i not in (*rc, *rb)]
    olab = "".join(llab[a] for a in lb) + "".join(free_l) + "".join(free_r)
    return Layout(
        tuple(lshape),
        tuple(rshape),
        tuple(lc),
        tuple(rc),
        tuple(lb),
        tuple(rb),
        "".join(llab),
        "".join(rlab),
        olab,
    )


_SIZES_K = st.sampled_from([1, 2, 3, 5, 7, 8, 15, 16, 17, 31, 32, 33, 48, 64, 70])


@st.composite
def layouts(draw, max_k: int = 256, max_elems: int = 3000) -> Layout:
    """Ranks 1-4, batch/contracting/free axes anywhere, any pair order."""
    nb = draw(st.integers(0, 2))
    nc = draw(st.integers(0, min(3, 4 - nb)))
    room = 4 - nb - nc
    nlf = draw(st.integers(max(0, 1 - nb - nc), room))
    nrf = draw(st.integers(max(0, 1 - nb - nc), room))
    batch = [draw(st.integers(1, 3)) for _ in range(nb)]
    contract, k = [], 1
    for _ in range(nc):
        s = draw(_SIZES_K.filter(lambda s, k=k: s * k <= max_k) | st.just(1))
        contract.append(s)
        k *= s
    base = math.prod(batch) * k

    def free(n):
        sizes, total = [], base
        for _ in range(n):
            s = draw(st.integers(1, max(1, min(20, max_elems // total))))
            sizes.append(s)
            total *= s
        return sizes

    lfree, rfree = free(nlf), free(nrf)
    letters = iter(string.ascii_letters)
    bl = [next(letters) for _ in batch]
    cl = [next(letters) for _ in contract]
    lfl = [next(letters) for _ in lfree]
    rfl = [next(letters) for _ in rfree]
    lroles = draw(
        st.permutations(
            [("b", i) for i in range(nb)]
            + [("c", i) for i in range(nc)]
            + [("f", i) for i in range(nlf)]
        )
    )
    rroles = draw(
        st.permutations(
            [("b", i) for i in range(nb)]
            + [("c", i) for i in range(nc)]
            + [("f", i) for i in range(nrf)]
        )
    )
    size = {"b": batch, "c": contract}
    lab = {"b": bl, "c": cl}

    def side(roles, fsizes, flabels):
        shape = tuple((fsizes if r == "f" else size[r])[i] for r, i in roles)
        labels = "".join((flabels if r == "f" else lab[r])[i] for r, i in roles)
        pos = {ri: p for p, ri in enumerate(roles)}
        c = tuple(pos[("c", i)] for i in range(nc))
        b = tuple(pos[("b", i)] for i in range(nb))
        return shape, labels, c, b

    lshape, llab, lc, lb = side(lroles, lfree, lfl)
    rshape, rlab, rc, rb = side(rroles, rfree, rfl)
    # Free labels in ascending axis order, as lax.dot_general lays them out.
    olab = "".join(bl) + "".join(c for c in llab if c in lfl) + "".join(c for c in rlab if c in rfl)
    return Layout(lshape, rshape, lc, rc, lb, rb, llab, rlab, olab)


@st.composite
def dot_configs(draw) -> jaxmx.DotConfig:
    """A preset, or a DotConfig with random roles, block size, modes and compute dtype."""
    overrides = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "block_size": st.sampled_from([1, 2, 3, 8, 16, 32]),
                "scale_mode": st.sampled_from(SCALE_MODES),
                "rounding": st.sampled_from(DETERMINISTIC),
                "grad_rounding": st.sampled_from((None, *DETERMINISTIC)),
                # bfloat16 twice as likely: XLA:CPU runs a bf16 x bf16 -> f32 dot
                # for some layouts only.
                "compute_dtype": st.sampled_from([None, "float32", "bfloat16", "bfloat16"]),
                "residuals": st.sampled_from(["high_precision", "quantized"]),
            },
        )
    )
    if draw(st.booleans()):
        return jaxmx.preset(draw(st.sampled_from(PRESETS)), **overrides)
    fmt = st.sampled_from([None, *FORMATS])
    bwd = st.sampled_from([jaxmx.FORWARD, None, *FORMATS])
    return jaxmx.DotConfig(
        lhs=draw(fmt),
        rhs=draw(fmt),
        grad=draw(fmt),
        lhs_bwd=draw(bwd),
        rhs_bwd=draw(bwd),
        **overrides,
    )


def _model_q(x, fmt, axis, cfg: jaxmx.DotConfig, rounding) -> np.ndarray:
    """float64 values of ``x`` quantized along ``axis`` (None: one element per block)."""
    x = np.asarray(x, np.float64)
    if fmt is None:
        return x
    kw = dict(scale_mode=cfg.scale_mode, rounding=rounding)
    if axis is None:
        q = reference.fake_quantize(x[..., None], fmt, axis=-1, block_size=1, **kw)[0][..., 0]
    else:
        bs = cfg.block_size or fmt.block_size
        q = reference.fake_quantize(x, fmt, axis=axis, block_size=bs, **kw)[0]
    return q.astype(np.float64)


def _dot_model(lay: Layout, lhs, rhs, g, cfg: jaxmx.DotConfig):
    """Float64 model of (forward, d_lhs, d_rhs): each matmul quantizes its own operands.

    Forward blocks run along the last contracting pair; dgrad contracts the
    rhs free axes (blocks along the last of them, ascending, in g and rhs);
    wgrad contracts the lhs free axes likewise. Returns, per output, the
    model value, the sum of |products| and the number of summed terms.
    """
    r = cfg.role
    last = lambda axes: axes[-1] if axes else None  # noqa: E731
    nb, nlf, nrf = len(lay.lb), len(lay.lf), len(lay.rf)
    g_rfree_last = nb + nlf + nrf - 1 if nrf else None
    g_lfree_last = nb + nlf - 1 if nlf else None
    rnd, grnd = cfg.rounding, cfg.effective_grad_rounding
    lres, rres = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    if cfg.residuals == "quantized":
        # The forward MX copies (same blocks, same rounding) are what the
        # backward pass starts from.
        if r("lhs") is not None:
            lres = _model_q(lhs, r("lhs"), last(lay.lc), cfg, rnd)
        if r("rhs") is not None:
            rres = _model_q(rhs, r("rhs"), last(lay.rc), cfg, rnd)
    k_fwd = math.prod(lay.lshape[a] for a in lay.lc)
    k_dgrad = math.prod(lay.rshape[a] for a in lay.rf)
    k_wgrad = math.prod(lay.lshape[a] for a in lay.lf)
    out = []
    for eq, (a, fa, axa, ra), (b, fb, axb, rb_), k in (
        (
            f"{lay.llab},{lay.rlab}->{lay.olab}",
            (lhs, r("lhs"), last(lay.lc), rnd),
            (rhs, r("rhs"), last(lay.rc), rnd),
            k_fwd,
        ),
        (
            f"{lay.olab},{lay.rlab}->{lay.llab}",
            (g, r("grad"), g_rfree_last, grnd),
            (rres, r("rhs_bwd"), last(lay.rf), rnd),
            k_dgrad,
        ),
        (
            f"{lay.llab},{lay.olab}->{lay.rlab}",
            (lres, r("lhs_bwd"), last(lay.lf), rnd),
            (g, r("grad"), g_lfree_last, grnd),
            k_wgrad,
        ),
    ):
        qa, qb = _model_q(a, fa, axa, cfg, ra), _model_q(b, fb, axb, cfg, rb_)
        exact = np.einsum(eq, np.asarray(a, np.float64), np.asarray(b, np.float64))
        out.append((np.einsum(eq, qa, qb), np.einsum(eq, np.abs(qa), np.abs(qb)), k, exact))
    return out


_HALF_ULP = {np.dtype(np.float32): 2.0**-24, np.dtype(ml_dtypes.bfloat16): 2.0**-8}


def _bound(abs_sum, k, value, dtype):
    """float32 accumulation of ``k`` exact products (|error| <= k u sum|ab|),
    then one rounding to the output dtype."""
    acc = (k + 2) * 2.0**-24 * abs_sum
    return acc + _HALF_ULP[np.dtype(dtype)] * (np.abs(value) + acc) + 1e-37


_CONTRACT_0 = (((0,), (0,)), ((), ()))


# Layouts XLA:CPU's bf16 x bf16 -> f32 dot does not implement ("DotThunk::Execute:
# BF16 x BF16 = F32"): quantized in bfloat16 (eager, and under jit, where XLA's
# own layout passes run), and the unquantized path (plain lax). Pinned apart
# from the fuzzer so that a failure here does not stop the random search.
PINNED_LAYOUTS = {
    "bf16-contract-first-eager": (
        layout_of((64, 15), (64, 14, 32), _CONTRACT_0),
        jaxmx.preset("mxfp8", compute_dtype="bfloat16"),
        (np.float32, np.float32),
        None,
        False,
    ),
    "bf16-contract-first-jit": (
        layout_of((8, 3), (8, 4, 5), _CONTRACT_0),
        jaxmx.preset("mxfp8", compute_dtype="bfloat16"),
        (np.float32, np.float32),
        None,
        True,
    ),
    "bf16-operands-unquantized": (
        layout_of((8, 3), (8, 4, 5), _CONTRACT_0),
        jaxmx.preset("fp32"),
        (ml_dtypes.bfloat16, ml_dtypes.bfloat16),
        np.float32,
        False,
    ),
}


@pytest.mark.parametrize("case", list(PINNED_LAYOUTS))
def test_dot_general_pinned_layouts_match_float64_model(case):
    lay, cfg, dtypes, pet, jit = PINNED_LAYOUTS[case]
    _check_dot(lay, cfg, dtypes, pet, 0, jit)


@_fuzz(12)
@given(
    lay=layouts(),
    cfg=dot_configs(),
    dtypes=st.sampled_from(
        [(np.float32, np.float32)] * 3
        + [(ml_dtypes.bfloat16, ml_dtypes.bfloat16), (np.float32, ml_dtypes.bfloat16)]
    ),
    pet=st.sampled_from([None, np.float32]),
    seed=st.integers(0, 2**32 - 1),
    # Eager runs dispatch (and compile) every op of every new shape: minutes
    # for a dozen layouts. The default profile runs them jitted (eager is
    # pinned above and in test_conformance); the large one runs both.
    jit=st.booleans() if settings.default.max_examples > 100 else st.just(True),
)
def test_dot_general_random_layouts_match_float64_model(lay, cfg, dtypes, pet, seed, jit):
    _check_dot(lay, cfg, dtypes, pet, seed, jit)


def _check_dot(lay, cfg, dtypes, pet, seed, jit):
    """Forward and both gradients of one call against the float64 model."""
    lhs = _seeded(seed, lay.lshape, dtypes[0], spread=4)
    rhs = _seeded(seed + 1, lay.rshape, dtypes[1], spread=4)
    jax.eval_shape(lambda a, b: lax.dot_general(a, b, lay.dn), lhs, rhs)  # valid for lax

    def f(a, b):
        return jaxmx.dot_general(a, b, lay.dn, preferred_element_type=pet, config=cfg)

    def forward_and_vjp(a, b, g):
        y, vjp = jax.vjp(f, a, b)
        return (y, *vjp(g))

    out = jax.eval_shape(f, lhs, rhs)
    g = _seeded(seed + 2, out.shape, np.float32, spread=2).astype(out.dtype)
    run = jax.jit(forward_and_vjp) if jit else forward_and_vjp
    got = [np.asarray(v) for v in run(lhs, rhs, g)]  # materialized: XLA errors surface here
    want_dtypes = [
        np.dtype(pet or jnp.promote_types(*dtypes)),
        np.dtype(dtypes[0]),
        np.dtype(dtypes[1]),
    ]
    for name, x, wdt, (want, abs_sum, k, exact) in zip(
        ("forward", "d_lhs", "d_rhs"),
        got,
        want_dtypes,
        _dot_model(lay, lhs, rhs, g, cfg),
        strict=True,
    ):
        assert x.shape == want.shape, f"{name}: shape {x.shape}, lax.dot_general's {want.shape}"
        assert x.dtype == wdt, f"{name}: dtype {x.dtype}, want {wdt}"
        err = np.abs(np.asarray(x, np.float64) - want)
        bound = _bound(abs_sum, k, want, wdt)
        if not np.all(err <= bound):
            i = np.unravel_index(np.argmax(err - bound), err.shape)
            raise AssertionError(
                f"{name}: {int((err > bound).sum())} of {err.size} beyond the float32 bound; "
                f"worst at {i}: got {x[i]!r}, model {want[i]!r}, bound {bound[i]!r}"
            )
        # Where the model's quantization moves the result beyond the bound,
        # jaxmx's result moved too: skipping a quantization cannot pass.
        moved = np.abs(want - exact) > 2 * bound
        assert np.all(np.abs(np.asarray(x, np.float64) - exact)[moved] > bound[moved]), name


# Mutations that make dimension numbers invalid (or, for numpy ints, still valid).
_MUTATIONS = (
    "out_of_range",
    "negative",
    "size_mismatch",
    "duplicate",
    "overlap",
    "count_mismatch",
    "float_axis",
    "numpy_int",
    "not_a_sequence",
)


@st.composite
def mutated_dims(draw):
    lay = draw(layouts(max_k=64, max_elems=600))
    kind = draw(st.sampled_from(_MUTATIONS))
    lc, rc, lb, rb = map(list, (lay.lc, lay.rc, lay.lb, lay.rb))
    lshape, rshape = list(lay.lshape), list(lay.rshape)
    groups = {"lc": lc, "rc": rc, "lb": lb, "rb": rb}
    nonempty = [n for n, v in groups.items() if v]
    if kind in ("out_of_range", "negative", "float_axis", "numpy_int") and not nonempty:
        kind = "count_mismatch"
    if kind in ("size_mismatch", "duplicate", "overlap") and not (lc or lb):
        kind = "count_mismatch"
    if kind == "out_of_range":
        which = draw(st.sampled_from(nonempty))
        rank = len(lshape if which[0] == "l" else rshape)
        i = draw(st.integers(0, len(groups[which]) - 1))
        groups[which][i] = rank + draw(st.sampled_from([0, 1, 3, 100, 2**31]))
    elif kind == "negative":
        which = draw(st.sampled_from(nonempty))
        rank = len(lshape if which[0] == "l" else rshape)
        i = draw(st.integers(0, len(groups[which]) - 1))
        groups[which][i] = draw(st.integers(-rank - 2, -1))
    elif kind == "size_mismatch":
        pairs = [(a, b) for a, b in zip(lc, rc, strict=True)] + list(zip(lb, rb, strict=True))
        _, b = draw(st.sampled_from(pairs))
        rshape[b] += draw(st.integers(1, 3))
    elif kind == "duplicate":
        ll, rr = (lc, rc) if (lc and draw(st.booleans())) or not lb else (lb, rb)
        ll.append(ll[0])
        rr.append(rr[0])
    elif kind == "overlap":
        if lc:
            lb.append(lc[0])
            rb.append(rc[0])
        else:
            lc.append(lb[0])
            rc.append(rb[0])
    elif kind == "count_mismatch":
        which = draw(st.sampled_from(["lc", "rc", "lb", "rb"]))
        other = {"lc": "rc", "rc": "lc", "lb": "rb", "rb": "lb"}[which]
        if len(groups[which]) == len(groups[other]) and groups[which]:
            groups[which].pop()
        else:
            groups[which].append(0)
    elif kind == "float_axis":
        which = draw(st.sampled_from(nonempty))
        i = draw(st.integers(0, len(groups[which]) - 1))
        groups[which][i] = groups[which][i] + draw(st.sampled_from([0.0, 0.5]))
    elif kind == "numpy_int":
        which = draw(st.sampled_from(nonempty))
        i = draw(st.integers(0, len(groups[which]) - 1))
        groups[which][i] = np.int64(groups[which][i])
    dn = ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))
    if kind == "not_a_sequence":
        dn = draw(st.sampled_from([None, 3, "ij", ((0,), (0,)), (((0,), (0,)),), ((0, 0), (0, 0))]))
    return kind, tuple(lshape), tuple(rshape), dn


@_fuzz(40)
@given(case=mutated_dims(), config=st.sampled_from(["mxfp8", "mxfp4", "fp32"]))
def test_dot_general_invalid_dimension_numbers_raise_like_lax(case, config):
    _check_dims_like_lax(*case, config)


# lax.dot_general (an alias of lax.dot) also takes None (a plain matmul) and
# bare ints for one-axis lists.
@pytest.mark.parametrize("dn", [None, ((1, 0), ((), ()))], ids=["lax_default", "bare_ints"])
def test_dot_general_takes_what_lax_takes(dn):
    _check_dims_like_lax("pinned", (2, 8), (8, 3), dn, "mxfp8")


def _check_dims_like_lax(kind, lshape, rshape, dn, config):
    lhs, rhs = jnp.ones(lshape, jnp.float32), jnp.ones(rshape, jnp.float32)
    try:
        want = jax.eval_shape(lambda a, b: lax.dot_general(a, b, dn), lhs, rhs).shape
    except (TypeError, ValueError):
        want = None
    try:
        got = jaxmx.dot_general(lhs, rhs, dn, config=config)
    except (TypeError, ValueError) as err:
        assert want is None, f"{kind}: lax.dot_general accepts {dn}, jaxmx raised {err!r}"
        return
    assert want is not None, (
        f"{kind}: lax.dot_general rejects {dn} for shapes {lshape} x {rshape}, jaxmx returned "
        f"a result of shape {got.shape}"
    )
    assert got.shape == want


# ==========================================================================
# 2. vmap over quantize and dequantize.
# ==========================================================================


@st.composite
def vmap_plans(draw):
    """An array, a quantize axis, and vmap levels around quantize and around dequantize.

    Levels are (in_axes, out_axes), outermost first; either stage may have
    none (called outside any vmap).
    """
    rank = draw(st.integers(2, 4))  # of the batched array X
    shape = []
    for _ in range(rank):
        room = 1200 // max(1, math.prod(shape))
        shape.append(
            draw(
                st.sampled_from([1, 2, 3, 4, 7, 16, 33]).filter(lambda s, r=room: s <= r)
                | st.just(1)
            )
        )
    nq = draw(st.integers(0, min(2, rank - 1)))
    nd = draw(st.integers(0 if nq else 1, min(2, rank - 1)))

    def levels(n, r):
        out = []
        for _ in range(n):
            i = draw(st.integers(-r, r - 1))
            o = draw(st.integers(-r, r - 1))  # the output has the same rank r
            out.append((i, o))
            r -= 1
        return out

    q_levels = levels(nq, rank)
    ax = draw(st.integers(-(rank - nq), rank - nq - 1))
    d_levels = levels(nd, rank)
    return dict(
        shape=tuple(shape),
        q_levels=q_levels,
        d_levels=d_levels,
        axis=ax,
        block_size=draw(st.sampled_from([1, 2, 3, 4, 8, 16, 32])),
        fmt=draw(st.sampled_from(FORMATS)),
        packed=draw(st.booleans()),
        dtype=draw(st.sampled_from([np.float32, np.float32, ml_dtypes.bfloat16, np.float16])),
        scale_mode=draw(st.sampled_from(SCALE_MODES)),
        rounding=draw(st.sampled_from(DETERMINISTIC)),
    )


def _norm(a: int, r: int) -> int:
    return a + r if a < 0 else a


def _through(labels: list, levels, inner):
    """Axis labels through nested vmaps: ``inner`` maps the innermost slice's labels."""
    if not levels:
        return inner(labels)
    (i, o), rest = levels[0], levels[1:]
    i = _norm(i, len(labels))
    mapped = labels[i]
    out = _through(labels[:i] + labels[i + 1 :], rest, inner)
    out = list(out)
    out.insert(_norm(o, len(out) + 1), mapped)
    return out


def _vmapped(f, levels):
    for i, o in reversed(levels):
        f = jax.vmap(f, in_axes=i, out_axes=o)
    return f


_VMAP_CLEAR = re.compile(r"axis|axes|vmap|batch", re.IGNORECASE)


@_fuzz(30)
@given(plan=vmap_plans(), seed=st.integers(0, 2**32 - 1))
def test_vmap_in_out_axes_over_quantize_and_dequantize(plan, seed):
    x = _seeded(seed, plan["shape"], plan["dtype"], spread=3)
    if x.size and seed % 7 == 0:  # now and then a block that decodes to NaN
        x.flat[seed % x.size] = np.inf
    kw = dict(
        block_size=plan["block_size"], scale_mode=plan["scale_mode"], rounding=plan["rounding"]
    )
    labels = list(range(x.ndim))
    q_axis_label = []  # which label of X the quantize stage blocks along
    inner_q_shapes, inner_d_shapes = [], []

    def track_q(slice_labels):
        q_axis_label.append(slice_labels[plan["axis"]])
        return slice_labels

    t_labels = _through(labels, plan["q_levels"], track_q)
    d_slice_labels = []
    out_labels = _through(t_labels, plan["d_levels"], lambda s: d_slice_labels.append(s) or s)
    # The unbatched equivalent: quantize X along that label, then move axes as vmap does.
    fq = np.asarray(jaxmx.fake_quantize(x, plan["fmt"], axis=q_axis_label[0], **kw))
    want_t_shape = tuple(x.shape[lab] for lab in t_labels)
    want = np.transpose(fq, out_labels)
    want_inner = tuple(x.shape[lab] for lab in d_slice_labels[0])

    def q(v):
        t = jaxmx.quantize(v, plan["fmt"], axis=plan["axis"], packed=plan["packed"], **kw)
        inner_q_shapes.append(t.shape)
        return t

    def d(t):
        inner_d_shapes.append(t.shape)
        return jaxmx.dequantize(t, plan["dtype"])

    try:
        t = _vmapped(q, plan["q_levels"])(jnp.asarray(x))
        t_shape = t.shape
        y = np.asarray(_vmapped(d, plan["d_levels"])(t))
    except (ValueError, TypeError) as err:
        assert _VMAP_CLEAR.search(str(err)), f"unclear error under vmap: {err!r}"
        return
    want_q = tuple(x.shape[lab] for lab in _inner(labels, plan["q_levels"]))
    assert inner_q_shapes[0] == want_q, f"t.shape {inner_q_shapes[0]} inside vmap, want {want_q}"
    assert t_shape == want_t_shape, f"t.shape {t_shape} after vmap, want {want_t_shape}"
    assert inner_d_shapes[0] == want_inner, (
        f"t.shape {inner_d_shapes[0]} inside vmap, want {want_inner}"
    )
    _assert_same_bits(y, want, "dequantize under vmap vs unbatched fake_quantize")


def _inner(labels, levels):
    for i, _ in levels:
        i = _norm(i, len(labels))
        labels = labels[:i] + labels[i + 1 :]
    return labels


# ==========================================================================
# 3. Custom formats through the conformance checks.
# ==========================================================================


def int_format(bits: int, m: int) -> jaxmx.ElementFormat:
    """A symmetric fixed-point element, value = code / 2^m (INT8 is int_format(8, 6))."""
    max_code = (1 << (bits - 1)) - 1
    return jaxmx.ElementFormat(
        name=f"int{bits}_q{m}",
        kind="int",
        bits=bits,
        exponent_bits=0,
        mantissa_bits=m,
        bias=1,
        max_normal=max_code * 2.0**-m,
        min_normal=1.0,
        min_subnormal=2.0**-m,
        max_code=max_code,
        storage_dtype=np.dtype(np.int8 if bits <= 8 else np.int16),
    )


def _grid(elem: jaxmx.ElementFormat) -> np.ndarray:
    """Magnitudes of every code, from the bit layout alone (index = code)."""
    codes = np.arange(elem.max_code + 1)
    m = elem.mantissa_bits
    if elem.kind == "int":
        return codes * 2.0**-m
    field, mant = codes >> m, codes & ((1 << m) - 1)
    with np.errstate(over="ignore", under="ignore"):
        sub = np.ldexp(mant.astype(np.float64), 1 - elem.bias - m)
        norm = np.ldexp((mant + (1 << m)).astype(np.float64), field - elem.bias - m)
    return np.where(field == 0, sub, norm)


def _model_fake_quantize(x, fmt: jaxmx.MXFormat, axis, scale_mode, rounding) -> np.ndarray:
    """float64 model of fake_quantize for any element grid (reference.py's rules)."""
    elem, bs = fmt.element, fmt.block_size
    g = _grid(elem)
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    out = np.empty_like(x)
    for idx in np.ndindex(*x.shape[:-1]):
        for b in range(0, x.shape[-1], bs):
            blk = x[idx][b : b + bs]
            sl = idx + (slice(b, b + bs),)
            if not np.all(np.isfinite(blk)):
                out[sl] = np.nan
                continue
            e = reference.shared_exponent(float(np.max(np.abs(blk))), elem, scale_mode)
            q = reference.round_to_grid(np.abs(blk) / 2.0**e, g, rounding) * 2.0**e
            # Two's complement has no -0: a zero integer code is +0.
            out[sl] = np.copysign(q, blk)
            if elem.kind == "int":
                out[sl] = np.where(q == 0, 0.0, out[sl])
    with np.errstate(over="ignore"):
        return np.moveaxis(out.astype(np.float32), -1, axis)


_names = itertools.count()


@contextlib.contextmanager
def _registry_restored():
    """Random formats must not leak into other tests' view of the registry.

    The registry has no public way to unregister, so its two dicts are
    restored directly.
    """
    reg, ali = dict(_catalog._REGISTRY), dict(_catalog._ALIASES)
    try:
        yield
    finally:
        _catalog._REGISTRY.clear()
        _catalog._REGISTRY.update(reg)
        _catalog._ALIASES.clear()
        _catalog._ALIASES.update(ali)


@st.composite
def custom_elements(draw):
    """(description, builder): floats of any e/m/bias, integers of any width and scaling."""
    if draw(st.booleans()):
        e = draw(st.integers(0, 14))
        m = draw(st.integers(0, 12))
        bias = draw(st.none() | st.integers(-4, (1 << min(e, 10)) + 2))
        return f"float_format({e}, {m}, bias={bias})", lambda: F.float_format(e, m, bias=bias)
    bits = draw(st.integers(1, 17))
    m = draw(st.integers(-1, max(bits - 2, 0)))
    return f"int_format({bits}, {m})", lambda: int_format(bits, m)


_BLOCK_SIZES = st.sampled_from([0, -1, -32, 1, 2, 3, 5, 8, 16, 17, 32, 33, 64])


@_fuzz(40)
@given(
    elem=custom_elements(),
    block_size=_BLOCK_SIZES,
    x=hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 3), st.integers(1, 70)),
        elements=st.floats(width=32) | st.floats(-4.0, 4.0, width=32),
    ),
    axis=st.sampled_from([0, 1, -1]),
    scale_mode=st.sampled_from(SCALE_MODES),
    rounding=st.sampled_from(DETERMINISTIC),
)
def test_custom_formats_work_fully_or_are_refused(elem, block_size, x, axis, scale_mode, rounding):
    what, build = elem
    name = f"fuzz_{next(_names)}"
    with _registry_restored():
        try:
            fmt = jaxmx.MXFormat(
                name=name, element=build(), scale=F.E8M0, block_size=block_size, reference="fuzz"
            )
            jaxmx.register_format(fmt)
        except (ValueError, TypeError):
            return  # refused when built or registered: allowed
        desc = f"{what}, block_size={block_size}"
        kw = dict(axis=axis, scale_mode=scale_mode, rounding=rounding)
        fq = np.asarray(jaxmx.fake_quantize(x, fmt, **kw))
        t = jaxmx.quantize(x, fmt, **kw)
        dq = np.asarray(jaxmx.dequantize(t))
        _assert_same_bits(dq, fq, f"{desc}: dequantize(quantize) vs fake_quantize")
        _assert_same_bits(
            fq,
            _model_fake_quantize(x, fmt, axis, scale_mode, rounding),
            f"{desc}: fake_quantize vs float64 model",
        )
        # By name, too: the registered format is the same format.
        _assert_same_bits(jaxmx.fake_quantize(x, name, **kw), fq, f"{desc}: by name")
        tp = jaxmx.quantize(x, fmt, packed=True, **kw)
        _assert_same_bits(jaxmx.dequantize(tp), dq, f"{desc}: packed round trip")
        _assert_same_bits(jaxmx.unpack(tp).data, t.data, f"{desc}: unpack(packed) codes")
        _assert_same_bits(jaxmx.pack(t).data, tp.data, f"{desc}: pack(unpacked) codes")
        jq = jax.jit(lambda v: jaxmx.dequantize(jaxmx.quantize(v, fmt, **kw)))(x)
        _assert_same_bits(jq, dq, f"{desc}: jit vs eager quantize/dequantize")
        _assert_same_bits(
            jax.jit(lambda v: jaxmx.fake_quantize(v, fmt, **kw))(x),
            fq,
            f"{desc}: jit vs eager fake_quantize",
        )
        # Where x needs more significant bits than any element value has,
        # and its block is finite, quantization must have changed it.
        elem = fmt.element
        precision = elem.bits - 1 if elem.kind == "int" else elem.mantissa_bits + 1
        sig = np.frexp(x.astype(np.float64))[0] * 2.0**precision
        wide = np.isfinite(fq) & np.isfinite(x) & (sig != np.round(sig))
        assert np.all(fq[wide] != x[wide]), f"{desc}: quantization left off-grid values unchanged"


# ==========================================================================
# 4. Bad arguments to every public function.
# ==========================================================================

X = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
KEY = jax.random.key(0)

# Values for every kind of parameter. "bad" ones must be refused with a clear
# message; "same" ones (numpy scalars for Python ones) must be accepted and
# give the canonical value's result.
_texts = st.text(string.ascii_letters + "_-0123456789 ", max_size=8)
_FORMAT_NAMES = jaxmx.list_formats(aliases=True)


def _not_in(*valid):
    """Random strings other than the valid ones (hypothesis also tries the module's literals)."""
    return _texts.filter(lambda s: s not in valid)


BAD = {
    "pos_int": st.one_of(
        st.sampled_from([0, -1, -32, True, False, 8.0, 16.5, "16", b"16", [16], 1j]),
        st.integers(max_value=0),
        st.floats(allow_nan=True),
        _texts,
    ),
    "pos_int_or_none": st.one_of(
        st.sampled_from([0, -1, True, False, 8.0, "16", [16]]),
        st.integers(max_value=0),
        _texts,
    ),
    "axis": st.one_of(
        st.sampled_from([True, False, 1.0, "1", None, [1], 2, -3, 2**40, -(2**40)]),
        st.integers(2, 2**70),
        st.integers(max_value=-3),
    ),
    "flag": st.one_of(
        st.sampled_from(["no", "yes", "", "False", None, 0, 1, 2, 1.0, [], [0]]), _texts
    ),
    "format": st.one_of(
        st.sampled_from([None, 8, 8.0, b"mxfp8", "mxfp5", "fp8", "", ["mxfp8"]]),
        _texts.filter(lambda s: s.lower() not in _FORMAT_NAMES),
    ),
    "scale_mode": st.one_of(
        st.sampled_from([None, 0, "FLOOR", "round", b"floor", "stochastic"]),
        _texts.filter(lambda s: s not in SCALE_MODES),
    ),
    "rounding": st.one_of(
        st.sampled_from([None, 0, "nearest", "NEAREST_EVEN", "even", b"nearest_even", "floor"]),
        _texts.filter(lambda s: s not in DETERMINISTIC + ("stochastic",)),
    ),
    "array": st.sampled_from(
        [
            None,
            "abc",
            np.full((4, 32), 3 + 0j, np.complex64),
            ["a", "b"],
            np.ones((4, 32), np.int32),
            np.ones((4, 32), np.complex64),
            np.ones((4, 32), np.bool_),
            np.ones((4, 32), np.uint8),
            {"x": 1},
        ]
    ),
    "mxtensor": st.sampled_from([None, X, 3, "t", {"data": X}]),
    "out_dtype": st.sampled_from(
        [
            None,
            "int8",
            jnp.int8,
            np.int32,
            "float64",
            np.float64,
            "nope",
            3,
            np.complex64,
            jnp.bool_,
            "float8_e4m3fn",
        ]
    ),
    "config": st.one_of(
        st.sampled_from([3, None, "mxfp5", {}, jaxmx.DotConfig, b"mxfp8", 1.0]),
        _texts.filter(lambda s: s not in PRESETS and s.lower() not in _FORMAT_NAMES),
    ),
    "dims": st.sampled_from(
        [
            # (None and bare ints such as ((1, 0), ((), ())) are valid: lax takes them)
            3,
            "ij",
            ((1,), (0,)),
            (((1,), (0,)),),
            (((1,), (0,)), ((), ()), ()),
            ((1, "a"), ((), ())),
            (((1.5,), (0,)), ((), ())),
            ((("1",), (0,)), ((), ())),
        ]
    ),
    "key_bad": st.sampled_from([3, "k", 1.5, [1, 2], np.ones(3, np.uint32)]),
    "choice_residuals": st.one_of(
        st.sampled_from([None, "hp", 0, "quantised"]), _not_in("high_precision", "quantized")
    ),
    "choice_compute": st.one_of(
        st.sampled_from(["float16", "float64", 0, "bf16", jnp.float32]),
        _not_in("float32", "bfloat16"),
    ),
    "choice_implementation": st.one_of(
        st.sampled_from([True, "auto", "Native", "triton", 0]), _not_in("xla", "native", "pallas")
    ),
    "fmt_or_none": st.one_of(
        st.sampled_from([8, "fp8", "mxfp5", b"mxfp8", 1.0]),
        _texts.filter(lambda s: s.lower() not in _FORMAT_NAMES and s != jaxmx.FORWARD),
    ),
    "round_to_fmt": st.sampled_from(
        ["nope", 3, None, jnp.int8, "float64", np.float32, 1.0, "mxfp5", b"bf16"]
    ),
    "preset_name": st.one_of(
        st.sampled_from([None, 3, "MXFP8", "mxfp5", b"mxfp8"]),
        _texts.filter(lambda s: s not in PRESETS),
    ),
    "subscripts": st.one_of(
        st.sampled_from(
            [
                "ij,jk->ik->ik",
                "ij->ij",
                "ij,jk,kl->il",
                "",
                "ij,jk->iz",
                "ijk,jk->ik",
                "ij,jk->ikk",
                "i#,jk->ik",
                "->",
                ",",
                "ij,jk->ik,",
                None,
                3,
                b"ij,jk->ik",
                "ij,jk-> ik",
                "ij,jk>ik",
            ]
        ),
        st.text("ijk,->. ", max_size=10),
    ),
    "groups": st.one_of(
        st.sampled_from([3, 0, -1, True, "2", 2.0, None, 8, 5]),
        st.integers(max_value=0),
        st.integers(3, 2**40),
    ),
    "strides": st.sampled_from([("a", "b"), (0, 1), (-1, 1), (1,), (1, 1, 1), None, 1.5, "1"]),
    "padding": st.sampled_from(["FOO", "same", 3, None, ((1, 1),), [(1, 1, 1), (1, 1)]]),
    "conv_operand": st.sampled_from(
        [
            np.ones((2, 8, 8, 4), np.complex64),
            np.ones((2, 8, 8, 4), np.int32),
            np.ones((2, 8, 8, 4), np.bool_),
            None,
            "x",
        ]
    ),
    "not_callable": st.sampled_from([3, None, "f", X]),
    "rules": st.sampled_from(
        [3, "mxfp5", [("(", "mxfp8")], [("x",)], [(3, "mxfp8")], [(".*", "mxfp5")], [(".*", 3)]]
    ),
    "choice_derivatives": st.one_of(
        st.sampled_from(["drop", None, True, 0, "KEEP"]), _not_in("keep", "inline")
    ),
    "regex": st.sampled_from(["(", "[a-", 3, b"kernel"]),
    "not_str": st.sampled_from([3, b"LM", ["LM"], 1.5]),
    "aliases": st.sampled_from(["abc", 3, None, ("mxfp8",), (3,)]),
    "register": st.sampled_from(["mxfp8", None, 3, {}, F.FP8_E4M3]),
    "element": st.sampled_from(["fp8_e4m3", None, 3, F.E8M0, jaxmx.get_format("mxfp8")]),
}

T = jaxmx.quantize(X, "mxfp8")
T4 = jaxmx.quantize(X, "mxfp4")
CONV_X = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
CONV_W = np.random.default_rng(2).standard_normal((3, 3, 2, 8)).astype(np.float32)
CONV_KW = dict(
    window_strides=(1, 1),
    padding="SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=2,
    config="mxfp8",
)
DN = (((1,), (0,)), ((), ()))
W = np.random.default_rng(3).standard_normal((32, 8)).astype(np.float32)


def _matmul(x, w):
    return x @ w


def _conv(**kw):
    args = {"lhs": CONV_X, "rhs": CONV_W, **CONV_KW, **kw}
    return lambda: jaxmx.conv_general_dilated(**args)


# (function, parameter, kind, how to call with a value for that parameter)
PARAMS = [
    ("quantize", "x", "array", lambda v: jaxmx.quantize(v, "mxfp8")),
    ("quantize", "format", "format", lambda v: jaxmx.quantize(X, v)),
    ("quantize", "axis", "axis", lambda v: jaxmx.quantize(X, "mxfp8", axis=v)),
    (
        "quantize",
        "block_size",
        "pos_int_or_none",
        lambda v: jaxmx.quantize(X, "mxfp8", block_size=v),
    ),
    ("quantize", "scale_mode", "scale_mode", lambda v: jaxmx.quantize(X, "mxfp8", scale_mode=v)),
    ("quantize", "rounding", "rounding", lambda v: jaxmx.quantize(X, "mxfp8", rounding=v)),
    (
        "quantize",
        "flush_subnormals",
        "flag",
        lambda v: jaxmx.quantize(X, "mxfp8", flush_subnormals=v),
    ),
    ("quantize", "packed", "flag", lambda v: jaxmx.quantize(X, "mxfp4", packed=v)),
    (
        "quantize",
        "key",
        "key_bad",
        lambda v: jaxmx.quantize(X, "mxfp8", rounding="stochastic", key=v),
    ),
    ("fake_quantize", "x", "array", lambda v: jaxmx.fake_quantize(v, "mxfp8")),
    ("fake_quantize", "format", "format", lambda v: jaxmx.fake_quantize(X, v)),
    ("fake_quantize", "axis", "axis", lambda v: jaxmx.fake_quantize(X, "mxfp8", axis=v)),
    (
        "fake_quantize",
        "block_size",
        "pos_int_or_none",
        lambda v: jaxmx.fake_quantize(X, "mxfp8", block_size=v),
    ),
    (
        "fake_quantize",
        "scale_mode",
        "scale_mode",
        lambda v: jaxmx.fake_quantize(X, "mxfp8", scale_mode=v),
    ),
    (
        "fake_quantize",
        "rounding",
        "rounding",
        lambda v: jaxmx.fake_quantize(X, "mxfp8", rounding=v),
    ),
    (
        "fake_quantize",
        "flush_subnormals",
        "flag",
        lambda v: jaxmx.fake_quantize(X, "mxfp8", flush_subnormals=v),
    ),
    (
        "fake_quantize",
        "key",
        "key_bad",
        lambda v: jaxmx.fake_quantize(X, "mxfp8", rounding="stochastic", key=v),
    ),
    ("dequantize", "t", "mxtensor", lambda v: jaxmx.dequantize(v)),
    ("dequantize", "dtype", "out_dtype", lambda v: jaxmx.dequantize(T, v)),
    ("pack", "t", "mxtensor", lambda v: jaxmx.pack(v)),
    ("unpack", "t", "mxtensor", lambda v: jaxmx.unpack(v)),
    ("get_format", "fmt", "format", lambda v: jaxmx.get_format(v)),
    ("list_formats", "aliases", "flag", lambda v: jaxmx.list_formats(aliases=v)),
    ("register_format", "fmt", "register", lambda v: jaxmx.register_format(v)),
    (
        "register_format",
        "aliases",
        "aliases",
        lambda v: jaxmx.register_format(
            jaxmx.MXFormat(name=f"fuzz_alias_{next(_names)}", element=F.FP8_E4M3, scale=F.E8M0),
            aliases=v,
        ),
    ),
    ("preset", "name", "preset_name", lambda v: jaxmx.preset(v)),
    ("preset", "overrides", "pos_int", lambda v: jaxmx.preset("mxfp8", block_size=v)),
    ("round_to", "x", "array", lambda v: jaxmx.round_to(v, "bfloat16")),
    ("round_to", "fmt", "round_to_fmt", lambda v: jaxmx.round_to(X, v)),
    ("round_to", "rounding", "rounding", lambda v: jaxmx.round_to(X, "bfloat16", rounding=v)),
    (
        "round_to",
        "key",
        "key_bad",
        lambda v: jaxmx.round_to(X, "bfloat16", rounding="stochastic", key=v),
    ),
    ("round_to", "subnormals", "flag", lambda v: jaxmx.round_to(X, "fp8_e4m3", subnormals=v)),
    ("round_to", "saturate", "flag", lambda v: jaxmx.round_to(X, "fp8_e4m3", saturate=v)),
    ("DotConfig", "lhs", "fmt_or_none", lambda v: jaxmx.DotConfig(lhs=v)),
    ("DotConfig", "rhs_bwd", "fmt_or_none", lambda v: jaxmx.DotConfig(rhs_bwd=v)),
    ("DotConfig", "block_size", "pos_int", lambda v: jaxmx.DotConfig(block_size=v)),
    ("DotConfig", "scale_mode", "scale_mode", lambda v: jaxmx.DotConfig(scale_mode=v)),
    ("DotConfig", "rounding", "rounding", lambda v: jaxmx.DotConfig(rounding=v)),
    ("DotConfig", "grad_rounding", "rounding", lambda v: jaxmx.DotConfig(grad_rounding=v)),
    ("DotConfig", "residuals", "choice_residuals", lambda v: jaxmx.DotConfig(residuals=v)),
    ("DotConfig", "compute_dtype", "choice_compute", lambda v: jaxmx.DotConfig(compute_dtype=v)),
    (
        "DotConfig",
        "implementation",
        "choice_implementation",
        lambda v: jaxmx.DotConfig(implementation=v),
    ),
    ("dot_general", "lhs", "array", lambda v: jaxmx.dot_general(v, W, DN, config="mxfp8")),
    ("dot_general", "rhs", "array", lambda v: jaxmx.dot_general(X, v, DN, config="mxfp8")),
    (
        "dot_general",
        "dimension_numbers",
        "dims",
        lambda v: jaxmx.dot_general(X, W, v, config="mxfp8"),
    ),
    ("dot_general", "config", "config", lambda v: jaxmx.dot_general(X, W, DN, config=v)),
    (
        "dot_general",
        "key",
        "key_bad",
        lambda v: jaxmx.dot_general(
            X, W, DN, config=jaxmx.preset("mxfp8", rounding="stochastic"), key=v
        ),
    ),
    ("einsum", "subscripts", "subscripts", lambda v: jaxmx.einsum(v, X, W, config="mxfp8")),
    ("einsum", "a", "array", lambda v: jaxmx.einsum("ij,jk->ik", v, W, config="mxfp8")),
    ("einsum", "config", "config", lambda v: jaxmx.einsum("ij,jk->ik", X, W, config=v)),
    ("conv_general_dilated", "lhs", "conv_operand", lambda v: _conv(lhs=v)()),
    (
        "conv_general_dilated",
        "feature_group_count",
        "groups",
        lambda v: _conv(feature_group_count=v)(),
    ),
    ("conv_general_dilated", "window_strides", "strides", lambda v: _conv(window_strides=v)()),
    ("conv_general_dilated", "padding", "padding", lambda v: _conv(padding=v)()),
    ("conv_general_dilated", "config", "config", lambda v: _conv(config=v)()),
    ("as_dot_config", "config", "config", lambda v: jaxmx.as_dot_config(v)),
    ("intercept", "fn", "not_callable", lambda v: jaxmx.intercept(v, "mxfp8")(X, W)),
    ("intercept", "rules", "rules", lambda v: jaxmx.intercept(_matmul, v, warn=False)(X, W)),
    (
        "intercept",
        "custom_derivatives",
        "choice_derivatives",
        lambda v: jaxmx.intercept(_matmul, "mxfp8", custom_derivatives=v)(X, W),
    ),
    (
        "intercept",
        "weights",
        "regex",
        lambda v: jaxmx.intercept(_matmul, "mxfp8", weights=v)(X, W),
    ),
    (
        "intercept",
        "path_root",
        "not_str",
        lambda v: jaxmx.intercept(_matmul, "mxfp8", path_root=v)(X, W),
    ),
    ("intercept", "warn", "flag", lambda v: jaxmx.intercept(_matmul, "mxfp8", warn=v)(X, W)),
    (
        "MXFormat",
        "block_size",
        "pos_int",
        lambda v: jaxmx.quantize(
            X, jaxmx.MXFormat(name="fuzz_bs", element=F.FP8_E4M3, scale=F.E8M0, block_size=v)
        ),
    ),
    (
        "MXFormat",
        "element",
        "element",
        lambda v: jaxmx.quantize(X, jaxmx.MXFormat(name="fuzz_el", element=v, scale=F.E8M0)),
    ),
]


def _lax_conv(**kw):
    """What lax.conv_general_dilated itself makes of the arguments (it runs: its
    shape rule alone accepts some values its lowering refuses)."""
    args = {"lhs": CONV_X, "rhs": CONV_W, **CONV_KW, **kw}
    args.pop("config")
    return lax.conv_general_dilated(**args).shape


# Parameters jaxmx passes on to lax: what lax accepts, jaxmx must accept too.
LAX_ACCEPTS = {
    ("conv_general_dilated", "feature_group_count"): lambda v: _lax_conv(feature_group_count=v),
    ("conv_general_dilated", "window_strides"): lambda v: _lax_conv(window_strides=v),
    ("conv_general_dilated", "padding"): lambda v: _lax_conv(padding=v),
}


def _run_bad(call, bad, what):
    """``call(bad)`` must raise a clear ValueError/TypeError (or warn, documented)."""
    with _registry_restored(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = call(bad)
            if isinstance(out, jax.Array):
                out.block_until_ready()
        except (ValueError, TypeError) as err:
            _assert_clear(err, bad, what=what)
            return
    warned = [w for w in caught if issubclass(w.category, UserWarning)]
    if warned:
        _assert_clear(warned[0].message, bad, what=what)
        return
    raise AssertionError(f"{what}: accepted {bad!r} ({type(bad).__name__}) without an error")


@pytest.mark.parametrize(
    ("fn", "param", "kind", "call"), PARAMS, ids=[f"{f}-{p}" for f, p, _, _ in PARAMS]
)
@_fuzz(5)
@given(data=st.data())
def test_bad_arguments_are_refused_clearly(fn, param, kind, call, data):
    bad = data.draw(BAD[kind], label=f"{fn}({param}=...)")
    if fn == "einsum" and isinstance(bad, str):
        # Subscripts jnp.einsum accepts may be supported or clearly refused.
        try:
            want = jnp.einsum(bad, X, W).shape
        except Exception:
            want = None
        if want is not None:
            try:
                got = jaxmx.einsum(bad, X, W, config="mxfp8")
            except (ValueError, TypeError) as err:  # a form jaxmx does not support
                _assert_clear(err, bad, what=f"einsum({bad!r})")
                return
            assert got.shape == want
            return
    if fn == "DotConfig" and param == "grad_rounding" and bad is None:
        return  # None is documented: same as `rounding`
    if (fn, param) in LAX_ACCEPTS:
        try:
            want = LAX_ACCEPTS[fn, param](bad)
        except Exception:
            want = None
        if want is not None:
            assert call(bad).shape == want, f"{fn}({param}={bad!r}): lax gives shape {want}"
            return
    _run_bad(call, bad, f"{fn}({param}={bad!r})")


# A key without stochastic rounding does nothing: silently ignoring it hides
# a configuration mistake (e.g. a rounding mode typed in the wrong place).
KEY_CALLS = {
    "quantize": lambda: jaxmx.quantize(X, "mxfp8", key=KEY),
    "fake_quantize": lambda: jaxmx.fake_quantize(X, "mxfp8", key=KEY),
    "round_to": lambda: jaxmx.round_to(X, "bfloat16", key=KEY),
    "dot_general": lambda: jaxmx.dot_general(X, W, DN, config="mxfp8", key=KEY),
    "einsum": lambda: jaxmx.einsum("ij,jk->ik", X, W, config="mxfp8", key=KEY),
    "conv_general_dilated": lambda: _conv(key=KEY)(),
}


@pytest.mark.parametrize("fn", list(KEY_CALLS))
def test_key_without_stochastic_rounding_is_refused(fn):
    with pytest.raises((ValueError, TypeError)) as info:
        jax.block_until_ready(KEY_CALLS[fn]())
    assert re.search("key", str(info.value)) and re.search("stochastic", str(info.value))


# numpy scalars where Python ones are documented: accepted, same result.
SAME = [
    (
        "quantize axis",
        lambda v: jaxmx.fake_quantize(X, "mxfp8", axis=v),
        0,
        st.sampled_from([np.int64(0), np.int32(0), np.int8(0)]),
    ),
    (
        "quantize block_size",
        lambda v: jaxmx.fake_quantize(X, "mxfp8", block_size=v),
        16,
        st.sampled_from([np.int64(16), np.int32(16), np.uint8(16)]),
    ),
    (
        "DotConfig block_size",
        lambda v: jaxmx.dot_general(X, W, DN, config=jaxmx.DotConfig(lhs="mxfp4", block_size=v)),
        16,
        st.sampled_from([np.int64(16), np.int32(16)]),
    ),
    (
        "conv feature_group_count",
        lambda v: _conv(feature_group_count=v)(),
        2,
        st.sampled_from([np.int64(2), np.int32(2)]),
    ),
    (
        "dequantize dtype",
        lambda v: jaxmx.dequantize(T4, v),
        jnp.bfloat16,
        st.sampled_from(["bfloat16", np.dtype(ml_dtypes.bfloat16), ml_dtypes.bfloat16]),
    ),
    (
        "flush_subnormals",
        lambda v: jaxmx.fake_quantize(X, "mxfp8", flush_subnormals=v),
        True,
        st.just(np.bool_(True)),
    ),
    (
        "dot_general dims",
        lambda v: jaxmx.dot_general(X, W, v, config="mxfp8"),
        DN,
        st.just(((np.array([1]), np.array([0])), (np.array([], int), np.array([], int)))),
    ),
]


@pytest.mark.parametrize(("what", "call", "canonical", "values"), SAME, ids=[s[0] for s in SAME])
@_fuzz(3)
@given(data=st.data())
def test_numpy_scalars_are_accepted_like_python_ones(what, call, canonical, values, data):
    v = data.draw(values)
    _assert_same_bits(call(v), call(canonical), f"{what}={v!r}")
