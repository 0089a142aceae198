"""Planning: walk a traced jaxpr once, decide every matmul by the rules, record the sites."""

from __future__ import annotations

import collections
import os
from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.extend import core as jcore

from jaxmx._intercept.coverage import MatmulSite
from jaxmx._intercept.prims import (
    CONV,
    DOT,
    IDENTITIES,
    JAXMX_DIR,
    JAXMX_OPS,
    OTHER_MATMULS,
    VIEWS,
    P,
)
from jaxmx.config import DotConfig
from jaxmx.rules import Rule

__all__ = ["Planner"]


def _func_info(closed) -> tuple[str, str]:
    info = getattr(closed.jaxpr, "debug_info", None)
    return (getattr(info, "func_name", None) or "?", getattr(info, "func_filename", None) or "")


def _jaxmx_op(eqn) -> str | None:
    """For a custom_vjp / custom_jvp function defined in jaxmx: its op name
    (``"dot_general"``, ``"conv_general_dilated"``, or ``""`` for one that is
    no matmul); None for any other equation."""
    if eqn.primitive not in (P.custom_vjp_call_p, P.custom_jvp_call_p):
        return None
    name, filename = _func_info(eqn.params["call_jaxpr"])
    if filename and os.path.abspath(filename).startswith(JAXMX_DIR + os.sep):
        return JAXMX_OPS.get(name, "")
    return None


def _dtype_reason(dtypes) -> str | None:
    for dt in dtypes:
        dt = np.dtype(dt)
        # jnp.issubdtype knows ml_dtypes' bfloat16 is a float; np.issubdtype does not.
        if not jax.numpy.issubdtype(dt, jax.numpy.floating) or dt == np.float64:
            kind = "float64" if dt == np.float64 else str(dt)
            return f"{kind} operands (jaxmx takes float32, bfloat16 and float16)"
    return None


class Planner:
    """Decides each matmul and records where the interpreter must rebuild."""

    def __init__(self, rules: tuple[Rule, ...], custom_derivatives: str, weights, path_root):
        self.rules = rules
        self.custom_derivatives = custom_derivatives
        self.weights = weights  # compiled regex or None
        self.path_root = path_root  # name-stack prefix to drop, or None
        self.sites: list[MatmulSite] = []
        self.addrs: list[tuple | None] = []  # per site: its eqn address (None: a jaxmx op)
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
            return cfg.swapped(), " (weight on the left: roles swapped)"
        return cfg, ""

    def _site(self, eqn, path, op, operands, within, blocked, addr):
        self.addrs.append(addr)
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
            if eqn.primitive in (DOT, CONV) or name in OTHER_MATMULS:
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
            if name in VIEWS and eqn.invars:
                env[eqn.outvars[0]] = ins[0]
            elif name in IDENTITIES:
                env.update(zip(eqn.outvars, ins, strict=False))

    def _jaxmx_site(self, eqn, ns, op, ins, within):
        self.addrs.append(None)
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
        if prim is P.jit_p:
            name = p["name"]
            yield _Child("jaxpr", *_open(p["jaxpr"], ins), ns.extend(name), f"jit({name})")
        elif prim in (P.closed_call_p, P.call_p):
            yield _Child("call_jaxpr", *_open(p["call_jaxpr"], ins), ns, prim.name)
        elif prim is P.remat_p:
            yield _Child("jaxpr", *_open(p["jaxpr"], ins), ns, "checkpoint")
        elif prim is P.scan_p:
            nc, ncarry = p["num_consts"], p["num_carry"]
            # A scanned-over slice of a weight is still that weight; a carry is not.
            srcs = ins[:nc] + [""] * ncarry + ins[nc + ncarry :]
            yield _Child("jaxpr", *_open(p["jaxpr"], srcs), ns, f"scan(length={p['length']})")
        elif prim is P.while_p:
            cn, bn = p["cond_nconsts"], p["body_nconsts"]
            carry = [""] * (len(ins) - cn - bn)
            yield _Child("cond_jaxpr", *_open(p["cond_jaxpr"], ins[:cn] + carry), ns, "while")
            body_srcs = ins[cn : cn + bn] + carry
            yield _Child("body_jaxpr", *_open(p["body_jaxpr"], body_srcs), ns, "while")
        elif prim is P.cond_p:
            for b, closed in enumerate(p["branches"]):
                yield _Child(("branches", b), *_open(closed, ins[1:]), ns, f"cond[{b}]")
        elif prim.name == "shard_map":
            yield _Child("jaxpr", *_open(p["jaxpr"], ins), ns, "shard_map")
        elif prim in (P.custom_jvp_call_p, P.custom_vjp_call_p):
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
