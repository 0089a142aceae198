"""Module substitution: put MX into an existing Flax model without editing it.

Rules map module paths (regular expressions, ``re.search`` on the path
joined with ``/``; the model itself is ``""``) to a :class:`~jaxmx.DotConfig`;
the first rule that matches a matmul module decides. Only Flax's own
injection points are used:

* nnx: the model is walked once and each matched layer's ``dot_general`` /
  ``einsum_op`` / ``conv_general_dilated`` / ``attention_fn`` is pointed at
  jaxmx, in place;
* linen: modules are created while the model runs, so the result is an
  :class:`MXLinen` module that runs the model under a method interceptor
  (see :mod:`jaxmx.flax._linen_substitute`).

Parameters are untouched either way: a checkpoint of the original model
loads into the substituted one and back. The :class:`Substitution` record
(:func:`substitution_of`) is read off what each module holds (nnx) or runs
with (linen), so it always says what runs.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

from flax import linen as nn
from flax import nnx

from jaxmx.flax import nnx as mxnnx
from jaxmx.flax._linen_substitute import MXLinen, _Held
from jaxmx.flax._record import Rule, Substitution, kept_reason, parse_rules
from jaxmx.rules import RulesLike

__all__ = ["Rule", "Substitution", "MXLinen", "quantize_model", "substitution_of"]

# nnx layers that multiply but call lax/jnp directly (no injection point):
# listed as kept in high precision, with this reason.
_NNX_NO_INJECTION_POINT = (
    (nnx.ConvTranspose, "Flax's ConvTranspose calls lax.conv_transpose directly"),
    (nnx.Embed, "Flax's Embed.attend (if used) calls jnp.dot directly; the lookup is not a matmul"),
    (nnx.LoRA, "Flax's LoRA multiplies by its low-rank factors with @ directly"),
)


def _path_str(path: Iterable) -> str:
    return "/".join(str(p) for p in path)


def _substitute_nnx(model: nnx.Module, sub: Substitution) -> None:
    kinds = tuple(mxnnx.INJECTION_POINTS)
    for path, module in nnx.iter_modules(model):
        p, kind = _path_str(path), type(module).__name__
        if isinstance(module, kinds):
            rule = sub.match(p)
            if rule is not None:
                # A None config also undoes an earlier jaxmx config.
                mxnnx.configure(module, rule.config)
            config = mxnnx.held_config(module)
            custom = mxnnx.custom_op(module)
            reason = f"its own {custom}" if custom else kept_reason(rule)
            sub.record(p, kind, config, reason)
            continue
        for cls, reason in _NNX_NO_INJECTION_POINT:
            if isinstance(module, cls):
                sub.match(p)  # a rule naming it did match a matmul module
                sub.record(p, kind, None, f"{reason} (no injection point)")
                break


def quantize_model(
    model: nn.Module | nnx.Module, rules: RulesLike, *, warn: bool = True, scope: str = "all"
) -> nn.Module | nnx.Module:
    """Swaps the matmuls of a Flax model (linen or nnx) for MX ones, by rules.

    Args:
      model: a ``flax.linen.Module`` or a ``flax.nnx.Module``.
      rules: ``[(pattern, config), ...]`` (or :class:`Rule` objects, or a
        dict), tried in order: the first whose regular expression is found in
        a matmul module's path (``"blocks/0/attn/query"``; the model itself
        is ``""``, so a bare ``Dense`` is matched by ``".*"`` or ``"^$"``)
        decides. A config is a DotConfig or a preset or format name; only
        ``None`` means high precision. A single config (or None) means
        ``[(".*", config)]``.
      warn: warn about rules that matched no matmul module (nnx: at once;
        linen: after the first call), at the line that made the call.
      scope: linen only. ``"all"`` (default): a top-level ``init``/``apply``
        also puts the matmuls of plain functions inside the model in MX
        (see below); ``"modules"``: only the matmul modules are substituted.

    Returns:
      nnx: the same model, modified in place. A module matched by a rule
      takes that rule's config; a ``None`` rule on a module that jaxmx
      configured earlier (an earlier ``quantize_model``, an ``mx=`` layer)
      restores Flax's high-precision default; modules no rule matches are
      left as they are. linen: an :class:`MXLinen`, a ``flax.linen.Module``
      with exactly the model's variables that runs it with MX matmuls
      (``init``, ``apply``, ``bind``, ``tabulate``, nesting); modules no
      rule matches run as written (an MXLinen given here is unwrapped and
      its rules tried after the new ones). Called at the top
      (``init``/``apply``), an MXLinen also runs the call under
      :func:`jaxmx.intercept` with the same rules, so matmuls in plain
      functions inside the model (a third-party attention's
      ``jnp.einsum``) are in MX too, and ``result.coverage`` lists every
      matmul; nested or bound, only matmul modules are substituted. Either
      way, ``jaxmx.flax.substitution_of(result)`` tells which modules. An
      nnx model is called directly, with no hook for plain functions: run
      it under :func:`jaxmx.intercept` for those.

    Matmul modules: linen ``Dense``, ``DenseGeneral``, ``Einsum``, ``Conv``,
    ``MultiHeadDotProductAttention`` (its q.k and p.v; the projections are
    DenseGeneral children); nnx ``Linear``, ``LinearGeneral``, ``Einsum``,
    ``Conv``, ``MultiHeadAttention``. Flax gives no injection point for
    ``ConvTranspose``, ``ConvLocal``, ``Embed.attend`` and nnx ``LoRA``: they
    are listed as kept in high precision, with that reason. The ``Embed``
    lookup is not a matmul.

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxmx
    >>> from jaxmx.flax import quantize_model, substitution_of
    >>> class MLP(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         return nn.Dense(4, name="head")(nn.relu(nn.Dense(64, name="hidden")(x)))
    >>> mx = quantize_model(MLP(), [("head", None), (".*", "mxfp8")])
    >>> params = mx.init(jax.random.key(0), jnp.ones((2, 32)))
    >>> print(substitution_of(mx).summary())  # doctest: +NORMALIZE_WHITESPACE +ELLIPSIS
    1 matmul modules in MX, 1 kept in high precision
      MX    hidden        Dense     fwd mxfp8_e4m3 x mxfp8_e4m3; dgrad ...
      high  head          Dense     rule 'head' keeps it
    """
    if scope not in ("all", "modules"):
        raise ValueError(f"scope must be 'all' or 'modules', got {scope!r}")
    parsed = parse_rules(rules)
    own = len(parsed)
    if isinstance(model, MXLinen):
        # As for nnx: the new rules decide where they match, the earlier
        # ones where they do not.
        model, parsed = model.module, parsed + model.rules
    sub = Substitution(parsed, warn=warn, own=own)
    if isinstance(model, nnx.Module):
        _substitute_nnx(model, sub)
        _SUBSTITUTIONS[model] = sub
        sub.warn_unmatched()
        return model
    if isinstance(model, nn.Module):
        return MXLinen(
            _Held(model), rules=sub.rules, substitution=sub, whole_program=scope == "all"
        )
    raise TypeError(
        f"quantize_model takes a flax.linen or flax.nnx Module, got {type(model).__name__}"
    )


_SUBSTITUTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def substitution_of(model: nn.Module | nnx.Module) -> Substitution:
    """The :class:`Substitution` record of a model made by :func:`quantize_model`.

    linen records modules as they run, so the record fills in at the first
    ``init``/``apply``; nnx records at :func:`quantize_model`.
    """
    if isinstance(model, MXLinen):
        return model.substitution
    try:
        return _SUBSTITUTIONS[model]
    except (KeyError, TypeError):
        raise ValueError("this model did not come from jaxmx.flax.quantize_model") from None
