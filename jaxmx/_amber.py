"""Amber Pruner's weight factors computed once per weight, for :func:`jaxmx.intercept` rules.

``NMSparsity(score="amber")`` scores an activation by its magnitude times a
robust norm of the weight slice it multiplies (:func:`jaxmx.sparsity.amber_factor`),
which takes quantiles of the whole weight: a sort of every weight on every
call. The weights do not change between calls, and the paper computes the
factors offline; :func:`precompute_amber` does so once per weight and
returns rules that carry them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from jaxmx._paths import axis_function, path_string
from jaxmx.config import DotConfig
from jaxmx.quantize import dequantize
from jaxmx.rules import Rule, RulesLike, parse_rules
from jaxmx.sparsity import AmberFactor
from jaxmx.tensor import MXTensor

__all__ = ["precompute_amber"]


def precompute_amber(
    rules: RulesLike,
    params: Any,
    *,
    axes: Mapping[str, int] | Callable[[str, jax.Array], int | None] | None = None,
) -> tuple[Rule, ...]:
    """``rules`` with Amber Pruner's weight factors computed once per weight.

    For each rule whose config has ``lhs_sparsity=NMSparsity(score="amber")``
    (the activation sparse, the weight the right operand, as
    :func:`jaxmx.intercept` gives roles), every weight of ``params`` whose
    path the rule's pattern matches gets a rule of its own, placed just before
    it: the same config with the weight's factors computed now
    (``NMSparsity.factor``, an :class:`~jaxmx.sparsity.AmberFactor`), its
    pattern the weight's path (``(^|/)params/.../kernel$``, which only the
    matmuls reading that weight match). The matmuls then multiply by the
    stored factors instead of sorting the weight on every call; the factors
    are the same numbers (:func:`jaxmx.sparsity.amber_factor` of the weight,
    in float32), so the masks and outputs are too. Other rules are returned
    as they are.

    Args:
      rules: the rules :func:`jaxmx.intercept` would take.
      params: the argument holding the weights, as the intercepted function
        takes it (``variables`` of ``model.apply(variables, x)``), so that
        leaf paths are the argument paths intercept matches; MXTensor
        weights are decoded first, as the matmul decodes them for the score.
      axes: the contraction axis of weights the naming convention of
        :func:`jaxmx.params.contraction_axis` does not cover, as in
        :func:`jaxmx.quantize_params` (a dict ``{pattern: axis}`` or a
        function ``(path, array) -> axis``).

    Returns:
      The rules, with one per weight before each amber rule. The amber rule
      itself stays, for the matmuls that read no weight of ``params``; when
      there are none, :func:`jaxmx.intercept` warns that it matched nothing
      (``warn=False`` silences it).

    A matmul that reads a weight reshaped, transposed or sliced (a
    ``DenseGeneral`` kernel viewed as 2-D, a scanned stack of layers), so
    that its shape or contracted axes differ from the stored weight's,
    raises a ``ValueError`` naming the weight rather than use a factor that
    does not fit; leave such weights out of the rules given here. The factors
    are those of the weight as stored: a model that casts its weights (a
    layer ``dtype=bfloat16``) before the matmul scores with the float32
    weight's factors, where computing them on each call would read the cast.

    >>> import jax, jax.numpy as jnp, jaxmx
    >>> amber = jaxmx.NMSparsity(8, 16, score="amber")
    >>> params = {"up": {"kernel": jax.random.normal(jax.random.key(0), (64, 32))}}
    >>> rules = jaxmx.precompute_amber([("up", jaxmx.DotConfig(lhs_sparsity=amber))], params)
    >>> [(r.pattern, r.config.lhs_sparsity.describe()) for r in rules]
    [('(^|/)up/kernel$', '8:16 amber (precomputed)'), ('up', '8:16 amber')]
    >>> # the rule "up" is kept for matmuls reading no precomputed weight; here none does
    >>> f = jaxmx.intercept(lambda p, x: x @ p["up"]["kernel"], rules, warn=False)
    >>> f(params, jnp.ones((4, 64))).shape
    (4, 32)
    """
    rules = parse_rules(rules)
    axis_of = axis_function(axes)
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, MXTensor))[
        0
    ]
    weights = [(path_string(path), leaf) for path, leaf in flat if _is_weight(leaf)]
    out: list[Rule] = []
    for rule in rules:
        cfg = rule.config
        sp = cfg.lhs_sparsity if isinstance(cfg, DotConfig) else None
        uncached = sp is not None and sp.score == "amber" and sp.factor is None
        if isinstance(cfg, DotConfig) and sp is not None and uncached:
            for p, w in weights:
                if not rule.matches(p):
                    continue
                axis = axis_of(p, w)
                if axis is None:
                    continue
                if not -w.ndim <= axis < w.ndim:
                    raise ValueError(f"axis {axis} of {p} is out of range for shape {w.shape}")
                factor = _factor(w, int(axis) % w.ndim, sp.amber_trim, p)
                config = cfg.replace(lhs_sparsity=sp.replace(factor=factor))
                out.append(Rule(f"(^|/){re.escape(p)}$", config))
        out.append(rule)
    return tuple(out)


def _is_weight(x: Any) -> bool:
    if isinstance(x, MXTensor):
        return True
    return (
        hasattr(x, "dtype")
        and np.ndim(x) >= 1
        and jax.numpy.issubdtype(x.dtype, jax.numpy.floating)
    )


def _factor(w: Any, axis: int, trim: float, path: str) -> AmberFactor:
    """The factors of ``w`` contracted over ``axis``, as the matmul computes them."""
    if isinstance(w, MXTensor):
        w = dequantize(w, np.float32)
    return AmberFactor.of(w, (axis,), trim, path)
