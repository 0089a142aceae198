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

import dataclasses
import functools
import re
import sys
import warnings
from collections.abc import Callable
from typing import Any, Literal

import jax
import numpy as np
from jax.extend import source_info_util as siu

from jaxmx._intercept.coverage import Coverage, MatmulSite
from jaxmx._intercept.plan import Planner
from jaxmx._intercept.run import Plan, run_jaxpr
from jaxmx._intercept.vector_coverage import VectorCoverage
from jaxmx._intercept.vector_ops import VectorOps, as_vector_ops, plan_vector_ops
from jaxmx._intercept.vector_run import keyed
from jaxmx.rules import RulesLike, parse_rules
from jaxmx.sparse_tensor import NMSparseTensor
from jaxmx.tensor import MXTensor

__all__ = ["Coverage", "MatmulSite", "VectorCoverage", "VectorOps", "intercept"]


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)) or _is_mx(x)


def _is_mx(x) -> bool:
    return isinstance(x, (MXTensor, NMSparseTensor))


def _aval_key(x):
    if _is_mx(x):
        leaves, tree = jax.tree_util.tree_flatten(x)
        return ("mx", tree, tuple(_aval_key(leaf) for leaf in leaves))
    return x if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x)


def _traceable(x):
    """What ``fn`` is traced with: an MXTensor (or NMSparseTensor) argument as
    the array it stands for."""
    return jax.ShapeDtypeStruct(x.shape, x.dtype) if _is_mx(x) else x


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
    plan: Plan
    coverage: Coverage
    out_tree: Any
    out_mask: list
    out_static: list
    keepalive: Any  # static leaves keyed by id(), kept so the ids stay unique
    planner: Planner  # the planner of this trace (its sites' addresses, for jaxmx.ptq)


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

    def __init__(
        self, fn, rules, custom_derivatives, weights, path_root, warn, origin, vector_ops=None
    ):
        self.fn = fn
        self.vector_ops = vector_ops
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
        vec = "" if self.vector_ops is None else f", vector_ops={self.vector_ops!r}"
        return f"intercept({getattr(self.fn, '__name__', self.fn)!r}, rules={patterns}{vec})"

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
        with keyed(None if self.vector_ops is None else self.vector_ops.key):
            outs = run_jaxpr(traced.closed.jaxpr, traced.closed.consts, arrays, (), traced.plan)
        it = iter(outs)
        leaves = [
            next(it) if m else s for m, s in zip(traced.out_mask, traced.out_static, strict=True)
        ]
        return jax.tree_util.tree_unflatten(traced.out_tree, leaves)

    def _traced(self, args, kwargs):
        # MXTensor arguments stay whole: fn is traced with the arrays they
        # stand for, and the interpreter hands the MXTensors themselves to
        # the matmuls that contract along their blocks (scale propagation).
        # An N:M-sparse weight (NMSparseTensor) stays compact too: the
        # interpreter densifies it to its MXTensor where an op reads it.
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
        planner = Planner(self.rules, self.custom_derivatives, self.weights, self.path_root)
        planner.mx_args = {
            src: x.format.name for src, x in zip(srcs, arrays, strict=True) if _is_mx(x)
        }
        planner.walk(closed.jaxpr, [""] * len(closed.consts) + srcs, siu.new_name_stack())
        vector, vector_coverage, rebuild = None, None, frozenset(planner.rebuild)
        if self.vector_ops is not None:
            vector, vector_coverage, more = plan_vector_ops(
                closed.jaxpr, self.vector_ops, planner, self.custom_derivatives
            )
            rebuild |= more
        coverage = Coverage(
            rules=tuple((r.pattern, r.config) for r in self.rules),
            sites=tuple(planner.sites),
            unmatched=tuple(r.pattern for i, r in enumerate(self.rules) if not planner.hits[i]),
            vector_ops=vector_coverage,
        )
        plan = Plan(dict(planner.decisions), rebuild, vector)
        keepalive = [x for x, m in zip(leaves, mask, strict=True) if not m]
        return _Traced(
            closed, plan, coverage, out["tree"], out["mask"], out["static"], keepalive, planner
        )

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
    rules: RulesLike,
    *,
    custom_derivatives: Literal["keep", "inline"] = "keep",
    weights: str | None = None,
    path_root: str | None = None,
    warn: bool = True,
    vector_ops: str | VectorOps | None = None,
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
      vector_ops: vector-op precision emulation. None (the default) leaves
        every op but the matmuls as it is; a format name (``"bfloat16"``,
        ``"float16"``, anything :func:`jaxmx.round_to` takes) or a
        :class:`VectorOps` record rounds the floating outputs of every
        elementwise op and reduction (``VectorOps.DEFAULT_OPS``, or its
        ``ops``) to that format, inside loops, conds and custom-derivative
        functions too, each exactly as ``round_to(op(inputs), format)``;
        the matmuls follow ``rules``. Under ``jax.grad`` each rounding's
        derivative is the identity (straight-through) and the backward ops
        are not rounded. ``coverage.vector_ops`` reports what was rounded.

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
    vector_ops = as_vector_ops(vector_ops)
    return Intercepted(
        fn, rules, custom_derivatives, weights, path_root, warn, _caller(), vector_ops
    )
