"""PTQ of any JAX function in one call: find its weights, calibrate, quantize, serve."""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import threading
import time
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmx import _hadamard
from jaxmx._intercept.coverage import Coverage
from jaxmx._intercept.plan import Planner
from jaxmx._intercept.run import Plan
from jaxmx._paths import path_string
from jaxmx.config import DotConfig
from jaxmx.formats import MXFormat, get_family
from jaxmx.intercept import Intercepted
from jaxmx.ptq._gptq import GPTQ
from jaxmx.ptq._search import ScaleSearch
from jaxmx.ptq._uses import MatmulUse, leaf_axis, permutation, weight_uses
from jaxmx.quantize import dequantize, quantize
from jaxmx.rules import parse_rules
from jaxmx.tensor import MXTensor

__all__ = ["PTQReport", "TiedWeight", "WeightResult", "quantize_model"]

METHODS = ("direct", "search", "gptq", "hadamard", "hadamard_search", "hadamard_gptq")


# --------------------------------------------------------------------------
# What quantize_model returns besides the serving function.
# --------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TiedWeight:
    """A parameter read both by a matmul and by something else (a tied embedding).

    :func:`quantize_model` puts one in place of such a leaf: ``value`` is the
    float parameter as it was, for every non-matmul read (the embedding
    lookup of a tied output head); ``matmul`` is its quantized copy (shaped
    like the leaf, blocked along the axis the matmuls contract), which the
    serving function hands to those matmuls. Both are stored, so the table
    costs its float bytes plus the copy's.
    """

    value: jax.Array
    matmul: MXTensor

    def __repr__(self) -> str:
        return f"TiedWeight(value={jax.typeof(self.value)}, matmul={self.matmul!r})"


@dataclasses.dataclass(frozen=True)
class WeightResult:
    """What :func:`quantize_model` did with one parameter."""

    # Leaf path in the parameters ("params/layers_0/mlp/up_proj/kernel").
    path: str
    shape: tuple[int, ...]
    # "quantized", "tied" (float kept, quantized copy for its matmuls) or "float".
    action: str
    # Method that made the MXTensor ("gptq", "hadamard_gptq", ...); None if float.
    method: str | None = None
    format: str | None = None
    # The leaf axis its matmuls contract (the blocks run along it).
    axis: int | None = None
    # Hadamard order the weight (and its matmuls' activations) are rotated by.
    hadamard: int | None = None
    # Why it stayed float, or what changed from the method asked for.
    note: str = ""

    def describe(self, width: int = 0) -> str:
        shape = str(tuple(self.shape))
        if self.action == "float":
            return f"float      {self.path:<{width}}  {shape}  {self.note}"
        what = f"{self.format} axis {self.axis}, {self.method}"
        if self.hadamard:
            what += f" (Hadamard {self.hadamard})"
        if self.action == "tied":
            what += "; float kept for its other reads"
        note = f"  [{self.note}]" if self.note else ""
        return f"{self.action:<9}  {self.path:<{width}}  {shape}  {what}{note}"


@dataclasses.dataclass(frozen=True)
class PTQReport:
    """Which parameters :func:`quantize_model` quantized, how, and which it left float (why).

    Lists every parameter read by a matmul of the traced function and every
    other parameter of two or more dimensions (biases and norm scales that
    no matmul reads are left out).
    """

    method: str
    batches: int  # calibration batches run (0: only the first was traced)
    weights: tuple[WeightResult, ...]
    seconds: float

    @property
    def quantized(self) -> tuple[str, ...]:
        """Paths of the parameters with an MXTensor (tied ones included)."""
        return tuple(w.path for w in self.weights if w.action != "float")

    @property
    def kept_float(self) -> dict[str, str]:
        """``{path: why}`` of the parameters left float."""
        return {w.path: w.note for w in self.weights if w.action == "float"}

    def __getitem__(self, path: str) -> WeightResult:
        for w in self.weights:
            if w.path == path:
                return w
        raise KeyError(f"no parameter {path!r} in the report; it has {len(self.weights)}")

    def summary(self) -> str:
        """One line per parameter, quantized ones first."""
        n = len(self.quantized)
        head = (
            f"quantize_model(method={self.method!r}): {n} of {len(self.weights)} parameters "
            f"quantized, {self.batches} calibration batch{'' if self.batches == 1 else 'es'}, "
            f"{self.seconds:.1f} s"
        )
        width = max((len(w.path) for w in self.weights), default=0)
        rows = sorted(self.weights, key=lambda w: w.action == "float")
        return "\n".join([head, *(f"  {w.describe(width)}" for w in rows)])

    def __str__(self) -> str:
        return self.summary()


# --------------------------------------------------------------------------
# The traced function: intercept with the weights' uses found.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Weight:
    """What planning decided for one parameter: how its matmuls read it."""

    path: str
    axis: int  # the leaf axis its matmuls contract
    fmt: MXFormat
    block_size: int | tuple | None
    scale_mode: str
    tied: bool  # also read by something other than a matmul
    rotate: int | None  # Hadamard order, or None


class _SitePlanner(Planner):
    """intercept's planner, recording the address of each site it lists."""

    def __init__(self, *args):
        super().__init__(*args)
        self.addrs: list = []

    def _site(self, eqn, path, op, operands, within, blocked, addr):
        self.addrs.append(addr)
        return super()._site(eqn, path, op, operands, within, blocked, addr)

    def _jaxmx_site(self, eqn, ns, op, ins, within):
        self.addrs.append(None)
        return super()._jaxmx_site(eqn, ns, op, ins, within)


# The quantized weights of the call being traced: {leaf path: MXTensor}.
_LIVE: contextvars.ContextVar = contextvars.ContextVar("jaxmx_ptq_live", default=None)


def _is_node(x) -> bool:
    return isinstance(x, (MXTensor, TiedWeight))


def _param_path(path) -> str | None:
    """The leaf path of a leaf of intercept's ``(fn, args, kwargs)`` when it is in ``args[0]``."""
    if len(path) >= 2 and getattr(path[0], "idx", None) == 1 and getattr(path[1], "idx", -1) == 0:
        return path_string(path[2:])
    return None


def _swapped(cfg: DotConfig) -> DotConfig:
    """The config with the weight formats on the left operand (a weight on the left)."""
    return cfg.replace(
        lhs=cfg.role("rhs"),
        rhs=cfg.role("lhs"),
        lhs_bwd=cfg.role("rhs_bwd"),
        rhs_bwd=cfg.role("lhs_bwd"),
    )


def _activation(u: MatmulUse) -> tuple[int, int] | None:
    """``(operand index, contraction axis)`` of the activation a weight meets, when
    the matmul is a dot_general contracting one axis of each and the weight has
    no batch axis; None otherwise."""
    if u.op != "dot_general" or u.blocked or u.scanned or u.other is not None:
        return None
    (lc, rc), (lb, rb) = u.eqn.params["dimension_numbers"]
    wc, wb, ac = (lc, lb, rc) if u.index == 0 else (rc, rb, lc)
    if len(wc) != 1 or wb:
        return None
    return 1 - u.index, int(ac[0])


def _operand_axis(u: MatmulUse) -> int | None:
    """The axis of the weight operand its matmul contracts (one), or None."""
    if u.op == "dot_general":
        (lc, rc), (lb, rb) = u.eqn.params["dimension_numbers"]
        wc, wb = (lc, lb) if u.index == 0 else (rc, rb)
        return int(wc[0]) if len(wc) == 1 and not wb else None
    if u.op == "conv_general_dilated" and u.index == 1:
        return int(u.eqn.params["dimension_numbers"].rhs_spec[1])
    return None


class _PTQFunction(Intercepted):
    """``jaxmx.intercept`` of ``fn`` that also knows which parameters its matmuls read.

    ``mode``: "plan" (trace only), "collect" (the float function, recording
    each weight's Hessian ``X^T X`` of its matmuls' activations), or "serve"
    (the rules' MX matmuls, quantized weights handed to their matmuls, the
    activations of rotated weights rotated).
    """

    def __init__(self, fn, rules, mode: str, weights: dict | None = None):
        super().__init__(fn, rules, "keep", None, None, False, ("", 0, "jaxmx.ptq"))
        self.mode = mode
        self.plan_weights: dict[str, _Weight] = dict(weights or {})
        self.report: PTQReport | None = None
        self.sums: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        self._planner: _SitePlanner | None = None

    def __repr__(self) -> str:
        name = getattr(self.fn, "__name__", type(self.fn).__name__)
        n = len(self.plan_weights)
        return (
            f"quantize_model({name!r}: {n} weights in MX, rules={[r.pattern for r in self.rules]})"
        )

    def _new_planner(self) -> Planner:
        self._planner = _SitePlanner(
            self.rules, self.custom_derivatives, self.weights, self.path_root
        )
        return self._planner

    def __call__(self, *args, **kwargs):
        live = _live(args[0]) if args and self.mode == "serve" else None
        token = _LIVE.set(live)
        try:
            return super().__call__(*args, **kwargs)
        finally:
            _LIVE.reset(token)

    def _traced(self, args, kwargs):
        if args and self.mode == "serve":  # tied weights: the float value for fn's trace
            args = (_float_view(args[0]), *args[1:])
        return super()._traced(args, kwargs)

    def _trace(self, flat, treedef, mask, arrays):
        traced = super()._trace(flat, treedef, mask, arrays)
        planner = self._planner
        srcs = [_param_path(path) for (path, _), m in zip(flat, mask, strict=True) if m]
        uses = weight_uses(traced.closed, srcs, planner)
        sites = {a: s for a, s in zip(planner.addrs, planner.sites, strict=True) if a is not None}
        traced.ptq = (uses, sites)
        if self.mode == "collect":
            traced.plan = self._collect_plan(uses)
        elif self.mode == "serve":
            traced.plan, traced.coverage = self._serve_plan(uses, planner, traced)
        return traced

    # --- collection ---------------------------------------------------------

    def _add(self, leaf, gram):
        with self._lock:
            self.sums[leaf] = self.sums.get(leaf, 0.0) + np.asarray(gram, np.float64)

    def _collect_plan(self, uses) -> Plan:
        hooks = {}
        for leaf, us in uses.matmuls.items():
            if leaf not in self.plan_weights:
                continue
            for u in us:
                act = _activation(u)
                if act is not None:
                    hooks[u.addr] = functools.partial(self._record, leaf, *act)
        return Plan({}, _ancestors(hooks), None, hooks)

    def _record(self, leaf, index, axis, eqn, invals):
        x = invals[index]
        rows = jnp.moveaxis(x, axis, -1).reshape(-1, x.shape[axis]).astype(jnp.float32)
        gram = jnp.matmul(rows.T, rows, precision=lax.Precision.HIGHEST)
        jax.debug.callback(functools.partial(self._add, leaf), gram)
        return eqn, invals

    # --- serving ------------------------------------------------------------

    def _serve_plan(self, uses, planner, traced) -> tuple[Plan, Coverage]:
        decisions = dict(traced.plan.decisions)
        at: dict = {}  # matmul address -> the parameter operands found there
        for us in uses.matmuls.values():
            for u in us:
                at.setdefault(u.addr, []).append(u)
        # Roles as intercept's weights= gives them, with the weights the trace found: a
        # weight gets the config's weight formats wherever it sits, and a matmul of two
        # activations (attention's q.k, p.v) the activation formats.
        notes: dict = {}
        for addr, cfg in list(decisions.items()):
            here = at.get(addr, ())
            if not here:
                acts = cfg.for_activations()
                if acts.is_noop:
                    del decisions[addr]
                else:
                    decisions[addr] = acts
                notes[addr] = ["no weight operand: for_activations"]
            elif all(u.index == 0 for u in here):
                decisions[addr] = _swapped(cfg)
                notes[addr] = ["weight on the left: roles swapped"]
        hooks = {}
        for leaf, us in uses.matmuls.items():
            w = self.plan_weights.get(leaf)
            if w is None:
                continue
            for u in us:
                act = _activation(u)
                if w.rotate and act is None:
                    raise ValueError(
                        f"{leaf} was rotated by quantize_model (Hadamard {w.rotate}), but this "
                        f"call reads it in a {u.op} whose activation cannot be rotated (one "
                        "contraction axis, outside custom_vjp functions and scans, is what is "
                        "rotated); call quantize_model with inputs like these"
                    )
                steps = []
                if w.tied or (u.addr in decisions and u.views):
                    steps.append(functools.partial(_substitute, leaf, u))
                if w.rotate:
                    steps.append(functools.partial(_rotate_activation, *act, w.rotate))
                if steps:
                    hooks[u.addr] = functools.partial(_chain, steps)
                    note = f"PTQ weight {leaf}" + (f", Hadamard {w.rotate}" if w.rotate else "")
                    notes.setdefault(u.addr, []).insert(0, note)
        for leaf, what in uses.others.items():
            w = self.plan_weights.get(leaf)
            if w is not None and w.rotate and not w.tied:
                raise ValueError(
                    f"{leaf} was rotated by quantize_model (Hadamard {w.rotate}) for its matmuls, "
                    f"but this call also reads it in {what[0]}; call quantize_model with inputs "
                    "like these"
                )
        rebuild = frozenset(traced.plan.rebuild) | _ancestors(hooks)
        plan = Plan(decisions, rebuild, traced.plan.vector, hooks)
        sites = []
        for addr, site in zip(planner.addrs, traced.coverage.sites, strict=True):
            if addr in notes:
                note = f" ({'; '.join(notes[addr])})"
                if addr in decisions:
                    cfg = decisions[addr]
                    site = dataclasses.replace(site, config=cfg, reason=cfg.describe() + note)
                elif site.mx:
                    site = dataclasses.replace(site, mx=False, config=None, reason="high" + note)
                else:
                    site = dataclasses.replace(site, reason=site.reason + note)
            sites.append(site)
        return plan, dataclasses.replace(traced.coverage, sites=tuple(sites))


def _ancestors(hooks) -> frozenset:
    return frozenset(a[:k] for a in hooks for k in range(1, len(a)))


def _chain(steps, eqn, invals):
    invals = list(invals)
    for step in steps:
        eqn, invals = step(eqn, invals)
    return eqn, invals


def _rotate_activation(index, axis, size, eqn, invals):
    x = invals[index]
    invals[index] = _hadamard.rotate(x.astype(jnp.float32), axis, size).astype(x.dtype)
    return eqn, invals


def _substitute(leaf, u: MatmulUse, eqn, invals):
    """The matmul reads the quantized weight of ``leaf`` (as this call passed it)."""
    live = _LIVE.get()
    if live is None or leaf not in live:  # not given quantized (coverage_for, a float tree)
        return eqn, invals
    t = live[leaf]
    dtype = eqn.invars[u.index].aval.dtype
    if not isinstance(t, MXTensor):
        invals[u.index] = _bind_views(u.views, jnp.asarray(t))
        return eqn, invals
    if t.dtype != dtype:
        t = dataclasses.replace(t, dtype=dtype)
    if not u.views:
        invals[u.index] = t
        return eqn, invals
    perm = permutation(u.views, t.ndim)
    if perm is not None and u.op == "dot_general":
        folded = _fold(eqn, u.index, perm)
        if folded is not None:  # the transposes go into the dimension numbers
            invals[u.index] = t
            return folded, invals
    if get_family(t.format).rules.array_ops:
        try:
            invals[u.index] = _replay(u.views, t)
            return eqn, invals
        except ValueError:  # a reshape that would split blocks
            pass
    # Decoded: the matmul's rule quantizes the weight's values again.
    invals[u.index] = _bind_views(u.views, dequantize(t))
    return eqn, invals


def _fold(eqn, index, perm):
    """``eqn`` contracting the untransposed weight, when its output is the same."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    wc, wb = (lc, lb) if index == 0 else (rc, rb)
    if wb:
        return None
    free = [perm[d] for d in range(len(perm)) if d not in tuple(wc)]
    if free != sorted(free):
        return None
    new = tuple(perm[d] for d in wc)
    dn = ((new, rc), (lb, rb)) if index == 0 else ((lc, new), (lb, rb))
    return eqn.replace(params={**eqn.params, "dimension_numbers": dn})


def _replay(views, t: MXTensor) -> MXTensor:
    for eqn in views:
        name = eqn.primitive.name
        if name == "transpose":
            t = t.transpose(*eqn.params["permutation"])
        elif name in ("reshape", "squeeze", "expand_dims"):
            t = t.reshape(eqn.outvars[0].aval.shape)
        elif name == "convert_element_type":
            t = dataclasses.replace(t, dtype=np.dtype(eqn.params["new_dtype"]))
    return t


def _bind_views(views, x):
    for eqn in views:
        x = eqn.primitive.bind(x, **eqn.primitive.get_bind_params(eqn.params))
    return x


def _live(params) -> dict:
    """``{leaf path: MXTensor}`` of the quantized weights (tied: their matmul copies)."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_node)[0]:
        if isinstance(x, TiedWeight):
            out[path_string(path)] = x.matmul
        elif isinstance(x, MXTensor):
            out[path_string(path)] = x
    return out


def _float_view(params):
    """The parameters with each TiedWeight replaced by its float value."""
    return jax.tree_util.tree_map(
        lambda x: x.value if isinstance(x, TiedWeight) else x, params, is_leaf=_is_node
    )


# --------------------------------------------------------------------------
# quantize_model.
# --------------------------------------------------------------------------


def quantize_model(
    fn: Callable,
    params,
    calibration: Iterable,
    rules="mxfp4",
    *,
    method: str = "gptq",
    packed: bool = True,
    hadamard_size: int | None = None,
    damp: float = 0.01,
    act_order: bool = False,
    scale_search: bool = False,
    weighted_search: bool = False,
) -> tuple[Callable, object]:
    """Post-training quantization of any JAX function ``fn(params, *inputs)`` in one call.

    1. ``fn`` is traced on the first calibration batch, and
       :func:`jaxmx.intercept`'s planner decides each matmul by ``rules``.
       Every parameter leaf that is an operand of an MX matmul, whole (through
       transposes, reshapes and casts, into ``jit``, ``cond``, ``checkpoint``
       bodies), is a weight; its contraction axis comes from the matmul's
       dimension numbers, its format from the rule (the config's weight
       formats, ``rhs``, wherever the weight sits, as ``intercept``'s
       ``weights=`` gives them; its ``scale_mode`` and block size too). A
       matmul of two activations (attention's q.k and p.v) gets the rule's
       ``config.for_activations()``.
    2. For ``gptq`` (and ``weighted_search``), ``fn`` runs in float over every
       calibration batch and each weight's Hessian ``X^T X`` is summed over
       the activation rows ``X`` of all the matmuls that read it.
    3. ``hadamard_*`` rotates each weight along its contraction axis by the
       block-diagonal Hadamard (:func:`rotate`; the Hessian becomes
       ``R^T H R``), and the serving function rotates the activation of every
       matmul that reads it, inside ``jaxmx.intercept``, so products are
       unchanged before quantization (no model code changes: linen, nnx,
       Equinox and plain functions alike).
    4. Each weight is quantized (:func:`jaxmx.quantize`, :class:`ScaleSearch`
       or :class:`GPTQ`) into an :class:`~jaxmx.MXTensor` blocked along its
       contraction axis, in place in the parameter tree.

    Tied parameters (read by a matmul and by something else, such as an
    embedding table that is also the output head) keep their float value
    for the other reads and get a quantized copy for the matmuls: the leaf
    becomes a :class:`TiedWeight` ``(value, matmul)``. Parameters left float
    (a matmul in high precision, a slice of a stacked weight read by a
    ``lax.scan``, a weight contracted over two axes, ...) are listed with
    the reason in ``serve_fn.report``; where their matmul is MX, it casts
    them at run time as ``jaxmx.intercept`` does.

    Args:
      fn: ``fn(params, *inputs)``: ``model.apply``, a function around an nnx
        or Equinox module, any JAX function.
      params: the parameter pytree (linen variables, an nnx ``State``, an
        Equinox module's arrays, a dict).
      calibration: an iterable of batches, each an input tuple (or one
        array) for ``fn(params, *batch)``. The first traces ``fn``; GPTQ
        collects Hessians over all of them.
      rules: what :func:`jaxmx.intercept` takes (a format or preset name, a
        :class:`~jaxmx.DotConfig`, or ``[(pattern, config), ...]``): which
        matmuls run in MX and in which formats. Weight-only:
        ``DotConfig(rhs="mxfp4")``; ``"mxfp4"`` quantizes activations too.
      method: ``"direct"`` (cast with the rule's scale rule), ``"search"``
        (per-block scale search), ``"gptq"``, or ``"hadamard"``,
        ``"hadamard_search"``, ``"hadamard_gptq"``: the same after the
        rotation.
      packed: pack sub-byte codes (two FP4 codes a byte).
      hadamard_size: Hadamard order (a power of two); None: the weight's
        block size, at most 32. Weights whose contraction length it does not
        divide are not rotated (the report says so).
      damp, act_order: GPTQ's dampening and row order (:class:`GPTQ`).
      scale_search: GPTQ on block scales from a scale search.
      weighted_search: scale search weighted by the Hessian diagonal.

    Returns:
      ``(serve_fn, qparams)``: ``serve_fn(qparams, *inputs)`` runs ``fn``
      with the rules' MX matmuls from the quantized weights (jittable; its
      ``coverage`` says what runs where, ``report`` is the
      :class:`PTQReport`), and ``qparams`` is ``params`` with MXTensor
      weights.

    Raises:
      ValueError: an unknown method, empty calibration, options that do not
        apply to the method.
      TypeError: ``fn`` not callable, calibration not an iterable of batches.

    >>> import jax, jax.numpy as jnp, jaxmx
    >>> def mlp(p, x):
    ...     return jax.nn.relu(x @ p["w1"]) @ p["w2"]
    >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    >>> params = {"w1": jax.random.normal(k1, (64, 128)), "w2": jax.random.normal(k2, (128, 8))}
    >>> calib = [jax.random.normal(k3, (256, 64))]
    >>> serve, q = jaxmx.ptq.quantize_model(mlp, params, calib, jaxmx.DotConfig(rhs="mxfp4"))
    >>> q["w1"].format.name, serve.report.quantized
    ('mxfp4_e2m1', ('w1', 'w2'))
    >>> serve(q, calib[0]).shape
    (256, 8)
    """
    start = time.perf_counter()
    if not callable(fn):
        raise TypeError(
            f"quantize_model takes a callable fn(params, *inputs), got {type(fn).__name__}"
        )
    rotate, base = _check_method(method)
    _check_options(method, base, rotate, hadamard_size, act_order, scale_search, weighted_search)
    if not isinstance(packed, (bool, np.bool_)):
        raise TypeError(f"packed must be True or False, got {packed!r}")
    batches = _check_calibration(calibration)
    rules = parse_rules(rules)

    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_node)[0]
    leaves = {path_string(p): x for p, x in flat}
    traced, _ = _PTQFunction(fn, rules, "plan")._traced((params, *batches[0]), {})
    uses, sites = traced.ptq
    weights, notes = _plan(leaves, uses, sites, traced.plan.decisions, rotate, hadamard_size)

    hessians, ran = {}, 0
    if base == "gptq" or weighted_search:
        targets = {p: w for p, w in weights.items() if all(_activation(u) for u in uses.matmuls[p])}
        if targets:
            hessians, ran = _collect(fn, rules, params, batches, targets), len(batches)

    quantized, results = {}, {}
    for path, w in weights.items():
        t, used, note = _quantize_weight(
            w,
            leaves[path],
            base,
            hessians.get(path),
            uses.matmuls[path],
            packed=packed,
            damp=damp,
            act_order=act_order,
            scale_search=scale_search,
            weighted_search=weighted_search,
        )
        quantized[path] = t
        results[path] = WeightResult(
            path=path,
            shape=tuple(leaves[path].shape),
            action="tied" if w.tied else "quantized",
            method=("hadamard_" if w.rotate else "") + used,
            format=w.fmt.name,
            axis=w.axis,
            hadamard=w.rotate,
            note="; ".join(n for n in (notes.get(path, ""), note) if n),
        )
    for path, why in notes.items():
        if path not in weights:
            results[path] = WeightResult(
                path=path, shape=tuple(np.shape(leaves[path])), action="float", note=why
            )

    def put(path, x):
        t = quantized.get(path_string(path))
        if t is None:
            return x
        return TiedWeight(x, t) if weights[path_string(path)].tied else t

    qparams = jax.tree_util.tree_map_with_path(put, params, is_leaf=_is_node)
    serve_fn = _PTQFunction(fn, rules, "serve", {p: weights[p] for p in quantized})
    order = [p for p in leaves if p in results]
    serve_fn.report = PTQReport(
        method=method,
        batches=ran,
        weights=tuple(results[p] for p in order),
        seconds=time.perf_counter() - start,
    )
    return serve_fn, qparams


def _check_method(method) -> tuple[bool, str]:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(
            f"unknown method {method!r}; allowed: {', '.join(repr(m) for m in METHODS)}"
        )
    rotate = method.startswith("hadamard")
    base = method.removeprefix("hadamard").removeprefix("_") or "direct"
    return rotate, base


def _check_options(method, base, rotate, size, act_order, scale_search, weighted_search):
    for name, value in (
        ("act_order", act_order),
        ("scale_search", scale_search),
        ("weighted_search", weighted_search),
    ):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    if (act_order or scale_search) and base != "gptq":
        raise ValueError(
            f"act_order and scale_search are GPTQ options; method {method!r} takes neither "
            "(use 'gptq' or 'hadamard_gptq')"
        )
    if weighted_search and base != "search":
        raise ValueError(
            f"weighted_search applies to 'search' and 'hadamard_search', not to {method!r}"
        )
    if size is not None:
        if not rotate:
            raise ValueError(f"hadamard_size applies to the 'hadamard*' methods, not to {method!r}")
        _hadamard.check_size(size)


def _check_calibration(calibration) -> list[tuple]:
    if isinstance(calibration, (jax.Array, np.ndarray)):
        raise TypeError(
            "calibration must be an iterable of batches (input tuples or single arrays), "
            f"got one array of shape {tuple(calibration.shape)}: pass [x] for one batch, "
            "or list(x) to take its rows as batches"
        )
    if isinstance(calibration, (str, bytes, dict)) or not isinstance(calibration, Iterable):
        raise TypeError(
            "calibration must be an iterable of batches (input tuples or single arrays) for "
            f"fn(params, *batch), got {type(calibration).__name__}"
        )
    batches = [b if isinstance(b, tuple) else (b,) for b in calibration]
    if not batches:
        raise ValueError(
            "calibration is empty: quantize_model traces fn on its first batch (and GPTQ "
            "collects Hessians over all of them); give at least one batch"
        )
    return batches


def _is_float(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def _plan(leaves, uses, sites, decisions, rotate, size) -> tuple[dict, dict]:
    """``({path: _Weight}, {path: note})``: the weights, and why others stay float."""
    weights, notes = {}, {}
    for path, us in uses.matmuls.items():
        x = leaves.get(path)
        why, keys = None, set()
        if isinstance(x, MXTensor):
            why = "already an MXTensor"
        elif not _is_float(x):
            why = f"a {np.dtype(x.dtype)} parameter (quantize_model takes float weights)"
        for u in us if why is None else ():
            site = sites.get(u.addr)
            where = site.path if site is not None else u.op
            if u.other is not None:
                why = f"{where} multiplies it by another parameter ({u.other})"
            elif u.scanned:
                why = (
                    f"{where} reads one slice of it per lax.scan iteration (stacked layers); "
                    "quantize_model quantizes weights its matmuls read whole"
                )
            elif u.addr not in decisions:
                why = f"{where} runs in high precision" + (
                    f": {site.reason}" if site is not None else ""
                )
            else:
                cfg = decisions[u.addr]  # its weight (rhs) formats, wherever it sits
                fmt, axis = cfg.role("rhs"), _operand_axis(u)
                if fmt is None:
                    why = f"the rule of {where} gives its weight no format"
                elif axis is None:
                    why = f"{where} contracts it over several axes or has it in a batch axis"
                elif (axis := leaf_axis(u.views, axis)) is None:
                    why = f"{where} reads it through a reshape that splits its contraction axis"
                else:
                    block = cfg.block_size if cfg.rhs_block_size is None else cfg.rhs_block_size
                    keys.add((axis, fmt, block, cfg.scale_mode))
            if why is not None:
                break
        if why is None and len(keys) > 1:
            why = "its matmuls read it with different axes, formats, block sizes or scale rules"
        if why is not None:
            if any(u.addr in decisions for u in us):
                why += " (an MX matmul casts it at run time)"
            notes[path] = why
            continue
        ((axis, fmt, block, scale_mode),) = keys
        rot = None
        if rotate:
            n = leaves[path].shape[axis]
            order = size
            if order is None:
                b = block if block is not None else fmt.block_size
                order = min(32, b) if isinstance(b, int) else None
            if order is None or not all(_activation(u) for u in us):
                notes[path] = "not rotated: a matmul reading it has no activation to rotate"
            elif n % order:
                notes[path] = (
                    f"not rotated: its contraction length {n} is not a multiple of {order}"
                )
            else:
                rot = order
        weights[path] = _Weight(
            path, axis, fmt, block, scale_mode, tied=path in uses.others, rotate=rot
        )
    for path, x in leaves.items():
        if path in uses.matmuls or np.ndim(x) < 2 or isinstance(x, TiedWeight):
            continue
        others = sorted(set(uses.others.get(path, ())))
        notes[path] = f"read by no matmul ({', '.join(others)})" if others else "read by no matmul"
    return weights, notes


def _collect(fn, rules, params, batches, targets) -> dict:
    """``{path: X^T X}`` (float64) over the calibration batches, the function in float."""
    collector = _PTQFunction(fn, rules, "collect", targets)
    run = jax.jit(collector)
    for batch in batches:
        jax.block_until_ready(run(params, *batch))
    jax.effects_barrier()
    return dict(collector.sums)


def _rotate_hessian(h: np.ndarray, size: int) -> np.ndarray:
    """``R^T H R`` for the block-diagonal Hadamard ``R`` of order ``size`` (float64)."""
    n = h.shape[0]
    r = np.sign(_hadamard.hadamard(size)).astype(np.float64) / np.sqrt(size)
    blocks = np.asarray(h, np.float64).reshape(n // size, size, n // size, size)
    return np.einsum("ij,aibk,kl->ajbl", r, blocks, r).reshape(n, n)


def _quantize_weight(
    w: _Weight,
    x,
    base: str,
    hessian,
    uses,
    *,
    packed,
    damp,
    act_order,
    scale_search,
    weighted_search,
) -> tuple[MXTensor, str, str]:
    """``(MXTensor, method used, note)`` for one weight."""
    xf = jnp.asarray(x, jnp.float32)
    if w.rotate:
        xf = _hadamard_rotate(xf, w.axis, w.rotate)
    used, note = base, ""
    searchable = get_family(w.fmt).searchable
    if base != "direct" and not searchable:
        used, note = "direct", f"{w.fmt.name} has no scale search: direct cast"
    elif base == "gptq" and hessian is None:
        used = "search" if scale_search else "direct"
        reached = all(_activation(u) for u in uses)
        note = (
            f"no calibration batch reached its matmuls: {used}"
            if reached
            else f"a {uses[0].op} reading it has no input Hessian: {used}"
        )
    elif weighted_search and hessian is None:
        note = "no calibration batch reached its matmuls: unweighted search"
    if hessian is not None and w.rotate:
        hessian = _rotate_hessian(hessian, w.rotate)
    pack = bool(packed) and w.fmt.element.bits < 8
    kw = dict(axis=w.axis, block_size=w.block_size, packed=pack)
    if used == "gptq":
        search = ScaleSearch(scale_mode=w.scale_mode) if scale_search else None
        method = GPTQ(
            hessians={w.path: hessian},
            damp=damp,
            scale_mode=w.scale_mode,
            search=search,
            act_order=act_order,
        )
        t = method.quantize_weight(w.path, xf, w.fmt, **kw)
    elif used == "search":
        h = {w.path: hessian} if weighted_search and hessian is not None else None
        t = ScaleSearch(scale_mode=w.scale_mode, hessians=h).quantize_weight(
            w.path, xf, w.fmt, **kw
        )
    else:
        t = quantize(xf, w.fmt, scale_mode=w.scale_mode, **kw)
    if t.dtype != x.dtype:
        t = dataclasses.replace(t, dtype=np.dtype(x.dtype))
    return t, used, note


@functools.partial(jax.jit, static_argnums=(1, 2))
def _hadamard_rotate(x, axis, size):
    return _hadamard.rotate(x, axis, size)
