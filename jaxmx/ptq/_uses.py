"""Which parameters of a traced function feed which matmuls, and through which views.

:func:`weight_uses` walks a jaxpr (the one :func:`jaxmx.intercept` traced,
with the same equation addresses as its planner) and follows every
parameter leaf through the views that keep its values whole (transpose,
reshape, cast, copy) into sub-jaxprs (``jit``, ``scan``, ``cond``,
``checkpoint``, ...). It records each matmul operand that is such a view
(:class:`MatmulUse`) and every other reader of a parameter: an embedding
lookup (``gather``), a slice, an elementwise op, a loop carry, an output.
Helpers map a matmul's contraction axis back to the parameter's own axes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jax.extend import core as jcore
from jax.extend import source_info_util as siu

from jaxmx._intercept.plan import _jaxmx_op
from jaxmx._intercept.prims import CONV, DOT, IDENTITIES, OTHER_MATMULS, P

__all__ = ["MatmulUse", "Uses", "leaf_axis", "weight_uses"]

# Views that keep every value of their operand and only move or relabel it:
# a matmul operand reached through them is the parameter itself.
WHOLE_VIEWS = frozenset(
    {
        "transpose",
        "reshape",
        "squeeze",
        "expand_dims",
        "convert_element_type",
        "copy",
        "copy_p",
        "sharding_constraint",
    }
)
RESHAPES = frozenset({"reshape", "squeeze", "expand_dims"})


@dataclasses.dataclass(frozen=True)
class Src:
    """A value that is a whole view of one parameter leaf."""

    leaf: str  # the leaf's path in the parameters ("params/Dense_0/kernel")
    views: tuple = ()  # the view equations applied since the leaf, in order
    scanned: int = 0  # how many lax.scan slicings it went through (stacked layers)

    def then(self, eqn) -> Src:
        return dataclasses.replace(self, views=(*self.views, eqn))


@dataclasses.dataclass(frozen=True)
class MatmulUse:
    """One matmul operand that is a whole view of a parameter."""

    leaf: str
    addr: tuple  # the matmul equation's address (intercept's planner uses the same)
    eqn: Any  # the matmul equation
    index: int  # which operand: 0 (lhs) or 1 (rhs)
    views: tuple  # view equations from the leaf to the operand
    scanned: int  # scan slicings on the way (0: the whole leaf)
    other: str | None  # the other operand's leaf when it is a parameter too
    blocked: str | None  # why intercept cannot rebuild around it, or None

    @property
    def op(self) -> str:
        return self.eqn.primitive.name


@dataclasses.dataclass
class Uses:
    """Every read of every parameter leaf in one traced program."""

    matmuls: dict[str, list[MatmulUse]] = dataclasses.field(default_factory=dict)
    # leaf -> names of the other operations that read it ("gather", "scan carry", ...)
    others: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def other(self, src: Src | None, what: str) -> None:
        if src is not None:
            self.others.setdefault(src.leaf, []).append(what)


def weight_uses(closed, srcs: list, planner) -> Uses:
    """The uses of the parameters of ``closed`` (a ClosedJaxpr).

    ``srcs``: per invar, the parameter leaf path it is, or None (an input).
    ``planner``: the intercept planner of this trace (its ``_children`` gives
    the sub-jaxprs, with the addresses its decisions use).
    """
    uses = Uses()
    args = [None] * len(closed.consts) + [None if s is None else Src(s) for s in srcs]
    _walk(closed.jaxpr, args, (), None, planner, uses)
    return uses


def _walk(jaxpr, srcs, addr, blocked, planner, uses: Uses) -> None:
    env: dict = {v: s for v, s in zip([*jaxpr.constvars, *jaxpr.invars], srcs, strict=True)}

    def src(v):
        return None if isinstance(v, jcore.Literal) else env.get(v)

    for i, eqn in enumerate(jaxpr.eqns):
        a = addr + (i,)
        name = eqn.primitive.name
        ins = [src(v) for v in eqn.invars]
        if eqn.primitive in (DOT, CONV) or name in OTHER_MATMULS:
            for k in (0, 1):
                if ins[k] is not None:
                    other = ins[1 - k]
                    uses.matmuls.setdefault(ins[k].leaf, []).append(
                        MatmulUse(
                            leaf=ins[k].leaf,
                            addr=a,
                            eqn=eqn,
                            index=k,
                            views=ins[k].views,
                            scanned=ins[k].scanned,
                            other=None if other is None else other.leaf,
                            blocked=blocked,
                        )
                    )
            for s in ins[2:]:
                uses.other(s, name)
        elif _jaxmx_op(eqn) is not None:
            for s in ins:
                uses.other(s, "a jaxmx op in the function")
        elif name in WHOLE_VIEWS and eqn.invars:
            if ins[0] is not None:
                env[eqn.outvars[0]] = ins[0].then(eqn)
            for s in ins[1:]:
                uses.other(s, name)
        elif name in IDENTITIES:
            env.update({o: s for o, s in zip(eqn.outvars, ins, strict=False) if s is not None})
        else:
            _enter(eqn, ins, a, blocked, planner, uses)
    for v in jaxpr.outvars:
        uses.other(src(v), "returned" if not addr else "returned from a sub-function")


def _enter(eqn, ins, a, blocked, planner, uses: Uses) -> None:
    """Control flow: follow the parameters into its bodies; anything else reads them."""
    p, name = eqn.params, eqn.primitive.name
    ins = list(ins)
    if eqn.primitive is P.scan_p:
        nc, ncarry = p["num_consts"], p["num_carry"]
        for s in ins[nc : nc + ncarry]:
            uses.other(s, "a scan carry")
        ins[nc + ncarry :] = [
            None if s is None else dataclasses.replace(s, scanned=s.scanned + 1)
            for s in ins[nc + ncarry :]
        ]
    elif eqn.primitive is P.while_p:
        for s in ins[p["cond_nconsts"] + p["body_nconsts"] :]:
            uses.other(s, "a while_loop carry")
    elif eqn.primitive is P.cond_p:
        uses.other(ins[0], "a cond index")
    children = list(
        planner._children(eqn, siu.new_name_stack(), ["" if s is None else s for s in ins])
    )
    if not children:  # an ordinary primitive: it reads the parameter's values
        for s in ins:
            uses.other(s, name)
        return
    for c in children:
        if isinstance(c.key, tuple) and c.key[0] == "other":  # not followed (pallas_call, ...)
            for s in ins:
                uses.other(s, f"inside {name}")
            continue
        sub = [None if s == "" else s for s in c.srcs]
        _walk(c.jaxpr, sub, a + (c.key,), blocked or c.blocked, planner, uses)


def leaf_axis(views, axis: int) -> int | None:
    """The leaf axis that axis ``axis`` of ``views`` applied to the leaf comes from.

    None when a reshape splits or merges that axis.
    """
    for eqn in reversed(views):
        name = eqn.primitive.name
        if name == "transpose":
            axis = int(eqn.params["permutation"][axis])
        elif name in RESHAPES:
            axis = _reshape_axis(eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape, axis)
            if axis is None:
                return None
    return axis


def _reshape_axis(before, after, axis: int) -> int | None:
    # The axis survives when an input axis of the same length starts at the
    # same flat offset (the product of the lengths before it).
    size, offset = after[axis], math.prod(after[:axis])
    for j, n in enumerate(before):
        if n == size and math.prod(before[:j]) == offset and (size > 1 or len(before) == 1):
            return j
    return None


def permutation(views, ndim: int) -> tuple[int, ...] | None:
    """``perm`` with ``operand == transpose(leaf, perm)`` when ``views`` only
    transpose, cast and copy; None when one of them reshapes."""
    perm = tuple(range(ndim))
    for eqn in views:
        name = eqn.primitive.name
        if name in RESHAPES:
            return None
        if name == "transpose":
            perm = tuple(perm[int(k)] for k in eqn.params["permutation"])
    return perm
