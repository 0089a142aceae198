"""MX for every matmul a function runs: a jaxpr-level function transformation.

:func:`intercept` turns ``fn`` into a function that computes the same thing
with its ``dot_general`` and ``conv_general_dilated`` operations replaced by
:func:`jaxmx.dot_general` / :func:`jaxmx.conv_general_dilated`, wherever they
come from: Flax or Equinox layers, ``jnp.einsum`` / ``@`` in a third-party
attention function, a ``lax.scan`` over layers, a ``jax.checkpoint``. It
uses public JAX APIs only: ``jax.make_jaxpr`` traces ``fn`` (once per input
structure and shapes), and an interpreter re-emits the jaxpr equation by
equation, rebuilding control flow with ``lax.scan`` / ``lax.while_loop`` /
``lax.switch`` / ``jax.checkpoint`` / ``jax.shard_map`` around interpreted
bodies. The result is an ordinary JAX function: ``jit``, ``grad`` (the MX
matmuls' own ``custom_vjp`` gives the MX paper's backward pass) and
``vmap`` compose with it.

Which config a matmul gets is decided by rules, ``[(pattern, config), ...]``:
the first regular expression found (``re.search``) in the matmul's *path*
or in the *argument path* of one of its operands decides. The path is the
JAX name stack of the operation plus the op name, e.g.
``"Model/block_0/attn/q/dot_general"`` (linen pushes module names as named
scopes), ``"myattn/bhqd,bhkd->bhqk/dot_general"`` (a ``jax.named_call`` and a
``jnp.einsum`` spec) or just ``"dot_general"``. An operand's argument path
is where it comes from among ``fn``'s inputs when it is one of them or a
view of one (reshaped, transposed, cast, sliced, a scanned-over slice):
``"params/block_0/attn/q/kernel"`` for linen variables,
``"attn/q/kernel/value"`` for an nnx module, ``"layers/0/weight"`` for an
Equinox model. That is how layers of frameworks that push no names (nnx)
get module paths.

What stays in high precision, and is reported as such: matmuls no rule
matches or whose rule says ``None``; integer, float64 and complex matmuls;
grouped-batch convolutions (``batch_group_count > 1``); ``ragged_dot``;
matmuls inside a ``custom_jvp`` / ``custom_vjp`` function (the function
defines its own derivative; ``custom_derivatives="inline"`` quantizes them
and differentiates through the MX matmuls instead) and inside primitives
the interpreter does not rebuild (``pallas_call``, ``custom_linear_solve``,
...). Matmuls that are already jaxmx ops are left alone and counted as MX.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Literal, NamedTuple

import jax
import numpy as np
from jax import lax
from jax.extend import core as jcore
from jax.extend import source_info_util as siu

from jaxmx.config import DotConfig
from jaxmx.conv import conv_general_dilated as _mx_conv_general_dilated
from jaxmx.dot import dot_general as _mx_dot_general
from jaxmx.quantize import dequantize
from jaxmx.rules import Rule, parse_rules
from jaxmx.tensor import MXTensor

__all__ = ["Coverage", "MatmulSite", "intercept"]

_P = jcore.primitives
_DOT = _P.dot_general_p
_CONV = _P.conv_general_dilated_p
# Matmul primitives jaxmx has no MX version of: reported, never replaced.
_OTHER_MATMULS = frozenset({"ragged_dot_general", "ragged_dot"})
# Ops whose output is a view of their first operand's values (for argument
# paths: a weight reshaped, transposed, cast or sliced is still that weight).
_VIEWS = frozenset(
    {
        "reshape",
        "transpose",
        "convert_element_type",
        "squeeze",
        "expand_dims",
        "broadcast_in_dim",
        "slice",
        "dynamic_slice",
        "gather",
        "copy",
        "copy_p",
        "reduce_precision",
        "sharding_constraint",
    }
)
# Ops whose i-th output is their i-th operand, moved or fenced.
_IDENTITIES = frozenset({"device_put", "optimization_barrier"})
_JAXMX_DIR = os.path.dirname(os.path.abspath(__file__))
_JAXMX_OPS = {"_mx_dot": "dot_general", "_mx_conv": "conv_general_dilated"}


# --------------------------------------------------------------------------
# Rules.
# --------------------------------------------------------------------------


# Rules are the core's (jaxmx.rules), shared with jaxmx.flax.quantize_model.


# --------------------------------------------------------------------------
# The coverage record.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MatmulSite:
    """One matmul of the traced program and what runs there.

    A matmul inside a loop body is one site however many times it runs.

    >>> import jax, jax.numpy as jnp
    >>> from jaxmx.intercept import intercept
    >>> f = intercept(lambda p, x: jnp.int32(2) * (x @ p["w"]), "mxfp8")
    >>> (site,) = f.coverage_for({"w": jnp.ones((32, 4))}, jnp.ones((2, 32))).sites
    >>> site.path, site.operands, site.shapes, site.mx
    ('dot_general', ('', 'w'), ((2, 32), (32, 4)), True)
    """

    # Name stack of the operation plus the op: "Model/attn/q/dot_general".
    path: str
    # "dot_general", "conv_general_dilated", or another matmul primitive.
    op: str
    # Argument path of each operand that is (a view of) an input of fn:
    # ("", "params/attn/q/kernel"); "" where it is computed or unnamed.
    operands: tuple[str, str]
    # Operand shapes and dtypes (per example under vmap).
    shapes: tuple[tuple[int, ...], tuple[int, ...]]
    dtypes: tuple[str, str]
    # Higher-order operations around it, outermost first: "scan(length=4)/checkpoint".
    within: str
    # True when the matmul runs in MX.
    mx: bool
    # The config it runs with; None for high precision and for jaxmx ops
    # that were already in fn (they keep their own config).
    config: DotConfig | None
    # The deciding rule's pattern, or None.
    rule: str | None
    # Why: the config, "jaxmx op in the function", or "high precision (...)".
    reason: str

    @property
    def operand_paths(self) -> str:
        """The non-empty operand argument paths, for display."""
        return ", ".join(o for o in self.operands if o)

    def describe(self, width: int = 0) -> str:
        """One line: MX or high, path, operand paths, shapes, reason, surrounding ops."""
        shapes = " x ".join(str(tuple(s)) for s in self.shapes)
        src = f" <- {self.operand_paths}" if self.operand_paths else ""
        where = f"  [in {self.within}]" if self.within else ""
        head = f"{'MX  ' if self.mx else 'high'}  {self.path + src:<{width}}"
        return f"{head}  {shapes}  {self.reason}{where}"


@dataclasses.dataclass(frozen=True)
class Coverage:
    """Which matmuls of one traced program run in MX, and which do not.

    Attributes:
      rules: ``(pattern, config)`` pairs in priority order (configs resolved).
      sites: every matmul of the program, in program order.
      unmatched: patterns of the rules that decided no matmul (shadowed
        rules included).

    >>> import jax, jax.numpy as jnp
    >>> from jaxmx.intercept import intercept
    >>> def f(x, w):
    ...     with jax.named_scope("proj"):
    ...         y = x @ w
    ...     return y, jnp.arange(3) @ jnp.arange(3)  # an integer dot
    >>> mx_f = intercept(f, [("proj", "mxfp6"), ("never", None)], warn=False)
    >>> cov = mx_f.coverage_for(jnp.ones((2, 32)), jnp.ones((32, 4)))
    >>> cov.counts, cov.unmatched
    ('1 of 2 matmuls in MX', ('never',))
    >>> print(cov.summary())
    1 of 2 matmuls in MX
      MX    proj/dot_general  (2, 32) x (32, 4)  fwd mxfp6_e3m2 x mxfp6_e3m2; ...
      high  dot_general  (3,) x (3,)  high (no rule matched)
      rule 'never' matched no matmul
    """

    rules: tuple[tuple[str, DotConfig | None], ...]
    sites: tuple[MatmulSite, ...]
    unmatched: tuple[str, ...]

    @property
    def in_mx(self) -> tuple[MatmulSite, ...]:
        return tuple(s for s in self.sites if s.mx)

    @property
    def high_precision(self) -> tuple[MatmulSite, ...]:
        return tuple(s for s in self.sites if not s.mx)

    @property
    def counts(self) -> str:
        """``"N of M matmuls in MX"``."""
        return f"{len(self.in_mx)} of {len(self.sites)} matmuls in MX"

    def summary(self) -> str:
        """A table: one line per matmul site, then the rules that matched nothing."""
        lines = [self.counts]
        width = max((len(s.path) + len(s.operand_paths) + 4 for s in self.sites), default=0)
        lines += [f"  {s.describe(width)}" for s in self.sites]
        lines += [f"  rule {p!r} matched no matmul" for p in self.unmatched]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


# --------------------------------------------------------------------------
# Planning: walk the jaxpr once, decide every matmul, record the sites.
# --------------------------------------------------------------------------


def _func_info(closed) -> tuple[str, str]:
    info = getattr(closed.jaxpr, "debug_info", None)
    return (getattr(info, "func_name", None) or "?", getattr(info, "func_filename", None) or "")


def _jaxmx_op(eqn) -> str | None:
    """For a custom_vjp / custom_jvp function defined in jaxmx: its op name
    (``"dot_general"``, ``"conv_general_dilated"``, or ``""`` for one that is
    no matmul); None for any other equation."""
    if eqn.primitive not in (_P.custom_vjp_call_p, _P.custom_jvp_call_p):
        return None
    name, filename = _func_info(eqn.params["call_jaxpr"])
    if filename and os.path.abspath(filename).startswith(_JAXMX_DIR + os.sep):
        return _JAXMX_OPS.get(name, "")
    return None


def _dtype_reason(dtypes) -> str | None:
    for dt in dtypes:
        dt = np.dtype(dt)
        # jnp.issubdtype knows ml_dtypes' bfloat16 is a float; np.issubdtype does not.
        if not jax.numpy.issubdtype(dt, jax.numpy.floating) or dt == np.float64:
            kind = "float64" if dt == np.float64 else str(dt)
            return f"{kind} operands (jaxmx takes float32, bfloat16 and float16)"
    return None


class _Planner:
    """Decides each matmul and records where the interpreter must rebuild."""

    def __init__(self, rules: tuple[Rule, ...], custom_derivatives: str, weights, path_root):
        self.rules = rules
        self.custom_derivatives = custom_derivatives
        self.weights = weights  # compiled regex or None
        self.path_root = path_root  # name-stack prefix to drop, or None
        self.sites: list[MatmulSite] = []
        self.decisions: dict[tuple, DotConfig] = {}  # eqn address -> config
        self.rebuild: set[tuple] = set()  # addresses of eqns with MX inside
        self.hits: collections.Counter = collections.Counter()
        self.mx_args: dict[str, str] = {}  # argument path -> format of an MXTensor argument

    def _path(self, ns, op: str) -> str:
        scope = str(ns)
        if self.path_root is not None:
            if scope == self.path_root:
                scope = ""
            elif scope.startswith(self.path_root + "/"):
                scope = scope[len(self.path_root) + 1 :]
        return f"{scope}/{op}" if scope else op

    def _decide(self, path: str, operands) -> tuple[Rule | None, int]:
        # The path, its scope alone (so a module rule such as "^head$" decides
        # the matmuls inside that module), or an operand's argument path.
        scope = path.rpartition("/")[0]
        for i, rule in enumerate(self.rules):
            if (
                rule.matches(path)
                or (scope and rule.matches(scope))
                or any(o and rule.matches(o) for o in operands)
            ):
                return rule, i
        return None, -1

    def _roles(self, cfg: DotConfig, op: str, operands) -> tuple[DotConfig, str]:
        """The config with its weight formats on the weight operand (``weights=``)."""
        if self.weights is None or op != "dot_general":
            return cfg, ""
        lw, rw = (bool(o and self.weights.search(o)) for o in operands)
        if not lw and not rw:
            return cfg.for_activations(), " (no weight operand: for_activations)"
        if lw and not rw:
            swapped = cfg.replace(
                lhs=cfg.role("rhs"),
                rhs=cfg.role("lhs"),
                lhs_bwd=cfg.role("rhs_bwd"),
                rhs_bwd=cfg.role("lhs_bwd"),
            )
            return swapped, " (weight on the left: roles swapped)"
        return cfg, ""

    def _site(self, eqn, path, op, operands, within, blocked, addr):
        avals = [v.aval for v in eqn.invars[:2]]
        shapes = tuple(tuple(a.shape) for a in avals)
        dtypes = tuple(str(a.dtype) for a in avals)
        base = dict(path=path, op=op, operands=operands, shapes=shapes, dtypes=dtypes)
        base["within"] = "/".join(within)
        rule, index = self._decide(path, operands)
        if rule is not None:
            self.hits[index] += 1
        pattern = None if rule is None else rule.pattern

        def high(why):
            return MatmulSite(**base, mx=False, config=None, rule=pattern, reason=f"high ({why})")

        if rule is None:
            return self.sites.append(high("no rule matched"))
        if rule.config is None or rule.config.is_noop:
            return self.sites.append(high(f"rule {pattern!r} says high precision"))
        if op not in ("dot_general", "conv_general_dilated"):
            return self.sites.append(high(f"{op}: jaxmx has no MX version"))
        why = _dtype_reason(dtypes)
        if why is None and op == "conv_general_dilated" and eqn.params["batch_group_count"] != 1:
            why = "batch_group_count > 1"
        if why is None and blocked is not None:
            why = blocked
        if why is not None:
            return self.sites.append(high(why))
        cfg, note = self._roles(rule.config, op, operands)
        pre = [
            f"{side} {self.mx_args[o]}"
            for side, o in zip(("lhs", "rhs"), operands, strict=True)
            if o in self.mx_args
        ]
        if pre:
            note += f" (MXTensor {', '.join(pre)}: used as is if blocked along the contraction)"
        self.sites.append(
            MatmulSite(**base, mx=True, config=cfg, rule=pattern, reason=cfg.describe() + note)
        )
        self.decisions[addr] = cfg
        for k in range(1, len(addr)):
            self.rebuild.add(addr[:k])

    def walk(self, jaxpr, srcs, prefix, addr=(), within=(), blocked=None):
        """Plans ``jaxpr`` (open) whose constvars + invars have argument paths ``srcs``.

        ``blocked``: why matmuls here cannot be replaced (inside a primitive
        the interpreter does not rebuild), or None.
        """
        env = dict(zip([*jaxpr.constvars, *jaxpr.invars], srcs, strict=True))

        def src(v):
            return "" if isinstance(v, jcore.Literal) else env.get(v, "")

        for i, eqn in enumerate(jaxpr.eqns):
            a = addr + (i,)
            ns = prefix + eqn.source_info.name_stack
            name = eqn.primitive.name
            ins = [src(v) for v in eqn.invars]
            if eqn.primitive in (_DOT, _CONV) or name in _OTHER_MATMULS:
                self._site(eqn, self._path(ns, name), name, tuple(ins[:2]), within, blocked, a)
            elif (op := _jaxmx_op(eqn)) is not None:
                if op:  # jaxmx's own MX matmul: counted, never entered
                    self._jaxmx_site(eqn, ns, op, ins, within)
            else:
                for c in self._children(eqn, ns, ins):
                    self.walk(
                        c.jaxpr,
                        c.srcs,
                        c.prefix,
                        a + (c.key,),
                        within + (c.tag,),
                        blocked or c.blocked,
                    )
            if name in _VIEWS and eqn.invars:
                env[eqn.outvars[0]] = ins[0]
            elif name in _IDENTITIES:
                env.update(zip(eqn.outvars, ins, strict=False))

    def _jaxmx_site(self, eqn, ns, op, ins, within):
        closed = eqn.params["call_jaxpr"]
        n = eqn.params.get("num_consts", 0)
        avals = [v.aval for v in closed.jaxpr.invars[n : n + 2]]
        self.sites.append(
            MatmulSite(
                path=self._path(ns, op),
                op=op,
                operands=tuple(ins[n : n + 2]),
                shapes=tuple(tuple(a.shape) for a in avals),
                dtypes=tuple(str(a.dtype) for a in avals),
                within="/".join(within),
                mx=True,
                config=None,
                rule=None,
                reason="jaxmx op in the function (its own config)",
            )
        )

    def _children(self, eqn, ns, ins) -> Iterable[_Child]:
        """The sub-jaxprs of ``eqn``, with their operands' argument paths."""
        p, prim = eqn.params, eqn.primitive
        if prim is _P.jit_p:
            name = p["name"]
            yield _Child("jaxpr", *_open(p["jaxpr"], ins), ns.extend(name), f"jit({name})")
        elif prim in (_P.closed_call_p, _P.call_p):
            yield _Child("call_jaxpr", *_open(p["call_jaxpr"], ins), ns, prim.name)
        elif prim is _P.remat_p:
            yield _Child("jaxpr", *_open(p["jaxpr"], ins), ns, "checkpoint")
        elif prim is _P.scan_p:
            nc, ncarry = p["num_consts"], p["num_carry"]
            # A scanned-over slice of a weight is still that weight; a carry is not.
            srcs = ins[:nc] + [""] * ncarry + ins[nc + ncarry :]
            yield _Child("jaxpr", *_open(p["jaxpr"], srcs), ns, f"scan(length={p['length']})")
        elif prim is _P.while_p:
            cn, bn = p["cond_nconsts"], p["body_nconsts"]
            carry = [""] * (len(ins) - cn - bn)
            yield _Child("cond_jaxpr", *_open(p["cond_jaxpr"], ins[:cn] + carry), ns, "while")
            body_srcs = ins[cn : cn + bn] + carry
            yield _Child("body_jaxpr", *_open(p["body_jaxpr"], body_srcs), ns, "while")
        elif prim is _P.cond_p:
            for b, closed in enumerate(p["branches"]):
                yield _Child(("branches", b), *_open(closed, ins[1:]), ns, f"cond[{b}]")
        elif prim.name == "shard_map":
            yield _Child("jaxpr", *_open(p["jaxpr"], ins), ns, "shard_map")
        elif prim in (_P.custom_jvp_call_p, _P.custom_vjp_call_p):
            kind = prim.name.removesuffix("_call")
            fname = _func_info(p["call_jaxpr"])[0]
            why = None
            if self.custom_derivatives == "keep":
                why = f"inside {kind} function {fname!r}, which defines its own derivative"
            yield _Child("call_jaxpr", *_open(p["call_jaxpr"], ins), ns, f"{kind}({fname})", why)
        else:
            for j, sub in enumerate(jcore.jaxprs_in_params(p)):
                srcs = [""] * (len(sub.constvars) + len(sub.invars))
                yield _Child(("other", j), sub, srcs, ns, prim.name, f"inside {prim.name}")


class _Child(NamedTuple):
    """A sub-jaxpr to plan."""

    key: Any  # its address component under the eqn
    jaxpr: Any  # open jaxpr
    srcs: list[str]  # argument paths of its constvars + invars
    prefix: Any  # name stack around it
    tag: str  # how it shows in MatmulSite.within
    blocked: str | None = None  # why its matmuls cannot be replaced


def _open(jaxpr, srcs) -> tuple[Any, list[str]]:
    """An open jaxpr and the argument paths of its constvars + invars."""
    if hasattr(jaxpr, "consts"):  # closed
        return jaxpr.jaxpr, [""] * len(jaxpr.consts) + list(srcs)
    return jaxpr, list(srcs)


# --------------------------------------------------------------------------
# Running: an interpreter that re-emits the jaxpr with MX matmuls.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Plan:
    decisions: dict
    rebuild: frozenset


def _run(jaxpr, consts, args, addr: tuple, plan: _Plan) -> list:
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, x in zip([*jaxpr.constvars, *jaxpr.invars], [*consts, *args], strict=True):
        env[v] = x
    for i, eqn in enumerate(jaxpr.eqns):
        a = addr + (i,)
        invals = [read(v) for v in eqn.invars]
        name_stack = siu.current_name_stack() + eqn.source_info.name_stack
        with siu.user_context(eqn.source_info.traceback, name_stack=name_stack), eqn.ctx.manager:
            if a in plan.decisions:
                outs = [_mx_op(eqn, invals, plan.decisions[a])]
            elif a in plan.rebuild and _kind(eqn) != "shard_map":
                outs = _REBUILD[_kind(eqn)](eqn, invals, a, plan)  # MXTensors flow in as pytrees
            elif (cast := _mx_cast(eqn, invals)) is not None:
                outs = [cast]
            else:
                invals = [_decoded(x, v) for x, v in zip(invals, eqn.invars, strict=True)]
                if a in plan.rebuild:
                    outs = _REBUILD[_kind(eqn)](eqn, invals, a, plan)
                else:
                    outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
                if not eqn.primitive.multiple_results:
                    outs = [outs]
        for v, x in zip(eqn.outvars, outs, strict=True):
            env[v] = x
    return [_decoded(read(v), v) for v in jaxpr.outvars]


def _decoded(x, v):
    """An MXTensor argument decoded for an op that needs its values."""
    return dequantize(x, v.aval.dtype) if isinstance(x, MXTensor) else x


def _mx_cast(eqn, invals) -> MXTensor | None:
    """A float cast of an MXTensor argument (a layer's ``dtype``) stays an
    MXTensor that decodes to the new dtype: decoding to it directly rounds
    the same way as decoding then casting."""
    if eqn.primitive.name != "convert_element_type" or not isinstance(invals[0], MXTensor):
        return None
    new = np.dtype(eqn.params["new_dtype"])
    if new not in (np.dtype(np.float32), np.dtype(jax.numpy.bfloat16), np.dtype(np.float16)):
        return None
    return dataclasses.replace(invals[0], dtype=new)


def _contracted_or_decoded(x, v, contracting):
    """An MXTensor operand goes in as it is when its blocks run along one of
    the axes this matmul contracts; otherwise it is decoded and the rule's
    config quantizes it like any array."""
    if isinstance(x, MXTensor) and x.block_axis() + x.ndim not in contracting:
        return dequantize(x, v.aval.dtype)
    return x


def _mx_op(eqn, invals, config: DotConfig):
    p = eqn.params
    if eqn.primitive is _DOT:
        (lc, rc), _ = p["dimension_numbers"]
        contracting = (lc, rc)
    else:
        dn = p["dimension_numbers"]
        contracting = ((dn.lhs_spec[1],), (dn.rhs_spec[1],))
    lhs, rhs = (
        _contracted_or_decoded(x, v, c)
        for x, v, c in zip(invals, eqn.invars[:2], contracting, strict=True)
    )
    if eqn.primitive is _DOT:
        out = _mx_dot_general(
            lhs,
            rhs,
            p["dimension_numbers"],
            p["precision"],
            p["preferred_element_type"],
            config=config,
            out_sharding=p.get("out_sharding"),
        )
    else:
        out = _mx_conv_general_dilated(
            lhs,
            rhs,
            p["window_strides"],
            p["padding"],
            p["lhs_dilation"],
            p["rhs_dilation"],
            p["dimension_numbers"],
            p["feature_group_count"],
            p["batch_group_count"],
            p["precision"],
            p["preferred_element_type"],
            config=config,
            out_sharding=p.get("out_sharding"),
        )
    want = eqn.outvars[0].aval.dtype
    return out if out.dtype == want else out.astype(want)


def _kind(eqn) -> str:
    if eqn.primitive.name == "shard_map":
        return "shard_map"
    return eqn.primitive.name


def _closed(c):
    return (c.jaxpr, c.consts) if hasattr(c, "consts") else (c, ())


def _rebuild_jit(eqn, invals, a, plan):
    p = eqn.params
    invals = _constrain(invals, p["in_shardings"])
    with siu.extend_name_stack(p["name"]):
        outs = _run(p["jaxpr"].jaxpr, p["jaxpr"].consts, invals, a + ("jaxpr",), plan)
    return _constrain(outs, p["out_shardings"])


def _constrain(xs, shardings):
    # A jit boundary is inlined; its explicit shardings become sharding
    # constraints (Auto mesh axes) or transfers (Explicit axes, where the
    # sharding is part of the type).
    return [_constrain_one(x, s) for x, s in zip(xs, shardings, strict=True)]


def _constrain_one(x, s):
    if not isinstance(s, jax.sharding.Sharding) or isinstance(x, MXTensor):  # unspecified
        return x
    if jax.sharding.AxisType.Explicit in tuple(getattr(getattr(s, "mesh", None), "axis_types", ())):
        return jax.device_put(x, s)  # what jit does with such an input: a transfer
    return lax.with_sharding_constraint(x, s)


def _rebuild_call(eqn, invals, a, plan):
    jaxpr, consts = _closed(eqn.params["call_jaxpr"])
    return _run(jaxpr, consts, invals, a + ("call_jaxpr",), plan)


def _rebuild_remat(eqn, invals, a, plan):
    p = eqn.params
    body = lambda *xs: _run(p["jaxpr"], (), xs, a + ("jaxpr",), plan)  # noqa: E731
    return list(jax.checkpoint(body, prevent_cse=p["prevent_cse"], policy=p["policy"])(*invals))


def _rebuild_scan(eqn, invals, a, plan):
    p = eqn.params
    nc, ncarry, closed = p["num_consts"], p["num_carry"], p["jaxpr"]
    consts, init, xs = invals[:nc], invals[nc : nc + ncarry], invals[nc + ncarry :]

    def body(carry, x):
        outs = _run(closed.jaxpr, closed.consts, [*consts, *carry, *x], a + ("jaxpr",), plan)
        return outs[:ncarry], outs[ncarry:]

    carry, ys = lax.scan(
        body,
        list(init),
        list(xs),
        length=p["length"],
        reverse=p["reverse"],
        unroll=p["unroll"],
    )
    return [*carry, *ys]


def _rebuild_while(eqn, invals, a, plan):
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, init = invals[:cn], invals[cn : cn + bn], invals[cn + bn :]
    cj, bj = p["cond_jaxpr"], p["body_jaxpr"]

    def cond_fun(carry):
        return _run(cj.jaxpr, cj.consts, [*cconsts, *carry], a + ("cond_jaxpr",), plan)[0]

    def body_fun(carry):
        return _run(bj.jaxpr, bj.consts, [*bconsts, *carry], a + ("body_jaxpr",), plan)

    return list(lax.while_loop(cond_fun, body_fun, list(init)))


def _rebuild_cond(eqn, invals, a, plan):
    index, *ops = invals

    def branch(b, closed):
        return lambda *xs: _run(closed.jaxpr, closed.consts, xs, a + (("branches", b),), plan)

    branches = [branch(b, c) for b, c in enumerate(eqn.params["branches"])]
    return list(lax.switch(index, branches, *ops))


def _rebuild_shard_map(eqn, invals, a, plan):
    p = eqn.params
    body = lambda *xs: tuple(_run(p["jaxpr"], (), xs, a + ("jaxpr",), plan))  # noqa: E731
    mapped = jax.shard_map(
        body,
        mesh=p["mesh"],
        in_specs=tuple(p["in_specs"]),
        out_specs=tuple(p["out_specs"]),
        axis_names=set(p.get("newly_manual_axes", p.get("manual_axes", ()))),
        check_vma=p["check_vma"],
    )
    return list(mapped(*invals))


_REBUILD: dict[str, Callable] = {
    "jit": _rebuild_jit,
    "closed_call": _rebuild_call,
    "call": _rebuild_call,
    # custom_derivatives="inline": the primal function, MX inside, no custom rule.
    "custom_jvp_call": _rebuild_call,
    "custom_vjp_call": _rebuild_call,
    _P.remat_p.name: _rebuild_remat,
    "scan": _rebuild_scan,
    "while": _rebuild_while,
    "cond": _rebuild_cond,
    "shard_map": _rebuild_shard_map,
}


# --------------------------------------------------------------------------
# The transformation.
# --------------------------------------------------------------------------


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct, MXTensor))


def _is_mx(x) -> bool:
    return isinstance(x, MXTensor)


def _aval_key(x):
    if isinstance(x, MXTensor):
        leaves, tree = jax.tree_util.tree_flatten(x)
        return ("mx", tree, tuple(_aval_key(leaf) for leaf in leaves))
    return x if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x)


def _traceable(x):
    """What ``fn`` is traced with: an MXTensor argument as the array it stands for."""
    return jax.ShapeDtypeStruct(x.shape, x.dtype) if isinstance(x, MXTensor) else x


def _static_key(x):
    try:
        hash(x)
    except TypeError:
        return ("id", id(x))
    return x


def _arg_path(path) -> str:
    # (fn, args, kwargs): drop which argument a leaf is in, keep where in it.
    keep = path[1:] if path and getattr(path[0], "idx", None) == 0 else path[2:]
    return jax.tree_util.keystr(tuple(keep), simple=True, separator="/") if keep else ""


@dataclasses.dataclass
class _Traced:
    closed: Any  # jax.extend.core.ClosedJaxpr
    plan: _Plan
    coverage: Coverage
    out_tree: Any
    out_mask: list
    out_static: list
    keepalive: Any  # static leaves keyed by id(), kept so the ids stay unique


class Intercepted:
    """``fn`` with its matmuls in MX; made by :func:`intercept`.

    Call it as ``fn``. ``coverage`` is the :class:`Coverage` of the last
    traced call; ``coverage_for(*args)`` traces without running.

    >>> import jax, jax.numpy as jnp
    >>> from jaxmx.intercept import intercept
    >>> mx_matmul = intercept(jnp.matmul, "mxfp8")
    >>> x = jax.ShapeDtypeStruct((8, 64), jnp.float32)
    >>> mx_matmul.coverage_for(x, x.update(shape=(64, 16))).counts
    '1 of 1 matmuls in MX'
    >>> y = mx_matmul(jnp.ones((8, 64)), jnp.ones((64, 16)))
    >>> mx_matmul.coverage.sites[0].shapes
    ((8, 64), (64, 16))
    """

    def __init__(self, fn, rules, custom_derivatives, weights, path_root, warn, origin):
        self.fn = fn
        self.rules = rules
        self.custom_derivatives = custom_derivatives
        self.weights = weights
        self.path_root = path_root
        self.warn = warn
        self._origin = origin  # (filename, lineno, module) of the intercept() call
        self._cache: dict = {}
        self._last: Coverage | None = None
        self._warned: set[str] = set()
        functools.update_wrapper(self, fn, updated=())

    def __repr__(self) -> str:
        patterns = [r.pattern for r in self.rules]
        return f"intercept({getattr(self.fn, '__name__', self.fn)!r}, rules={patterns})"

    @property
    def coverage(self) -> Coverage:
        """The :class:`Coverage` of the most recently traced call."""
        if self._last is None:
            raise ValueError(
                "no call traced yet: call the function, or use coverage_for(*args) to trace only"
            )
        return self._last

    def coverage_for(self, *args, **kwargs) -> Coverage:
        """The :class:`Coverage` of a call with these arguments, without running it.

        Arrays may be ``jax.ShapeDtypeStruct``.
        """
        return self._traced(args, kwargs)[0].coverage

    def __call__(self, *args, **kwargs):
        traced, arrays = self._traced(args, kwargs)
        leaves = jax.tree_util.tree_leaves(arrays)
        if any(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
            raise TypeError("jax.ShapeDtypeStruct arguments are for coverage_for, not for calls")
        outs = _run(traced.closed.jaxpr, traced.closed.consts, arrays, (), traced.plan)
        it = iter(outs)
        leaves = [
            next(it) if m else s for m, s in zip(traced.out_mask, traced.out_static, strict=True)
        ]
        return jax.tree_util.tree_unflatten(traced.out_tree, leaves)

    def _traced(self, args, kwargs):
        # MXTensor arguments stay whole: fn is traced with the arrays they
        # stand for, and the interpreter hands the MXTensors themselves to
        # the matmuls that contract along their blocks (scale propagation).
        flat, treedef = jax.tree_util.tree_flatten_with_path(
            (self.fn, args, kwargs), is_leaf=_is_mx
        )
        leaves = [x for _, x in flat]
        mask = [_is_array(x) for x in leaves]
        arrays = [x for x, m in zip(leaves, mask, strict=True) if m]
        key = (
            treedef,
            tuple(_aval_key(x) if m else _static_key(x) for x, m in zip(leaves, mask, strict=True)),
        )
        traced = self._cache.get(key)
        if traced is None:
            traced = self._trace(flat, treedef, mask, arrays)
            # A jaxpr that closed over an outer transformation's tracers is
            # only valid inside that transformation: do not keep it.
            if not any(isinstance(c, jax.core.Tracer) for c in traced.closed.consts):
                self._cache[key] = traced
        self._last = traced.coverage
        self._warn_unmatched(traced.coverage)
        return traced, arrays

    def _trace(self, flat, treedef, mask, arrays) -> _Traced:
        leaves = [x for _, x in flat]
        out = {}

        def flat_fn(*arrs):
            it = iter(arrs)
            full = [next(it) if m else x for x, m in zip(leaves, mask, strict=True)]
            fn, args, kwargs = jax.tree_util.tree_unflatten(treedef, full)
            result = fn(*args, **kwargs)
            out_leaves, out["tree"] = jax.tree_util.tree_flatten(result)
            out["mask"] = [_is_array(o) for o in out_leaves]
            out["static"] = [None if m else o for o, m in zip(out_leaves, out["mask"], strict=True)]
            return [o for o, m in zip(out_leaves, out["mask"], strict=True) if m]

        closed = jax.make_jaxpr(flat_fn)(*map(_traceable, arrays))
        srcs = [_arg_path(path) for (path, _), m in zip(flat, mask, strict=True) if m]
        planner = _Planner(self.rules, self.custom_derivatives, self.weights, self.path_root)
        planner.mx_args = {
            src: x.format.name
            for src, x in zip(srcs, arrays, strict=True)
            if isinstance(x, MXTensor)
        }
        planner.walk(closed.jaxpr, [""] * len(closed.consts) + srcs, siu.new_name_stack())
        coverage = Coverage(
            rules=tuple((r.pattern, r.config) for r in self.rules),
            sites=tuple(planner.sites),
            unmatched=tuple(r.pattern for i, r in enumerate(self.rules) if not planner.hits[i]),
        )
        plan = _Plan(dict(planner.decisions), frozenset(planner.rebuild))
        keepalive = [x for x, m in zip(leaves, mask, strict=True) if not m]
        return _Traced(closed, plan, coverage, out["tree"], out["mask"], out["static"], keepalive)

    def _warn_unmatched(self, coverage: Coverage) -> None:
        if not self.warn:
            return
        for pattern in coverage.unmatched:
            if pattern in self._warned:
                continue
            self._warned.add(pattern)
            filename, lineno, module = self._origin
            warnings.warn_explicit(
                f"jaxmx.intercept rule {pattern!r} matched no matmul of "
                f"{getattr(self.fn, '__name__', type(self.fn).__name__)} "
                f"({coverage.counts})",
                UserWarning,
                filename,
                lineno,
                module=module,
            )


def _caller() -> tuple[str, int, str]:
    frame = sys._getframe(2)
    return frame.f_code.co_filename, frame.f_lineno, frame.f_globals.get("__name__", "?")


def intercept(
    fn: Callable,
    rules,
    *,
    custom_derivatives: Literal["keep", "inline"] = "keep",
    weights: str | None = None,
    path_root: str | None = None,
    warn: bool = True,
) -> Intercepted:
    """``fn`` with every ``dot_general`` / ``einsum`` / ``@`` / convolution it runs in MX.

    A function transformation: ``fn`` is traced to a jaxpr (once per input
    structure, shapes and non-array arguments) and re-run with each matmul
    replaced by :func:`jaxmx.dot_general` or
    :func:`jaxmx.conv_general_dilated` under the config its rule picks,
    including the matmuls inside ``jit``, ``lax.scan`` / ``while_loop`` /
    ``cond``, ``jax.checkpoint`` and ``shard_map`` bodies. The result
    composes with ``jax.jit``, ``jax.grad`` (the backward pass is jaxmx's MX
    backward pass) and ``jax.vmap``.

    Array leaves of the arguments (and of ``fn`` itself, when it is a pytree
    such as an nnx or Equinox module) are traced; every other leaf (Python
    numbers, strings, flags) is static, as in ``equinox.filter_jit``.

    Args:
      fn: any JAX-traceable callable: ``model.apply``, an nnx or Equinox
        module, a plain function.
      rules: ``[(pattern, config), ...]`` (or a dict, or
        :class:`jaxmx.rules.Rule` objects, the ones jaxmx.flax uses), tried in
        order; the first regular expression found in a matmul's path
        (``"Model/attn/q/dot_general"``) or in the argument path of one of
        its operands (``"params/attn/q/kernel"``) decides. ``config`` is a
        :class:`~jaxmx.DotConfig`, a preset or format name, or ``None`` (high
        precision). Matmuls no rule matches stay in high precision. A single
        config, preset or format name means ``[(".*", config)]``.
      custom_derivatives: matmuls inside a user's ``custom_jvp`` /
        ``custom_vjp`` function: ``"keep"`` leaves the function as it is
        (high precision, its derivative rule intact); ``"inline"`` runs its
        primal function with MX matmuls and drops the custom rule, so
        gradients come from the MX matmuls' own backward pass (use it for
        inference, or when the custom rule exists only for numerics the MX
        backward pass already covers). jaxmx's own ops are never entered.
      weights: a regular expression for the argument paths of weights
        (``r"kernel|weight"``). By default a config's ``lhs`` formats go to
        the left operand and its ``rhs`` (weight) formats to the right one,
        as in :func:`jaxmx.dot_general`. With ``weights``, an operand whose
        argument path matches gets the weight formats wherever it sits
        (Equinox's ``weight @ x``), and a matmul with no weight operand
        (attention's q.k and p.v) gets ``config.for_activations()``, as
        ``jaxmx.flax`` gives attention. Only weights passed in as arguments
        (or as leaves of ``fn``) have argument paths.
      path_root: a name-stack prefix dropped from the start of op paths.
        linen pushes the top module's class name first (``"LM/block_0/q"``);
        ``path_root="LM"`` makes op paths read as linen module paths
        (``module.path``), so rules written for those match the same way.
      warn: warn (pointing at this call) about rules that decide no matmul.

    Returns:
      A callable taking ``fn``'s arguments; its ``coverage`` attribute (a
      :class:`Coverage`) tells which matmuls of the last traced call run in
      MX, and ``coverage_for(*args)`` traces without running.

    >>> import jax, jax.numpy as jnp, jaxmx
    >>> def model(params, x, keys):
    ...     h = jnp.tanh(x @ params["hidden"])
    ...     scores = jnp.einsum("td,sd->ts", h, keys)  # no weight: matched by path
    ...     with jax.named_scope("head"):
    ...         return scores @ params["out"]
    >>> params = {"hidden": jnp.ones((32, 32)) / 32, "out": jnp.ones((32, 8))}
    >>> x, keys = jnp.ones((4, 32)), jnp.ones((32, 32))
    >>> from jaxmx.intercept import intercept
    >>> mx_model = intercept(model, [("head", None), (".*", "mxfp8")])
    >>> y = jax.jit(mx_model)(params, x, keys)
    >>> print(mx_model.coverage.summary())
    2 of 3 matmuls in MX
      MX    dot_general <- hidden     (4, 32) x (32, 32)  fwd mxfp8_e4m3 x mxfp8_e4m3; ...
      MX    td,sd->ts/dot_general     (4, 32) x (32, 32)  fwd mxfp8_e4m3 x mxfp8_e4m3; ...
      high  head/dot_general <- out   (4, 32) x (32, 8)  high (rule 'head' says high precision)
    """
    if not callable(fn):
        raise TypeError(f"intercept takes a callable, got {type(fn).__name__}")
    if custom_derivatives not in ("keep", "inline"):
        raise ValueError(
            f"custom_derivatives must be 'keep' or 'inline', got {custom_derivatives!r}"
        )
    if weights is not None:
        if not isinstance(weights, str):
            raise TypeError(f"weights must be a regular expression string, got {weights!r}")
        try:
            weights = re.compile(weights)
        except re.error as err:
            raise ValueError(f"weights {weights!r} is not a regular expression: {err}") from None
    if not isinstance(warn, (bool, np.bool_)):
        raise TypeError(f"warn must be True or False, got {warn!r}")
    if path_root is not None and not isinstance(path_root, str):
        raise TypeError(f"path_root must be a string or None, got {path_root!r}")
    if path_root is not None:
        path_root = path_root.strip("/")
    rules = parse_rules(rules)
    return Intercepted(fn, rules, custom_derivatives, weights, path_root, warn, _caller())
