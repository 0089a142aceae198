"""Running: an interpreter that re-emits a planned jaxpr with MX matmuls.

Control flow that holds an MX matmul is rebuilt around interpreted bodies
(``lax.scan``, ``lax.while_loop``, ``lax.switch``, ``jax.checkpoint``,
``jax.shard_map``); everything else is bound as it was traced. MXTensor
arguments flow as they are into rebuilt control flow and into the matmuls
that contract along their blocks, and are decoded for any other op.
NMSparseTensor arguments (N:M-sparse weights) stay compact through float
casts and into rebuilt control flow (a scan slices them layer by layer) and
are densified to their MXTensor only by the equation that reads them, once
per variable (see :func:`_kept_sparse` for the boundaries that densify). With
``vector_ops``, ``Plan.vector`` rounds the outputs of the equations it
names after they run (see ``vector_ops.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax import lax
from jax.extend import core as jcore
from jax.extend import source_info_util as siu

from jaxmx._intercept.prims import DOT, P
from jaxmx._intercept.slabs import sliced_dot
from jaxmx.config import DotConfig
from jaxmx.conv import conv_general_dilated as _mx_conv_general_dilated
from jaxmx.dot import dot_general as _mx_dot_general
from jaxmx.quantize import dequantize
from jaxmx.sparse_tensor import NMSparseTensor
from jaxmx.tensor import MXTensor

__all__ = ["Plan", "run_jaxpr"]


@dataclasses.dataclass(frozen=True)
class Plan:
    decisions: dict
    rebuild: frozenset
    vector: Any = None  # vector_ops.VectorPlan: what vector_ops= rounds, or None
    # eqn address -> hook(eqn, invals) -> (eqn, invals), run before the
    # equation (its operands transformed, e.g. an activation rotated, or the
    # equation itself replaced); the addresses of the control flow around a
    # hooked equation must be in ``rebuild``. Used by jaxmx.ptq.quantize_model.
    hooks: dict = dataclasses.field(default_factory=dict)


def run_jaxpr(jaxpr, consts, args, addr: tuple, plan: Plan) -> list:
    env: dict = {}

    decoded: dict = {}  # var -> its MXTensor decoded once, for every op that needs values
    densified: dict = {}  # var -> its NMSparseTensor densified once, for the ops that read it
    # Each cached copy is dropped after the last equation that reads its var
    # (eagerly run, a densified weight then lives only while it is used).
    last = _last_uses(jaxpr)

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    def as_mx(x, v):
        """An NMSparseTensor argument densified to its MXTensor (once per var)."""
        if not isinstance(x, NMSparseTensor):
            return x
        if v not in densified:
            densified[v] = x.densify()
        return densified[v]

    def dense(x, v):
        """An MXTensor argument decoded for an op that needs its values (once per var)."""
        x = as_mx(x, v)
        if not isinstance(x, MXTensor):
            return x
        if v not in decoded:
            decoded[v] = dequantize(x, v.aval.dtype)
        return decoded[v]

    for v, x in zip([*jaxpr.constvars, *jaxpr.invars], [*consts, *args], strict=True):
        env[v] = x
    for i, eqn in enumerate(jaxpr.eqns):
        a = addr + (i,)
        invals = [read(v) for v in eqn.invars]
        rebuilt = a in plan.rebuild and _kind(eqn) != "shard_map"
        if any(isinstance(x, NMSparseTensor) for x in invals):
            keep, flows = _kept_sparse(eqn, invals, a, plan)
            rebuilt = rebuilt or flows
            invals = [
                x if j in keep else as_mx(x, v)
                for j, (x, v) in enumerate(zip(invals, eqn.invars, strict=True))
            ]
        name_stack = siu.current_name_stack() + eqn.source_info.name_stack
        with siu.user_context(eqn.source_info.traceback, name_stack=name_stack), eqn.ctx.manager:
            if a in plan.hooks:
                eqn, invals = plan.hooks[a](eqn, invals)
            if a in plan.decisions:
                outs = [_mx_op(eqn, invals, plan.decisions[a])]
            elif rebuilt:
                outs = _rebuilder(eqn, plan)(eqn, invals, a, plan)  # MXTensors flow in as pytrees
            elif (cast := _mx_cast(eqn, invals)) is not None:
                outs = [cast]
            elif eqn.primitive is DOT and (sliced := sliced_dot(eqn, invals)) is not None:
                outs = [sliced]  # an MXTensor weight decoded slab by slab
            else:
                invals = [dense(x, v) for x, v in zip(invals, eqn.invars, strict=True)]
                if a in plan.rebuild:
                    outs = _rebuilder(eqn, plan)(eqn, invals, a, plan)
                else:
                    outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
                if not eqn.primitive.multiple_results:
                    outs = [outs]
            if plan.vector is not None and a in plan.vector.sites:
                outs = plan.vector.round(a, outs)
        for v, x in zip(eqn.outvars, outs, strict=True):
            env[v] = x
        for v in last.get(i, ()):
            densified.pop(v, None)
            decoded.pop(v, None)
    return [dense(read(v), v) for v in jaxpr.outvars]


def _last_uses(jaxpr) -> dict:
    """Equation index -> the vars it is the last to read (the outputs' vars: none)."""
    at: dict = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if not isinstance(v, jcore.Literal):
                at[v] = i
    for v in jaxpr.outvars:
        if not isinstance(v, jcore.Literal):
            at.pop(v, None)
    last: dict = {}
    for v, i in at.items():
        last.setdefault(i, []).append(v)
    return last


def _kept_sparse(eqn, invals, a, plan) -> tuple[frozenset, bool]:
    """``(kept, flows)``: which inputs of ``eqn`` stay NMSparseTensor (the rest
    are densified first), and whether some flow into control flow that must
    be rebuilt to take them.

    Kept: a float cast's operand (see :func:`_mx_cast`), and what control
    flow takes as a pytree: every input of ``jit``, ``call``, ``checkpoint``
    and of a custom-derivative function the plan inlines, a ``cond``'s
    operands, a ``while_loop``'s consts, a ``scan``'s consts and the inputs it
    scans over (sliced layer by layer, so each iteration densifies its own
    layer), except one scanned along its sparse axis. Such control flow is
    rebuilt even with no MX matmul inside (weight-only rules); run as traced,
    it would take every layer's dense copy at once. Densified at the boundary,
    as MXTensors are handed in: a loop's carries (the loop's outputs are
    arrays), ``shard_map``'s inputs (decoded there) and the inputs of a
    custom-derivative function kept as it is (decoded there). Matmuls and
    every other op read the dense MXTensor.
    """
    if a in plan.decisions or a in plan.hooks:
        return frozenset(), False
    kind = _kind(eqn)
    rebuilt = a in plan.rebuild and kind != "shard_map"
    if plan.vector is not None and kind in plan.vector.rebuilders:
        rebuilt = False  # a custom-derivative function kept, its inputs decoded
    if not (rebuilt or kind in _FLOWS):
        return (frozenset({0}) if _float_cast(eqn) else frozenset()), False
    p, n = eqn.params, len(invals)
    if kind == "scan":
        nc, ncarry = p["num_consts"], p["num_carry"]
        xs = [
            j
            for j in range(nc + ncarry, n)
            if not isinstance(x := invals[j], NMSparseTensor) or x.sparse_axis() + x.ndim != 0
        ]
        keep = frozenset([*range(nc), *xs])
    elif kind == "while":
        keep = frozenset(range(p["cond_nconsts"] + p["body_nconsts"]))
    elif kind == "cond":
        keep = frozenset(range(1, n))
    else:
        keep = frozenset(range(n))
    return keep, any(isinstance(invals[j], NMSparseTensor) for j in keep)


_FLOATS = (np.dtype(np.float32), np.dtype(jax.numpy.bfloat16), np.dtype(np.float16))


def _float_cast(eqn) -> bool:
    return (
        eqn.primitive.name == "convert_element_type"
        and np.dtype(eqn.params["new_dtype"]) in _FLOATS
    )


def _mx_cast(eqn, invals) -> MXTensor | NMSparseTensor | None:
    """A float cast of an MXTensor argument (a layer's ``dtype``) stays an
    MXTensor that decodes to the new dtype: decoding to it directly rounds
    the same way as decoding then casting. An NMSparseTensor stays one whose
    kept values (and so its densified MXTensor) decode to the new dtype.

    Only a cast from float32 folds in so: a tensor that already decodes to a
    narrower float (an earlier cast) has had its values rounded to it, and a
    later widening cast must keep that rounding, so it is decoded and cast as
    the program says."""
    if not _float_cast(eqn) or not isinstance(x := invals[0], (MXTensor, NMSparseTensor)):
        return None
    new = np.dtype(eqn.params["new_dtype"])
    if np.dtype(x.dtype) != np.dtype(np.float32) and new != np.dtype(x.dtype):
        return None
    if isinstance(x, NMSparseTensor):
        return dataclasses.replace(x, values=dataclasses.replace(x.values, dtype=new))
    return dataclasses.replace(x, dtype=new)


def _contracted_or_decoded(x, v, contracting):
    """An MXTensor operand goes in as it is when its blocks run along one of
    the axes this matmul contracts; otherwise it is decoded and the rule's
    config quantizes it like any array."""
    if isinstance(x, MXTensor) and x.block_axis() + x.ndim not in contracting:
        return dequantize(x, v.aval.dtype)
    return x


def _mx_op(eqn, invals, config: DotConfig):
    p = eqn.params
    if eqn.primitive is DOT:
        (lc, rc), _ = p["dimension_numbers"]
        contracting = (lc, rc)
    else:
        dn = p["dimension_numbers"]
        contracting = ((dn.lhs_spec[1],), (dn.rhs_spec[1],))
    lhs, rhs = (
        _contracted_or_decoded(x, v, c)
        for x, v, c in zip(invals, eqn.invars[:2], contracting, strict=True)
    )
    if eqn.primitive is DOT:
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


def _rebuilder(eqn, plan) -> Callable:
    kind = _kind(eqn)
    if plan.vector is not None and kind in plan.vector.rebuilders:
        return plan.vector.rebuilders[kind]
    return _REBUILD[kind]


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
        outs = run_jaxpr(p["jaxpr"].jaxpr, p["jaxpr"].consts, invals, a + ("jaxpr",), plan)
    return _constrain(outs, p["out_shardings"])


def _constrain(xs, shardings):
    # A jit boundary is inlined; its explicit shardings become sharding
    # constraints (Auto mesh axes) or transfers (Explicit axes, where the
    # sharding is part of the type).
    return [_constrain_one(x, s) for x, s in zip(xs, shardings, strict=True)]


def _constrain_one(x, s):
    # Unspecified shardings, and MX / sparse pytrees (their leaves are not the array's shape).
    if not isinstance(s, jax.sharding.Sharding) or isinstance(x, (MXTensor, NMSparseTensor)):
        return x
    if jax.sharding.AxisType.Explicit in tuple(getattr(getattr(s, "mesh", None), "axis_types", ())):
        return jax.device_put(x, s)  # what jit does with such an input: a transfer
    return lax.with_sharding_constraint(x, s)


def _rebuild_call(eqn, invals, a, plan):
    jaxpr, consts = _closed(eqn.params["call_jaxpr"])
    return run_jaxpr(jaxpr, consts, invals, a + ("call_jaxpr",), plan)


def _rebuild_remat(eqn, invals, a, plan):
    p = eqn.params
    body = lambda *xs: run_jaxpr(p["jaxpr"], (), xs, a + ("jaxpr",), plan)  # noqa: E731
    return list(jax.checkpoint(body, prevent_cse=p["prevent_cse"], policy=p["policy"])(*invals))


def _rebuild_scan(eqn, invals, a, plan):
    p = eqn.params
    nc, ncarry, closed = p["num_consts"], p["num_carry"], p["jaxpr"]
    consts, init, xs = invals[:nc], invals[nc : nc + ncarry], invals[nc + ncarry :]

    def body(carry, x):
        outs = run_jaxpr(closed.jaxpr, closed.consts, [*consts, *carry, *x], a + ("jaxpr",), plan)
        return outs[:ncarry], outs[ncarry:]

    init, unwrap = list(init), lambda carry: carry
    if plan.vector is not None:  # stochastic rounding: an iteration counter for the keys
        body, init, unwrap = plan.vector.count_scan(a, body, init)
    carry, ys = lax.scan(
        body,
        init,
        list(xs),
        length=p["length"],
        reverse=p["reverse"],
        unroll=p["unroll"],
    )
    return [*unwrap(carry), *ys]


def _rebuild_while(eqn, invals, a, plan):
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, init = invals[:cn], invals[cn : cn + bn], invals[cn + bn :]
    cj, bj = p["cond_jaxpr"], p["body_jaxpr"]

    def cond_fun(carry):
        return run_jaxpr(cj.jaxpr, cj.consts, [*cconsts, *carry], a + ("cond_jaxpr",), plan)[0]

    def body_fun(carry):
        return run_jaxpr(bj.jaxpr, bj.consts, [*bconsts, *carry], a + ("body_jaxpr",), plan)

    init, unwrap = list(init), lambda carry: carry
    if plan.vector is not None:  # stochastic rounding: an iteration counter for the keys
        cond_fun, body_fun, init, unwrap = plan.vector.count_while(a, cond_fun, body_fun, init)
    return list(unwrap(lax.while_loop(cond_fun, body_fun, init)))


def _rebuild_cond(eqn, invals, a, plan):
    index, *ops = invals

    def branch(b, closed):
        return lambda *xs: run_jaxpr(closed.jaxpr, closed.consts, xs, a + (("branches", b),), plan)

    branches = [branch(b, c) for b, c in enumerate(eqn.params["branches"])]
    return list(lax.switch(index, branches, *ops))


def _rebuild_shard_map(eqn, invals, a, plan):
    p = eqn.params
    body = lambda *xs: tuple(run_jaxpr(p["jaxpr"], (), xs, a + ("jaxpr",), plan))  # noqa: E731
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
    P.remat_p.name: _rebuild_remat,
    "scan": _rebuild_scan,
    "while": _rebuild_while,
    "cond": _rebuild_cond,
    "shard_map": _rebuild_shard_map,
}
# Control flow rebuilt, when NMSparseTensors flow in, even with no MX matmul inside.
_FLOWS = frozenset({"jit", "closed_call", "call", P.remat_p.name, "scan", "while", "cond"})
