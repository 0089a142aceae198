"""Running ``vector_ops=``: what the interpreter calls for the rounded equations.

:class:`VectorPlan` rounds a site's outputs after its equation, carries an
iteration counter through rebuilt ``scan`` / ``while_loop`` for stochastic
rounding's keys, and rebuilds a user's ``custom_jvp`` / ``custom_vjp``
function around its rounded primal, its own rule kept. The key scheme and
the derivative rules are described in :mod:`jaxmx._intercept.vector_ops`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxmx._intercept.run import run_jaxpr
from jaxmx.formats import ElementFormat
from jaxmx.quantize import dequantize
from jaxmx.rounding import round_to
from jaxmx.sparse_tensor import NMSparseTensor
from jaxmx.tensor import MXTensor

__all__ = ["VectorPlan", "keyed", "rebuilders"]


# The key context of the equations being interpreted (stochastic rounding).
_CONTEXT: contextvars.ContextVar = contextvars.ContextVar("jaxmx_vector_key", default=None)


@contextlib.contextmanager
def keyed(key):
    """Interprets with ``key`` as the key context (see the module docstring)."""
    token = _CONTEXT.set(key)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


@dataclasses.dataclass(frozen=True)
class VectorPlan:
    """What the interpreter does for ``vector_ops`` (``Plan.vector``)."""

    elem: ElementFormat
    rounding: str
    sites: dict  # eqn address -> (site number, indices of the outputs to round)
    loops: dict  # scan / while address -> loop number (stochastic rounding only)
    keyed: bool
    rebuilders: dict  # primitive name -> rebuild function replacing run.py's

    def round(self, a: Any, outs: Any) -> list:
        """The outputs of the equation at ``a``, rounded where the plan says."""
        n, todo = self.sites[a]
        key = None
        if self.keyed:
            key = jax.random.fold_in(_context_key(), n)
        outs = list(outs)
        rounder = _rounder(self.elem, self.rounding)
        for k in todo:
            if isinstance(outs[k], (MXTensor, NMSparseTensor)):  # an argument cast: decoded later
                continue
            kk = key if key is None or len(todo) == 1 else jax.random.fold_in(key, k)
            outs[k] = rounder(outs[k], kk)
        return outs

    def count_scan(self, a, body, init):
        """``(body, init, unwrap)``: the scan body with an iteration counter
        carried, under its iteration's key context."""
        if a not in self.loops:
            return body, init, lambda carry: carry

        def counted(carry, x):
            carry, i = carry
            with keyed(self._iteration_key(a, i)):
                new, y = body(carry, x)
            return (new, i + 1), y

        return counted, (init, jnp.int32(0)), lambda carry: carry[0]

    def count_while(self, a, cond_fun, body_fun, init):
        """``(cond_fun, body_fun, init, unwrap)`` for ``lax.while_loop``, likewise."""
        if a not in self.loops:
            return cond_fun, body_fun, init, lambda carry: carry

        def cond(carry):
            carry, i = carry
            with keyed(self._iteration_key(a, i)):
                return cond_fun(carry)

        def body(carry):
            carry, i = carry
            with keyed(self._iteration_key(a, i)):
                return body_fun(carry), i + 1

        return cond, body, (init, jnp.int32(0)), lambda carry: carry[0]

    def _iteration_key(self, a, i):
        return jax.random.fold_in(jax.random.fold_in(_context_key(), self.loops[a]), i)


def _context_key():
    key = _CONTEXT.get()
    if key is None:
        raise RuntimeError("jaxmx.intercept: stochastic vector-op rounding ran without its key")
    return key


@functools.cache
def _rounder(elem: ElementFormat, rounding: str) -> Callable[..., Any]:
    """``round_to`` to ``elem`` with the identity as its derivative (straight-through)."""

    @jax.custom_jvp
    def rounded(x, key):
        return round_to(x, elem, rounding=rounding, key=key)

    @rounded.defjvp
    def _(primals, tangents):
        return rounded(*primals), tangents[0]

    return rounded


def rebuilders(custom_derivatives: str) -> dict:
    """Rebuilders replacing the interpreter's for ``custom_derivatives``: with
    ``"keep"`` a custom-derivative function keeps its rule around a rounded
    primal; with ``"inline"`` the interpreter's own inlining stands."""
    if custom_derivatives != "keep":
        return {}
    return {"custom_jvp_call": _rebuild_custom_jvp, "custom_vjp_call": _rebuild_custom_vjp}


def _bind(eqn):
    params = eqn.primitive.get_bind_params(eqn.params)
    return lambda *xs: eqn.primitive.bind(*xs, **params)


def _dense(eqn, invals):
    # MXTensor arguments go into a kept custom function decoded (its
    # matmuls stay in high precision there anyway).
    return [
        dequantize(x, v.aval.dtype) if isinstance(x, MXTensor) else x
        for x, v in zip(invals, eqn.invars, strict=True)
    ]


def _rebuild_custom_jvp(eqn, invals, a, plan):
    """A user's ``custom_jvp`` function: its primal with rounded ops, its own
    JVP rule for the tangents (at the rounded inputs)."""
    closed, original = eqn.params["call_jaxpr"], _bind(eqn)

    def primal(key, *xs):
        with keyed(key):
            return run_jaxpr(closed.jaxpr, closed.consts, xs, a + ("call_jaxpr",), plan)

    fn = jax.custom_jvp(primal)

    @fn.defjvp
    def _(primals, tangents):
        key, *xs = primals
        _, *ts = tangents
        return fn(key, *xs), jax.jvp(original, xs, ts)[1]

    return list(fn(_CONTEXT.get(), *_dense(eqn, invals)))


def _rebuild_custom_vjp(eqn, invals, a, plan):
    """A user's ``custom_vjp`` function: its primal with rounded ops, its own
    fwd / bwd rules for the cotangents (at the rounded inputs)."""
    closed, original = eqn.params["call_jaxpr"], _bind(eqn)

    def primal(key, *xs):
        with keyed(key):
            return run_jaxpr(closed.jaxpr, closed.consts, xs, a + ("call_jaxpr",), plan)

    fn = jax.custom_vjp(primal)

    def fwd(key, *xs):
        return fn(key, *xs), jax.vjp(original, *xs)[1]

    def bwd(pullback, cts):
        return (None, *pullback(cts))

    fn.defvjp(fwd, bwd)
    return list(fn(_CONTEXT.get(), *_dense(eqn, invals)))
