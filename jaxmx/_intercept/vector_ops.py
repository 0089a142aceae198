"""Vector-op precision emulation for :func:`jaxmx.intercept` (``vector_ops=``).

Every elementwise op and reduction of the traced program gets its floating
outputs rounded to a narrower float (bfloat16, float16, ...), as the MX
paper's emulator and bfloat16 training studies run their vector units; the
matmuls keep following their rules. Three parts:

* :class:`VectorOps`, the user's record, validated on construction;
* :func:`plan_vector_ops`, which walks the traced jaxpr once and decides
  which equations are rounded (a numbered *site* each), which loops carry an
  iteration counter, and what the coverage record reports;
* :class:`~jaxmx._intercept.vector_run.VectorPlan`, what the interpreter
  (``run.py``) calls at run time: ``round`` after a site's equation, the
  loop counters, and the rebuilders of ``custom_jvp`` / ``custom_vjp``
  functions that keep their own rules.

Keys (stochastic rounding): the sites and loops of a program are numbered
in program order, depth first. Site ``n`` rounds with
``fold_in(context, n)``, where ``context`` is the user's key at top level
and, inside iteration ``i`` of loop ``m``, ``fold_in(fold_in(outer, m), i)``;
``i`` is a counter the rebuilt ``scan`` / ``while_loop`` carries (iterations
run, whatever the scan direction). An equation with several float outputs
rounds output ``k`` with ``fold_in(site_key, k)``.

Derivatives: each rounding is ``round_to`` in the forward pass with the
identity as its derivative (straight-through), so ``jax.grad`` of the
intercepted function is the VJP of the rounded program with rounding taken
as the identity: the backward ops run at the rounded forward values, in the
program's own dtypes (not rounded). A user's ``custom_jvp`` / ``custom_vjp``
function runs its primal with rounded ops and keeps its own derivative rule,
applied at its (rounded) inputs.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore
from jax.extend import source_info_util as siu

from jaxmx._intercept.plan import _jaxmx_op
from jaxmx._intercept.prims import P
from jaxmx._intercept.vector_coverage import VectorCoverage
from jaxmx._intercept.vector_run import VectorPlan, rebuilders
from jaxmx.formats import ElementFormat
from jaxmx.quantize import check_rounding
from jaxmx.rounding import _element_format

__all__ = ["VectorCoverage", "VectorOps", "as_vector_ops", "plan_vector_ops"]

# The default vector ops: float arithmetic, transcendental functions,
# reductions and casts. Left out: data movement, which is exact (reshape,
# transpose, broadcast_in_dim, slicing, gather, concatenate, pad, select_n,
# copy, stop_gradient, sort), integer and boolean ops, comparisons, iota,
# the matmuls (they follow their rules), and reduce_precision (a rounding
# itself). A reduction's result is rounded once: its accumulation runs in
# the input dtype, as in the emulators this follows.
DEFAULT_OPS = frozenset(
    {
        # arithmetic
        *("add", "add_any", "sub", "mul", "div", "rem", "neg", "abs", "sign"),
        *("max", "min", "clamp", "pow", "integer_pow", "square", "sqrt", "rsqrt", "cbrt"),
        *("floor", "ceil", "round"),
        # transcendental
        *("exp", "exp2", "expm1", "log", "log1p", "tanh", "logistic", "erf", "erfc", "erf_inv"),
        *("sin", "cos", "tan", "asin", "acos", "atan", "atan2", "sinh", "cosh"),
        *("asinh", "acosh", "atanh", "lgamma", "digamma"),
        # reductions
        *("reduce_sum", "reduce_max", "reduce_min", "reduce_prod"),
        *("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"),
        *("reduce_window_sum", "reduce_window_max", "reduce_window_min"),
        # casts (to a float dtype; integer outputs are never rounded)
        "convert_element_type",
    }
)
# Equations whose bodies the interpreter enters: their ops are rounded one by one.
_ENTERED = frozenset(
    {
        "jit",
        "closed_call",
        "call",
        "scan",
        "while",
        "cond",
        "shard_map",
        "custom_jvp_call",
        "custom_vjp_call",
        P.remat_p.name,
    }
)
_KNOWN = frozenset(
    p.name for p in vars(P).values() if isinstance(p, jcore.Primitive) and p.name not in _ENTERED
)
_ROUNDABLE = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))
# Output dtypes already on a format's grid: rounding them is the identity.
_NATIVE = {"bfloat16": np.dtype(jnp.bfloat16), "float16": np.dtype(np.float16)}


@dataclasses.dataclass(frozen=True)
class VectorOps:
    """Vector-op precision for :func:`jaxmx.intercept` (``vector_ops=``).

    Every equation of the traced program whose primitive is in ``ops`` has
    its floating outputs rounded with :func:`jaxmx.round_to` to ``format``,
    inside ``scan``, ``while_loop``, ``cond``, ``jit``, ``checkpoint`` and
    ``custom_jvp`` / ``custom_vjp`` bodies too; matmuls follow the rules.

    Attributes:
      format: a float format :func:`jaxmx.round_to` accepts: ``"bfloat16"``,
        ``"float16"``, an element format name (``"fp8_e4m3"``), an
        :class:`~jaxmx.ElementFormat`.
      rounding: ``"nearest_even"`` or ``"stochastic"`` (also
        ``"nearest_away"``, ``"toward_zero"``).
      key: the PRNG key stochastic rounding draws from (required for it,
        refused otherwise). Each rounded equation, and each loop iteration,
        folds in its own number (see docs/intercept.md). It may be a traced
        key: build the intercepted function inside the jitted step to
        round with a new key each step.
      ops: primitive names to round (any iterable of strings); None means
        :attr:`DEFAULT_OPS`. Add ``"dot_general"`` to round matmul outputs
        too, or ``"select_n"`` for ``jnp.where``.

    >>> import jax.numpy as jnp, jaxmx
    >>> f = jaxmx.intercept(lambda x: jnp.exp(x) / 3, [], vector_ops="bfloat16")
    >>> f(jnp.float32(1.0))  # exp rounds to 2.71875, the division to 0.90625
    Array(0.90625, dtype=float32)
    >>> print(f.coverage.vector_ops.counts)
    2 vector ops rounded to bfloat16 (nearest_even)
    """

    format: Any
    rounding: str = "nearest_even"
    key: Any = dataclasses.field(default=None, compare=False)
    ops: Any = None

    DEFAULT_OPS: ClassVar[frozenset[str]] = DEFAULT_OPS

    def __post_init__(self):
        try:
            _element_format(self.format)
        except (TypeError, ValueError) as err:
            raise type(err)(f"VectorOps format: {err}") from None
        check_rounding(self.rounding, self.key, "VectorOps rounding")
        if self.key is not None:
            _check_key(self.key)
        if self.ops is not None:
            object.__setattr__(self, "ops", _check_ops(self.ops))

    @property
    def element(self) -> ElementFormat:
        """The element format outputs are rounded to."""
        return _element_format(self.format)

    @property
    def primitives(self) -> frozenset[str]:
        """The primitive names whose outputs are rounded."""
        return DEFAULT_OPS if self.ops is None else self.ops


def _check_key(key) -> None:
    dtype = getattr(key, "dtype", None)
    shape = tuple(getattr(key, "shape", ()))
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and shape == ():
        return
    if dtype == np.dtype(np.uint32) and shape == (2,):
        return
    raise TypeError(
        "VectorOps key must be one PRNG key: jax.random.key(seed) (or a raw uint32[2] "
        f"jax.random.PRNGKey), got {key!r}"
    )


def _check_ops(ops) -> frozenset[str]:
    if isinstance(ops, str) or not hasattr(ops, "__iter__"):
        raise TypeError(
            f"VectorOps ops must be a set of primitive names such as {{'exp', 'add'}}, got {ops!r}"
        )
    names = frozenset(ops)
    for name in sorted(names, key=str):
        if not isinstance(name, str):
            raise TypeError(f"VectorOps ops holds {name!r}; it takes primitive names (strings)")
        if name in _ENTERED:
            raise ValueError(
                f"VectorOps ops: {name!r} is a control-flow or call primitive; the ops inside "
                f"it are rounded one by one. Not allowed: {', '.join(sorted(_ENTERED))}"
            )
        if name not in _KNOWN:
            near = difflib.get_close_matches(name, sorted(_KNOWN), n=3)
            hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
            raise ValueError(
                f"VectorOps ops: unknown primitive name {name!r}{hint} Allowed: the names of "
                "jax.extend.core.primitives (e.g. the defaults, VectorOps.DEFAULT_OPS: "
                f"{', '.join(sorted(DEFAULT_OPS))})"
            )
    return names


def as_vector_ops(value) -> VectorOps | None:
    """``intercept``'s ``vector_ops`` argument as a :class:`VectorOps` (or None)."""
    if value is None or isinstance(value, VectorOps):
        return value
    if isinstance(value, (str, ElementFormat)):
        return VectorOps(value)
    raise TypeError(
        "vector_ops must be None, a format name such as 'bfloat16', or "
        f"jaxmx.VectorOps(format, rounding=..., key=..., ops=...), got {value!r}"
    )


# --------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------


def plan_vector_ops(jaxpr, vops: VectorOps, planner, custom_derivatives: str):
    """Walks the traced (open) ``jaxpr``; returns ``(VectorPlan, VectorCoverage, rebuild)``.

    ``planner`` is the matmul :class:`~jaxmx._intercept.plan.Planner` (its
    traversal of sub-jaxprs is reused); ``rebuild`` holds the addresses of
    the equations the interpreter must rebuild to reach the rounded ones.
    """
    walker = _Walker(vops, planner)
    walker.walk(jaxpr, ())
    elem = vops.element
    keyed = vops.rounding == "stochastic"
    vplan = VectorPlan(
        elem,
        vops.rounding,
        dict(walker.sites),
        dict(walker.loops) if keyed else {},
        keyed,
        rebuilders(custom_derivatives),
    )
    coverage = VectorCoverage(
        format=elem.name,
        rounding=vops.rounding,
        rounded=tuple(sorted(walker.rounded.items())),
        left_alone=tuple(sorted(walker.left.items())),
    )
    return vplan, coverage, frozenset(walker.rebuild)


class _Walker:
    def __init__(self, vops: VectorOps, planner):
        self.ops = vops.primitives
        self.native = _NATIVE.get(vops.element.name)
        self.planner = planner
        self.count = 0
        self.sites: dict[tuple, tuple[int, tuple[int, ...]]] = {}
        self.loops: dict[tuple, int] = {}
        self.rebuild: set[tuple] = set()
        self.rounded: collections.Counter = collections.Counter()
        self.left: collections.Counter = collections.Counter()

    def _number(self) -> int:
        self.count += 1
        return self.count - 1

    def walk(self, jaxpr, addr):
        for i, eqn in enumerate(jaxpr.eqns):
            a = addr + (i,)
            name = eqn.primitive.name
            floats = [
                k
                for k, v in enumerate(eqn.outvars)
                if jnp.issubdtype(getattr(v.aval, "dtype", np.int32), jnp.floating)
            ]
            if (op := _jaxmx_op(eqn)) is not None:
                if floats:
                    self.left[f"jaxmx {op}" if op else name] += 1
                continue
            if name in _ENTERED:
                if name in ("scan", "while"):
                    self.loops[a] = self._number()
                ns, ins = siu.new_name_stack(), [""] * len(eqn.invars)
                for c in self.planner._children(eqn, ns, ins):
                    self.walk(c.jaxpr, a + (c.key,))
                continue
            if name not in self.ops or not floats:
                if floats:
                    self.left[name] += 1
                continue
            dtypes = [np.dtype(eqn.outvars[k].aval.dtype) for k in floats]
            bad = [dt for dt in dtypes if dt not in _ROUNDABLE]
            for dt in bad:
                self.left[f"{name}[{dt}]"] += 1
            if len(bad) == len(floats):
                continue
            self.rounded[name] += 1
            todo = tuple(
                k
                for k, dt in zip(floats, dtypes, strict=True)
                if dt in _ROUNDABLE and dt != self.native
            )
            if not todo:  # already in the format
                continue
            self.sites[a] = (self._number(), todo)
            for k in range(1, len(a)):
                self.rebuild.add(a[:k])
