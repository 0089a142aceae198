"""The serving function of quantize_model: an intercepted function whose matmuls read
the quantized copies of their weights, with activations rotated where the weights were."""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np

from jaxmx import _hadamard
from jaxmx._intercept.coverage import Coverage
from jaxmx._intercept.prims import P
from jaxmx._intercept.run import Plan
from jaxmx._paths import path_string
from jaxmx.formats import MXFormat, get_family
from jaxmx.intercept import Intercepted
from jaxmx.ptq._hessians import gram
from jaxmx.ptq._model_report import PTQReport, TiedWeight
from jaxmx.ptq._uses import MatmulUse, permutation, weight_uses
from jaxmx.quantize import dequantize
from jaxmx.tensor import MXTensor

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


# The quantized weights of the call being traced: {leaf path: MXTensor}.
_LIVE: contextvars.ContextVar = contextvars.ContextVar("jaxmx_ptq_live", default=None)
# The Gram matrices the collecting call being traced returns: {(weights, address): X^T X}.
_GRAMS: contextvars.ContextVar = contextvars.ContextVar("jaxmx_ptq_grams", default=None)
# Control flow whose bodies the interpreter runs in the caller's trace (inlined).
_INLINED = (P.jit_p, P.closed_call_p, P.call_p)


def _is_node(x) -> bool:
    return isinstance(x, (MXTensor, TiedWeight))


def _param_path(path) -> str | None:
    """The leaf path of a leaf of intercept's ``(fn, args, kwargs)`` when it is in ``args[0]``."""
    if len(path) >= 2 and getattr(path[0], "idx", None) == 1 and getattr(path[1], "idx", -1) == 0:
        return path_string(path[2:])
    return None


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
    activations of rotated weights rotated). ``hessians`` runs "collect".
    """

    def __init__(self, fn, rules, mode: str, weights: dict | None = None):
        super().__init__(fn, rules, "keep", None, None, False, ("", 0, "jaxmx.ptq"))
        self.mode = mode
        self.plan_weights: dict[str, _Weight] = dict(weights or {})
        self.report: PTQReport | None = None
        self.sums: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        name = getattr(self.fn, "__name__", type(self.fn).__name__)
        n = len(self.plan_weights)
        return (
            f"quantize_model({name!r}: {n} weights in MX, rules={[r.pattern for r in self.rules]})"
        )

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
        planner = traced.planner
        srcs = [_param_path(path) for (path, _), m in zip(flat, mask, strict=True) if m]
        uses = weight_uses(traced.closed, srcs, planner)
        sites = {a: s for a, s in zip(planner.addrs, planner.sites, strict=True) if a is not None}
        traced.ptq = (uses, sites)
        if self.mode == "collect":
            traced.plan = self._collect_plan(uses, traced.closed.jaxpr)
        elif self.mode == "serve":
            traced.plan, traced.coverage = self._serve_plan(uses, planner, traced)
        return traced

    # --- collection ---------------------------------------------------------

    def hessians(self, params, batches) -> dict:
        """``{path: X^T X}`` (float64) over ``batches``, ``fn`` in float (mode "collect")."""

        @jax.jit
        def grams(params, *batch):
            out: dict = {}
            token = _GRAMS.set(out)
            try:
                self(params, *batch)  # its hooks put the Grams in out
            finally:
                _GRAMS.reset(token)
            return out

        for batch in batches:
            for (leaves, _), g in jax.device_get(grams(params, *batch)).items():
                self._add(leaves, g)
        jax.effects_barrier()  # the Grams sent by callbacks
        return dict(self.sums)

    def _add(self, leaves, g):
        g = np.asarray(g, np.float64)
        with self._lock:
            for leaf in leaves:
                self.sums[leaf] = self.sums.get(leaf, 0.0) + g

    def _collect_plan(self, uses, jaxpr) -> Plan:
        # One Gram per activation (a variable of one body, contracted along one axis),
        # credited to every weight whose matmul reads it (q, k and v share one); computed
        # before the first of those matmuls.
        readers: dict = {}
        for leaf, us in uses.matmuls.items():
            if leaf not in self.plan_weights:
                continue
            for u in us:
                act = _activation(u)
                if act is not None:
                    index, axis = act
                    key = (u.addr[:-1], u.eqn.invars[index], axis)
                    readers.setdefault(key, []).append((u.addr[-1], index, leaf))
        hooks = {}
        for (body, _, axis), rs in readers.items():
            i, index, _ = min(rs)
            addr = (*body, i)
            where = None if _apart(jaxpr, addr) else "/".join(map(str, addr))
            leaves = tuple(leaf for _, _, leaf in rs)
            hooks[addr] = functools.partial(self._record, leaves, index, axis, where)
        return Plan({}, _ancestors(hooks), None, hooks)

    def _record(self, leaves, index, axis, where, eqn, invals):
        g = gram(invals[index], axis)
        if where is None:  # in a body traced apart (a loop, a branch): sent each time it runs
            jax.debug.callback(functools.partial(self._add, leaves), g)
        else:  # run once a call: an output of the collecting call
            _GRAMS.get()[leaves, where] = g
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
                decisions[addr] = cfg.swapped()
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


def _apart(jaxpr, addr) -> bool:
    """Whether the equation at ``addr`` is in a body the interpreter traces apart
    (a scan's, a while's, a cond's, a checkpoint's, a shard_map's): it may run
    any number of times a call. jit and call bodies run inlined."""
    for i, key in zip(addr[0::2], addr[1::2], strict=False):
        eqn = jaxpr.eqns[i]
        if eqn.primitive not in _INLINED:
            return True
        sub = eqn.params[key]
        jaxpr = sub.jaxpr if hasattr(sub, "consts") else sub
    return False


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
