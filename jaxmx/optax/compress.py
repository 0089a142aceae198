"""Compressed optimizer state: any Optax transformation's moments stored in few bits.

:func:`compress_state` wraps an inner transformation (``optax.adamw``, a
chain, ``optax.sgd`` with momentum, ...). Between steps the tensors under the
chosen state fields (``mu`` and ``nu`` of Adam, ``trace`` of momentum) are
held as :class:`~jaxmx.optax.codecs.Compressed` pytrees; inside ``update``
they are decoded to float32, the inner update runs unchanged, and its new
moments are encoded again. This is the design of optax's
``scale_by_adam(mu_dtype=...)`` taken further: the choice lives in the
transformation's arguments, and the state stays a pytree of arrays that
``jit``, ``jax.sharding`` and orbax handle like any other.

Small tensors stay float32, as in both references: bitsandbytes keeps
tensors with fewer than 4096 elements in float32, Li et al. (lpmm) quantize
only tensors with more than 4096 elements and at least two dimensions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import jaxmx
from jaxmx.optax import _util
from jaxmx.optax.codecs import PRESETS, Compressed, StateCodec, mx

__all__ = ["CompressedState", "compress_state", "state_nbytes", "bytes_per_param"]


class CompressedState(NamedTuple):
    """State of :func:`compress_state`."""

    inner_state: Any  # the inner transformation's state, chosen moment leaves as Compressed
    key: jax.Array  # uint32[2] PRNG key data for stochastic rounding (unused words otherwise)


def _is_namedtuple(x) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def _map_fields(state, names, fn):
    """Applies ``fn(field, leaf)`` to every leaf under a NamedTuple field named in ``names``."""
    if _is_namedtuple(state):
        out = []
        for field, value in zip(state._fields, state, strict=True):
            if field in names:
                out.append(
                    jax.tree.map(
                        lambda leaf, f=field: fn(f, leaf),
                        value,
                        is_leaf=lambda x: isinstance(x, Compressed),
                    )
                )
            else:
                out.append(_map_fields(value, names, fn))
        return type(state)(*out)
    if isinstance(state, (tuple, list)):
        return type(state)(_map_fields(v, names, fn) for v in state)
    if isinstance(state, Mapping):
        return type(state)({k: _map_fields(v, names, fn) for k, v in state.items()})
    return state


def _field_names(state, found: set) -> set:
    if _is_namedtuple(state):
        found.update(state._fields)
        for value in state:
            _field_names(value, found)
    elif isinstance(state, (tuple, list)):
        for v in state:
            _field_names(v, found)
    elif isinstance(state, Mapping):
        for v in state.values():
            _field_names(v, found)
    return found


def _is_format(name: str) -> bool:
    try:
        jaxmx.get_format(name)
    except ValueError:
        return False
    return True


def _unknown(name) -> ValueError:
    return ValueError(
        f"unknown preset {name!r}: not a preset ({', '.join(PRESETS)}) nor a jaxmx format "
        "name (jaxmx.list_formats())"
    )


def _named(name: str) -> dict:
    """The preset a name stands for as a whole: a preset, or a format for ``mu``."""
    if name in PRESETS:
        return PRESETS[name]
    if _is_format(name):  # like the "mxfp8" and "mxint8" presets
        return {"codecs": {"mu": mx(name)}, "min_size": 4096, "min_ndim": 1}
    raise _unknown(name)


def _field_codec(field: str, value) -> StateCodec:
    """The codec a mapping gives one field: a codec, or a name (as a whole)."""
    if isinstance(value, StateCodec):
        return value
    if not isinstance(value, str):
        raise TypeError(
            "codecs maps field names (str) to jaxmx.optax codecs or preset/format names, "
            f"got {field!r}: {value!r}"
        )
    codecs = _named(value)["codecs"]
    # The preset's codec for this field; a field it does not name (momentum's
    # "trace") gets its first-moment codec, which is signed.
    return codecs.get(field, codecs["mu"])


def _resolve(codecs, min_size, min_ndim):
    if isinstance(codecs, str):
        preset = _named(codecs)
        codecs = preset["codecs"]
        min_size = preset["min_size"] if min_size is None else min_size
        min_ndim = preset["min_ndim"] if min_ndim is None else min_ndim
    if not isinstance(codecs, Mapping) or not codecs:
        raise TypeError(
            "codecs must be a preset name or a non-empty mapping from state field name "
            f"to codec, got {codecs!r}"
        )
    for name in codecs:
        if not isinstance(name, str):
            raise TypeError(
                "codecs maps field names (str) to jaxmx.optax codecs or preset/format names, "
                f"got {name!r}: {codecs[name]!r}"
            )
    codecs = {name: _field_codec(name, value) for name, value in codecs.items()}
    min_size = 4096 if min_size is None else min_size
    min_ndim = 0 if min_ndim is None else min_ndim
    for what, v in (("min_size", min_size), ("min_ndim", min_ndim)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{what} must be a non-negative int, got {v!r}")
    return codecs, min_size, min_ndim


def compress_state(
    inner: optax.GradientTransformation,
    codecs: str | Mapping[str, StateCodec | str] = "8bit",
    *,
    min_size: int | None = None,
    min_ndim: int | None = None,
    key: jax.Array | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Stores the moment tensors of ``inner``'s state compressed.

    Args:
      inner: any Optax transformation; its state is searched for NamedTuple
        fields named in ``codecs`` (at any depth: inside chains, masks,
        ``inject_hyperparams``).
      codecs: a preset name, or a mapping from state field name to codec:

        * ``"8bit"``: bitsandbytes' 8-bit Adam state (signed / unsigned
          dynamic maps, blocks of 256, tensors under 4096 elements in float32);
        * ``"4bit"``: Li et al. 2023 (first moment: signed 4-bit dynamic map,
          blocks of 128; second moment: rank-1 normalization, linear map
          without zero; tensors of more than 4096 elements and >= 2 dims);
        * ``"mxfp8"`` / ``"mxint8"``: first moment in that MX format, second in float32;
        * ``"bf16"``: both moments in bfloat16;
        * any other jaxmx format name (``"nvfp4"``, ``"mx6"``, ...): the first
          moment in that format (:func:`~jaxmx.optax.mx`, its own block
          size), the second in float32, as ``"mxfp8"``;
        * or a mapping, e.g. ``{"mu": jaxmx.optax.mx("mxfp8"), "nu":
          jaxmx.optax.rank1()}``, whose values are codecs or the same names:
          ``{"nu": "4bit"}`` is the ``"4bit"`` preset's second-moment codec,
          ``{"mu": "nvfp4"}`` is ``mx("nvfp4")``; a field the preset does not
          name (momentum's ``trace``) gets its first-moment codec.
      min_size: tensors with fewer elements stay as the inner state holds
        them (float32); defaults to the preset's rule when ``codecs`` is a
        name, else 4096.
      min_ndim: tensors with fewer dimensions stay float32 (the name's rule, else 0).
      key: PRNG key; required when a codec rounds stochastically, and refused
        otherwise (as :func:`jaxmx.quantize` refuses a key without
        stochastic rounding: a key that changes nothing is a mistake).

    Returns:
      A transformation whose state is a :class:`CompressedState`.

    Raises:
      ValueError: unknown name, bad sizes, a stochastic codec without a
        key or a key without one, or (at ``init``) no state field of
        ``inner`` named in ``codecs``.
      TypeError: codecs that are neither jaxmx.optax codecs nor names.

    >>> import jax.numpy as jnp, optax, jaxmx.optax
    >>> params = {"w": jnp.ones((64, 128)), "b": jnp.zeros(128)}
    >>> opt = jaxmx.optax.compress_state(optax.adam(1e-3), "8bit")
    >>> state = opt.init(params)
    >>> round(jaxmx.optax.bytes_per_param(state, params), 3)  # w in 8 bits, b in float32
    2.125
    >>> updates, state = opt.update(params, state, params)
    """
    codecs, min_size, min_ndim = _resolve(codecs, min_size, min_ndim)
    stochastic = any(c.stochastic for c in codecs.values())
    if stochastic and key is None:
        raise ValueError("a codec rounds stochastically: pass key=jax.random.key(...)")
    if key is not None and not stochastic:
        raise ValueError(
            "a key was given but no codec rounds stochastically "
            f"({', '.join(f'{f}: {c.rounding}' for f, c in codecs.items())}); pass codecs "
            "with rounding='stochastic' or drop the key"
        )
    raw_key = _util.key_data(key) if key is not None else jnp.zeros(2, jnp.uint32)
    inner = optax.with_extra_args_support(inner)

    def compressible(leaf) -> bool:
        return (
            isinstance(leaf, jax.Array | jax.ShapeDtypeStruct)
            and jnp.issubdtype(leaf.dtype, jnp.floating)
            and leaf.size >= min_size
            and leaf.ndim >= min_ndim
        )

    def encode(state, step_key):
        counter = iter(range(1 << 30))

        def fn(field, leaf):
            if isinstance(leaf, Compressed) or not compressible(leaf):
                return leaf
            codec = codecs[field]
            k = jax.random.fold_in(step_key, next(counter)) if codec.stochastic else None
            return codec.encode(leaf, k)

        return _map_fields(state, codecs, fn)

    def decode(state):
        return _map_fields(
            state,
            codecs,
            lambda f, leaf: leaf.codec.decode(leaf) if isinstance(leaf, Compressed) else leaf,
        )

    def init_fn(params):
        state = inner.init(params)
        missing = set(codecs) - _field_names(state, set())
        if missing == set(codecs):
            raise ValueError(
                f"compress_state: the inner state has no field named {sorted(codecs)}; "
                f"its fields are {sorted(_field_names(state, set()))}"
            )
        # Zero moments code exactly under any rounding, so init rounds to nearest.
        # A fresh copy per init: a training loop that donates the state must
        # not delete the caller's key (or the next init's).
        key = jnp.array(raw_key)
        return CompressedState(inner_state=encode(state, _util.wrap(key)), key=key)

    def update_fn(updates, state, params=None, **extra_args):
        new_updates, inner_state = inner.update(
            updates, decode(state.inner_state), params, **extra_args
        )
        if stochastic:
            next_raw, step_key = _util.next_key(state.key)
        else:
            next_raw, step_key = state.key, None
        return new_updates, CompressedState(encode(inner_state, step_key), next_raw)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def state_nbytes(state: Any) -> int:
    """Bytes held by an optimizer state (every array leaf, compressed or not).

    >>> import jax.numpy as jnp, optax, jaxmx.optax
    >>> jaxmx.optax.state_nbytes(optax.adam(1e-3).init(jnp.zeros(1000)))
    8004
    """
    return _util.tree_nbytes(state)


def bytes_per_param(state: Any, params: Any) -> float:
    """Optimizer-state bytes per parameter element.

    Float32 Adam holds 8 (two moments); bitsandbytes' 8-bit state about 2.03;
    Li et al.'s 4-bit state about 1.03 on large matrices.

    >>> import jax.numpy as jnp, optax, jaxmx.optax
    >>> p = jnp.zeros((512, 512))
    >>> round(jaxmx.optax.bytes_per_param(optax.adam(1e-3).init(p), p), 3)
    8.0
    """
    n = _util.tree_size(params)
    if n == 0:
        raise ValueError("params hold no elements")
    return state_nbytes(state) / n
