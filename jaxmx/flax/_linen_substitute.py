"""linen substitution: :class:`MXLinen`, a module that runs a model with MX matmuls.

linen creates submodules while the model runs, so there is nothing to edit
ahead of time. :class:`MXLinen` is a real ``nn.Module`` that wraps the model:
it binds the model to its own scope (so the variables are exactly the
model's, at the same paths), and runs each call under a method interceptor
(``nn.intercept_methods``) that points every matmul layer's injection point
at jaxmx for the duration of that layer's call. Being a module, it works
wherever a module does: ``init``, ``apply``, ``bind``, ``tabulate``,
``init_with_output``, and inside another module.

Why a wrapper and not a subclass of the model's class (as qwix builds): a
subclass would have to re-wrap each of the user's methods through linen's
private method-wrapping machinery, while the wrapper needs only public API
(``Module.clone(parent=scope)``, ``nn.share_scope``, ``nn.intercept_methods``).
The cost is that ``isinstance(mx, ModelClass)`` is False.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import types
from typing import Any

import jax
from flax import linen as nn

from jaxmx.flax import linen as mxlinen
from jaxmx.flax._ops import MX_OPS, MXAttention, MXConv, MXDotGeneral, as_config
from jaxmx.flax._record import Rule, Substitution, kept_reason, parse_rules

__all__ = ["MXLinen"]

# The field each linen layer takes its matmul from, how jaxmx fills it, and
# Flax's default. MultiHeadDotProductAttention's projections are
# DenseGeneral children, matched on their own paths; its field here is the
# q.k / p.v pair, whose operands are both activations.
_FIELDS = (
    (nn.DenseGeneral, "dot_general", MXDotGeneral, None),
    (nn.Dense, "dot_general", MXDotGeneral, None),
    (nn.Conv, "conv_general_dilated", MXConv, None),
    (
        nn.MultiHeadDotProductAttention,
        "attention_fn",
        lambda cfg: MXAttention(cfg.for_activations()),
        nn.dot_product_attention,
    ),
)

# linen methods that multiply but call lax/jnp directly: no injection point,
# so they stay in high precision and the record says so.
_NO_INJECTION_POINT = (
    (nn.ConvTranspose, "__call__", "lax.conv_transpose"),
    (nn.ConvLocal, "__call__", "lax.conv_general_dilated_local"),
    (nn.Embed, "attend", "jnp.dot"),
)


@dataclasses.dataclass(frozen=True)
class _Held:
    """The wrapped model, in a box linen does not look into.

    A module in a field would be adopted as a child named after the field,
    and that name would be reserved in the scope the model shares with the
    wrapper: a model with a submodule of the same name would then fail.
    """

    module: nn.Module


class _Active(threading.local):
    """The :class:`MXLinen` calls in progress, innermost last."""

    def __init__(self):
        self.stack: list[_Call] = []


_active = _Active()


class MXLinen(nn.Module):
    """A linen model whose matmuls run in MX, chosen by rules; a real ``nn.Module``.

    Made by :func:`jaxmx.flax.quantize_model`. Its variables are exactly the
    wrapped model's (same names, shapes, dtypes, paths), so a checkpoint of
    the model loads into it and back. Calling it (``__call__``, or any other
    method of the model by name: ``apply(..., method="encode")``,
    ``bind(v).encode(x)``) runs the model with the substituted matmuls;
    nested in another module it behaves as the model would there. Plain
    fields of the model (``mx.features``) read through; its submodules do not.

    Rules are matched against paths relative to the model: the model itself
    is ``""``, its child ``"block_0"``, wherever the wrapper sits. When
    wrappers nest, the innermost one decides for the modules inside it.

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from jaxmx.flax import quantize_model
    >>> class Net(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         body = quantize_model(nn.Dense(16), "mxfp8")  # nested: path "" is the Dense
    ...         return nn.Dense(2)(nn.relu(body(x)))
    >>> x = jnp.ones((4, 32))
    >>> variables = Net().init(jax.random.key(0), x)
    >>> jax.tree.map(jnp.shape, variables["params"]["Dense_0"])
    {'bias': (16,), 'kernel': (32, 16)}
    """

    # The wrapped model (boxed; see _Held). quantize_model boxes it.
    model: _Held
    # The rules, in priority order.
    rules: tuple[Rule, ...] = ()
    # The record of what ran; shared by every clone linen makes of the wrapper.
    substitution: Substitution | None = dataclasses.field(
        default=None, compare=False, hash=False, repr=False
    )
    # True (quantize_model's scope="all"): a top-level init/apply also
    # intercepts plain-function matmuls; False ("modules"): only the matmul
    # modules are substituted. (Not named `scope`: linen modules own that.)
    whole_program: bool = True

    def __post_init__(self):
        if isinstance(self.model, nn.Module):
            object.__setattr__(self, "model", _Held(self.model))
        if not isinstance(self.model, _Held):
            raise TypeError(f"MXLinen wraps a flax.linen Module, got {self.model!r}")
        object.__setattr__(self, "rules", parse_rules(self.rules))
        if self.substitution is None:
            object.__setattr__(self, "substitution", Substitution(self.rules))
        super().__post_init__()

    @property
    def module(self) -> nn.Module:
        """The wrapped model, as given (unbound, running in high precision)."""
        return self.model.module

    def setup(self):
        model = self.model.module
        if model.scope is None:
            # Bound to this module's scope itself, not to a child scope: the
            # variables land exactly where the model alone would put them.
            model = model.clone(parent=self.scope)
        else:
            # Made inside a compact method, the model already has its scope
            # (its auto name, e.g. Dense_0); the wrapper takes that one.
            nn.share_scope(self, model)
        object.__setattr__(self, "_bound_model", model)  # not a named child

    def __call__(self, *args, **kwargs):
        return self._run("__call__", args, kwargs)

    def _run(self, method: str, args: tuple, kwargs: dict):
        model = self._bound_model
        call = _Call(self.substitution, tuple(model.path))
        _active.stack.append(call)
        try:
            with nn.intercept_methods(call.intercept):
                out = getattr(model, method)(*args, **kwargs)
        finally:
            _active.stack.pop()
        self.substitution.warn_unmatched()
        return out

    @nn.nowrap
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            held = self.__dict__.get("model")
            if not isinstance(held, _Held) or name.startswith("_"):
                raise
        model = held.module
        attr = getattr(type(model), name, None)
        if callable(attr) and not isinstance(attr, type) and not hasattr(nn.Module, name):

            def method(wrapper, *args, **kwargs):
                return wrapper._run(name, args, kwargs)

            method.__name__ = name
            return types.MethodType(method, self)
        fields = {f.name for f in dataclasses.fields(model)} - {"parent", "name"}
        value = getattr(model, name, None) if name in fields else None
        if name not in fields or _has_module(value):
            raise AttributeError(
                f"MXLinen reads through the wrapped {type(model).__name__}'s methods (run "
                f"with MX) and plain fields only; {name!r} is neither"
            )
        return value

    # Called at the top (init/apply), the wrapper also runs the whole call
    # under jaxmx.intercept with the same rules, so matmuls in plain functions
    # inside the model (an attention's jnp.einsum) are in MX too, not only
    # the matmul modules. Nested in another module or bound, only modules are
    # substituted: intercept the outer apply for the rest.

    @nn.nowrap
    def init(self, *args: Any, method: Any = None, **kwargs: Any) -> Any:
        return self._whole("init")(*args, method=self._method(method), **kwargs)

    @nn.nowrap
    def init_with_output(self, *args: Any, method: Any = None, **kwargs: Any) -> Any:
        return self._whole("init_with_output")(*args, method=self._method(method), **kwargs)

    @nn.nowrap
    def apply(self, *args: Any, method: Any = None, **kwargs: Any) -> Any:
        return self._whole("apply")(*args, method=self._method(method), **kwargs)

    @property
    @nn.nowrap
    def coverage(self):
        """:class:`jaxmx.Coverage` of the last top-level ``init``/``apply``: every matmul."""
        last = self.__dict__.get("_last_program")
        if last is None:
            raise ValueError("no top-level init or apply ran yet")
        return last.coverage

    @nn.nowrap
    def _whole(self, kind: str):
        if not self.whole_program:
            return functools.partial(getattr(nn.Module, kind), self)
        from jaxmx.intercept import intercept  # the core's; imported late (no cycle)

        programs = self.__dict__.setdefault("_programs", {})
        if kind not in programs:
            cls, model = type(self).__name__, type(self.module).__name__
            programs[kind] = intercept(
                functools.partial(getattr(nn.Module, kind), self),
                [(r.pattern, r.config) for r in self.rules],
                warn=False,  # the Substitution record warns, at the user's line
                path_root=f"{cls}/{cls}._run/{model}",
            )
        object.__setattr__(self, "_last_program", programs[kind])
        return programs[kind]

    @nn.nowrap
    def _method(self, method):
        # A method of the model class given as a function (Model.encode) is
        # looked up by name, so it runs through the wrapper, in MX; linen
        # would otherwise call it with the wrapper as `self`.
        fn = getattr(method, "__func__", method)
        name = getattr(fn, "__name__", None)
        if callable(fn) and name is not None and getattr(type(self), name, None) is not fn:
            if getattr(type(self.model.module), name, None) is fn:
                return name
        return method


def _has_module(value) -> bool:
    return any(
        isinstance(leaf, nn.Module)
        for leaf in jax.tree.leaves(value, is_leaf=lambda x: isinstance(x, nn.Module))
    )


@dataclasses.dataclass(eq=False)
class _Call:
    """One :class:`MXLinen` call: its record and the path of its model."""

    substitution: Substitution
    prefix: tuple[str, ...]

    def intercept(self, next_fun, args, kwargs, context):
        module = context.module
        if _active.stack[-1] is not self:  # an inner wrapper decides
            return next_fun(*args, **kwargs)
        path = tuple(module.path)
        if path[: len(self.prefix)] != self.prefix:
            return next_fun(*args, **kwargs)
        rel = "/".join(path[len(self.prefix) :])
        sub, method = self.substitution, context.method_name
        for cls, name, fn in _NO_INJECTION_POINT:
            if isinstance(module, cls) and method == name:
                suffix = "" if name == "__call__" else f".{name}"
                sub.match(rel)  # a rule naming it did match a matmul module
                reason = f"Flax's {cls.__name__}{suffix} calls {fn} directly (no injection point)"
                sub.record(rel, type(module).__name__ + suffix, None, reason)
                return next_fun(*args, **kwargs)
        if method != "__call__":
            return next_fun(*args, **kwargs)
        if isinstance(module, nn.Einsum):
            return _einsum(module, rel, sub, next_fun, args, kwargs)
        spec = next((s for s in _FIELDS if isinstance(module, s[0])), None)
        if spec is None:
            return next_fun(*args, **kwargs)
        _, field, make, default = spec
        kind, rule = type(module).__name__, sub.match(rel)
        current = getattr(module, field)
        custom = _custom_field(module, field, current, default)
        if rule is None or (rule.config is None and not isinstance(current, MX_OPS)):
            _record_held(sub, rel, kind, current, custom, rule)
            return next_fun(*args, **kwargs)
        if custom:
            raise ValueError(
                f"{rel or '(root)'}: {kind} has a custom {custom}; jaxmx cannot replace it"
            )
        new = default if rule.config is None else make(rule.config)
        _record_held(sub, rel, kind, new, None, rule)
        with _swapped(module, field, new):
            return next_fun(*args, **kwargs)


def _custom_field(module, field: str, current, default) -> str | None:
    """Which field of ``module`` holds a matmul of the user's own, if any."""
    if getattr(module, f"{field}_cls", None) is not None:
        return f"{field}_cls"
    if current is default or current is None or isinstance(current, MX_OPS):
        return None
    return field


def _record_held(sub, path, kind, held, custom, rule) -> None:
    if isinstance(held, MX_OPS):
        sub.record(path, kind, held.config)
    elif custom:
        sub.record(path, kind, None, f"its own {custom}")
    else:
        sub.record(path, kind, None, kept_reason(rule))


def _einsum_args(inputs, einsum_str=None):
    return inputs, einsum_str


def _einsum(module, rel, sub, next_fun, args, kwargs):
    # linen's Einsum has no injection point: jaxmx restates its __call__
    # (mxlinen.einsum_forward), which is only right if the class did not
    # replace that __call__ with its own.
    kind = type(module).__name__
    owner = next(c for c in type(module).__mro__ if "__call__" in vars(c))
    rule = sub.match(rel)
    if owner not in (nn.Einsum, mxlinen.Einsum):
        reason = f"{kind} overrides nn.Einsum.__call__, which jaxmx restates to substitute it"
        sub.record(rel, kind, None, reason)
        return next_fun(*args, **kwargs)
    is_mx_layer = isinstance(module, mxlinen.Einsum)
    held = as_config(module.mx) if is_mx_layer else None
    config = held if rule is None else rule.config
    sub.record(rel, kind, config, kept_reason(rule))
    if config is None and not is_mx_layer:
        return next_fun(*args, **kwargs)
    inputs, einsum_str = _einsum_args(*args, **kwargs)
    return mxlinen.einsum_forward(module, inputs, einsum_str, config=config)


@contextlib.contextmanager
def _swapped(module, field: str, value):
    # linen modules are frozen dataclasses; the swap lasts one call.
    old = getattr(module, field)
    object.__setattr__(module, field, value)
    try:
        yield
    finally:
        object.__setattr__(module, field, old)
