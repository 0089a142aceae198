"""Module substitution: put MX into an existing Flax model without editing it.

Rules map module paths (regular expressions, ``re.search`` on the path
joined with ``/``) to a :class:`~jaxmx.DotConfig`; the first rule that
matches a matmul module decides, and a ``None`` config keeps that module in
high precision. Only Flax's own injection points are used:

* nnx: the model is walked once and each matched layer's ``dot_general`` /
  ``einsum_op`` / ``conv_general_dilated`` / ``attention_fn`` is pointed at
  jaxmx, in place;
* linen: modules are created while the model runs, so substitution is a
  method interceptor (``flax.linen.intercept_methods``) active during
  ``init`` and ``apply`` of the returned :class:`MXLinen` wrapper.

Parameters are untouched either way: a checkpoint of the original model
loads into the substituted one and back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import threading
import warnings
import weakref
from collections.abc import Iterable, Mapping

from flax import linen as nn
from flax import nnx

from jaxmx.config import DotConfig
from jaxmx.flax import linen as mxlinen
from jaxmx.flax import nnx as mxnnx
from jaxmx.flax._ops import MXAttention, MXConv, MXDotGeneral
from jaxmx.flax.linen import as_config

__all__ = ["Rule", "Substitution", "MXLinen", "quantize_model", "substitution_of"]


@dataclasses.dataclass(frozen=True)
class Rule:
    """One substitution rule: module paths matching ``pattern`` get ``config``."""

    # Regular expression searched in the module path ("block_0/attn/query").
    pattern: str
    # DotConfig, preset name, or None (keep high precision).
    config: DotConfig | str | None

    def __post_init__(self):
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise ValueError(
                f"rule pattern {self.pattern!r} is not a regular expression: {err}"
            ) from None
        object.__setattr__(self, "config", as_config(self.config) if self.config else None)

    def matches(self, path: str) -> bool:
        return re.search(self.pattern, path) is not None


def _rules(rules) -> tuple[Rule, ...]:
    if isinstance(rules, (DotConfig, str)) or rules is None:
        return (Rule(".*", rules),)
    if isinstance(rules, Mapping):
        rules = list(rules.items())
    out = []
    for r in rules:
        if isinstance(r, Rule):
            out.append(r)
        elif isinstance(r, tuple) and len(r) == 2:
            out.append(Rule(*r))
        else:
            raise TypeError(f"a rule is a Rule or a (pattern, config) pair, got {r!r}")
    return tuple(out)


@dataclasses.dataclass
class Substitution:
    """Rules, and a record of what they did.

    Attributes:
      rules: the rules, in priority order.
      substituted: ``(path, layer type, config description)`` for every
        matmul module that now runs in MX.
      kept: ``(path, layer type)`` for matmul modules matched by a ``None``
        rule or by no rule at all (they stay in high precision).
    """

    rules: tuple[Rule, ...]
    substituted: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    kept: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    _hits: dict[int, int] = dataclasses.field(default_factory=dict)

    def match(self, path: str) -> Rule | None:
        for i, rule in enumerate(self.rules):
            if rule.matches(path):
                self._hits[i] = self._hits.get(i, 0) + 1
                return rule
        return None

    def record(self, path: str, kind: str, config: DotConfig | None) -> None:
        if config is None:
            entry = (path, kind)
            if entry not in self.kept:
                self.kept.append(entry)
        else:
            entry = (path, kind, config.describe())
            if entry not in self.substituted:
                self.substituted.append(entry)

    @property
    def unmatched(self) -> list[Rule]:
        """Rules that matched no matmul module."""
        return [r for i, r in enumerate(self.rules) if not self._hits.get(i)]

    def warn_unmatched(self) -> None:
        for rule in self.unmatched:
            warnings.warn(
                f"jaxmx substitution rule {rule.pattern!r} matched no matmul module",
                stacklevel=3,
            )

    def summary(self) -> str:
        """A table of what runs in MX and what stays in high precision."""
        lines = [f"{len(self.substituted)} matmul modules in MX, {len(self.kept)} kept"]
        lines += [f"  MX    {p:<40} {k:<30} {d}" for p, k, d in self.substituted]
        lines += [f"  high  {p:<40} {k}" for p, k in self.kept]
        lines += [f"  rule {r.pattern!r} matched nothing" for r in self.unmatched]
        return "\n".join(lines)


# --------------------------------------------------------------------------
# nnx
# --------------------------------------------------------------------------


def _path_str(path: Iterable) -> str:
    return "/".join(str(p) for p in path)


def _substitute_nnx(model: nnx.Module, sub: Substitution) -> nnx.Module:
    kinds = tuple(mxnnx.INJECTION_POINTS)
    for path, module in nnx.iter_modules(model):
        if not isinstance(module, kinds):
            continue
        p = _path_str(path)
        rule = sub.match(p)
        cfg = None if rule is None else rule.config
        changed = mxnnx.configure(module, cfg)
        if changed and isinstance(module, nnx.MultiHeadAttention):
            cfg = cfg.for_activations()  # what its q.k and p.v use
        sub.record(p, type(module).__name__, cfg if changed else None)
    return model


# --------------------------------------------------------------------------
# linen
# --------------------------------------------------------------------------

# linen field that holds each layer's matmul, its Flax default, and the MX value.
_LINEN_FIELDS = (
    (nn.DenseGeneral, "dot_general", None, MXDotGeneral),
    (nn.Dense, "dot_general", None, MXDotGeneral),
    (nn.Conv, "conv_general_dilated", None, MXConv),
)


class _Swap(threading.local):
    """Guards against re-entering the interceptor for the same module."""

    active: set[int]

    def __init__(self):
        self.active = set()


_swap = _Swap()


@contextlib.contextmanager
def _swapped(module, fields: dict):
    old = {f: getattr(module, f) for f in fields}
    for f, v in fields.items():
        object.__setattr__(module, f, v)
    try:
        yield
    finally:
        for f, v in old.items():
            object.__setattr__(module, f, v)


def _linen_interceptor(sub: Substitution):
    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or id(module) in _swap.active:
            return next_fun(*args, **kwargs)
        is_mx_class = isinstance(
            module,
            (
                mxlinen.Dense,
                mxlinen.DenseGeneral,
                mxlinen.Conv,
                mxlinen.Einsum,
                mxlinen.MultiHeadDotProductAttention,
            ),
        )
        kind = _linen_kind(module)
        if kind is None or is_mx_class:
            return next_fun(*args, **kwargs)
        path = _path_str(module.path)
        rule = sub.match(path)
        cfg = None if rule is None else rule.config
        sub.record(
            path,
            type(module).__name__,
            cfg.for_activations() if cfg is not None and kind == "attention" else cfg,
        )
        if cfg is None:
            return next_fun(*args, **kwargs)
        if kind == "einsum":
            return mxlinen.einsum_forward(module, *args, config=cfg, **kwargs)
        fields = _linen_fields(module, kind, cfg)
        _swap.active.add(id(module))
        try:
            with _swapped(module, fields):
                return next_fun(*args, **kwargs)
        finally:
            _swap.active.discard(id(module))

    return interceptor


def _linen_kind(module) -> str | None:
    if isinstance(module, nn.Einsum):
        return "einsum"
    if isinstance(module, nn.MultiHeadDotProductAttention):
        return "attention"
    if isinstance(module, (nn.Dense, nn.DenseGeneral, nn.Conv)):
        return "matmul"
    return None


def _linen_fields(module, kind: str, cfg: DotConfig) -> dict:
    if kind == "attention":
        # The projections are DenseGeneral children, matched on their own paths.
        if module.attention_fn is not nn.dot_product_attention:
            raise ValueError(
                f"{_path_str(module.path)}: MultiHeadDotProductAttention has a custom "
                "attention_fn; jaxmx cannot quantize its matmuls"
            )
        return {"attention_fn": MXAttention(cfg.for_activations())}
    for cls, field, default, make in _LINEN_FIELDS:
        if isinstance(module, cls):
            if getattr(module, field) is not default:
                raise ValueError(
                    f"{_path_str(module.path)}: {type(module).__name__} has a custom {field}; "
                    "jaxmx cannot replace it"
                )
            if getattr(module, f"{field}_cls", None) is not None:
                raise ValueError(
                    f"{_path_str(module.path)}: {type(module).__name__} has a custom {field}_cls"
                )
            return {field: make(cfg)}
    raise AssertionError(kind)  # unreachable: _linen_kind filtered


class MXLinen:
    """A linen model whose matmuls run in MX: ``init`` and ``apply`` as the model's.

    Made by :func:`quantize_model`; attributes other than ``init``,
    ``apply``, ``substitution`` and ``module`` are the wrapped module's.
    """

    def __init__(self, module: nn.Module, substitution: Substitution):
        self.module = module
        self.substitution = substitution
        self._warned = False

    @contextlib.contextmanager
    def _active(self):
        with nn.intercept_methods(_linen_interceptor(self.substitution)):
            yield
        if not self._warned:
            self._warned = True
            self.substitution.warn_unmatched()

    def init(self, *args, **kwargs):
        with self._active():
            return self.module.init(*args, **kwargs)

    def apply(self, *args, **kwargs):
        with self._active():
            return self.module.apply(*args, **kwargs)

    def init_with_output(self, *args, **kwargs):
        with self._active():
            return self.module.init_with_output(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.module, name)

    def __repr__(self) -> str:
        return f"MXLinen({self.module!r}, rules={list(self.substitution.rules)})"


def quantize_model(model, rules, *, warn: bool = True):
    """Swaps the matmuls of a Flax model (linen or nnx) for MX ones, by rules.

    Args:
      model: a ``flax.linen.Module`` or a ``flax.nnx.Module``.
      rules: ``[(pattern, config), ...]`` (or :class:`Rule` objects, or a
        dict), tried in order: the first whose regular expression is found in
        a matmul module's path (``"blocks/0/attn/query"``) decides; a
        ``None`` config keeps that module in high precision; modules no rule
        matches stay in high precision. A single DotConfig or preset name
        means ``[(".*", config)]``.
      warn: warn about rules that matched no matmul module (nnx: at once;
        linen: after the first ``init``/``apply``).

    Returns:
      nnx: the same model, modified in place. linen: an :class:`MXLinen`
      whose ``init``/``apply`` run the model with MX matmuls. Either way,
      ``jaxmx.flax.substitution_of(result)`` tells what was substituted.

    Matmul modules: linen ``Dense``, ``DenseGeneral``, ``Einsum``, ``Conv``,
    ``MultiHeadDotProductAttention`` (its q.k and p.v; the projections are
    DenseGeneral children); nnx ``Linear``, ``LinearGeneral``, ``Einsum``,
    ``Conv``, ``MultiHeadAttention``. ``Embed`` is a lookup, not a matmul.

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxmx
    >>> from jaxmx.flax import quantize_model, substitution_of
    >>> class MLP(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         return nn.Dense(4, name="head")(nn.relu(nn.Dense(64, name="hidden")(x)))
    >>> mx = quantize_model(MLP(), [("head", None), (".*", "mxfp8")])
    >>> params = mx.init(jax.random.key(0), jnp.ones((2, 32)))
    >>> print(substitution_of(mx).summary())  # doctest: +NORMALIZE_WHITESPACE +ELLIPSIS
    1 matmul modules in MX, 1 kept
      MX    hidden        Dense     fwd mxfp8_e4m3 x mxfp8_e4m3; dgrad ...
      high  head          Dense
    """
    sub = Substitution(_rules(rules))
    if isinstance(model, nnx.Module):
        _substitute_nnx(model, sub)
        _SUBSTITUTIONS[model] = sub
        if warn:
            sub.warn_unmatched()
        return model
    if isinstance(model, nn.Module):
        wrapped = MXLinen(model, sub)
        wrapped._warned = not warn
        return wrapped
    raise TypeError(
        f"quantize_model takes a flax.linen or flax.nnx Module, got {type(model).__name__}"
    )


_SUBSTITUTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def substitution_of(model) -> Substitution:
    """The :class:`Substitution` record of a model made by :func:`quantize_model`."""
    if isinstance(model, MXLinen):
        return model.substitution
    try:
        return _SUBSTITUTIONS[model]
    except (KeyError, TypeError):
        raise ValueError("this model did not come from jaxmx.flax.quantize_model") from None
