"""Low-precision master weights: parameters kept in bfloat16 (or narrower), updated in float32.

The BFLOAT16 training study (Kalamkar et al. 2019, "A Study of BFLOAT16 for
Deep Learning Training", arXiv:1905.12322) and the stochastic-rounding line
before it (Gupta et al. 2015) keep no float32 copy of the weights: each
step computes ``p + u`` in float32 and rounds the sum back to bfloat16. With
round-to-nearest-even an update smaller than half a bfloat16 ulp of ``p`` is
lost entirely; stochastic rounding keeps it in expectation. Collage (Yu et
al. 2024, "Collage: Light-Weight Low-Precision Strategy for LLM Training",
ICML) instead carries the rounding error in a second low-precision buffer and
adds it back at the next step (Kahan-style compensated summation).

:func:`low_precision_params` wraps an inner transformation (e.g.
``optax.adamw``) and does exactly that: the inner transformation sees
float32 gradients and float32 params, its update is added in float32 (plus
the compensation, if any), the sum is rounded with :func:`jaxmx.round_to`
to the target format, and the returned update is the difference, so that
``optax.apply_updates(params, updates)`` lands on the rounded value.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxmx
from jaxmx.optax import _util

__all__ = ["LowPrecisionParamsState", "low_precision_params", "round_params"]

ROUNDINGS = _util.ROUNDINGS  # "nearest" is accepted as an alias of "nearest_even"
_CONTAINERS = (jnp.float32, jnp.bfloat16, jnp.float16)
_NARROW = (jnp.bfloat16, jnp.float16)  # containers that cannot hold every format


class LowPrecisionParamsState(NamedTuple):
    """State of :func:`low_precision_params`."""

    inner_state: Any  # the inner transformation's state (built from float32 params)
    key: jax.Array  # uint32[2] PRNG key data for stochastic rounding (unused otherwise)
    compensation: Any  # tree like params, in the compensation dtype; () when off


def _check_format(fmt):
    jaxmx.round_to(jnp.zeros((1,), jnp.float32), fmt)  # ValueError/TypeError naming the formats
    return fmt


def _witnesses(fmt) -> np.ndarray:
    """float32 values of ``fmt`` that test whether a container holds all of its grid.

    ``1 + 2**-m`` (its finest step near 1), every power of two it holds (its
    smallest subnormal included) and its largest finite value, each read off
    :func:`jaxmx.round_to` itself. A float dtype holds every value of ``fmt``
    exactly when it holds these: the first needs as many mantissa bits, the
    powers of two the exponent range down to the smallest step, the largest
    value the range at the top.
    """
    f32 = np.finfo(np.float32)
    probes = np.concatenate(
        [
            1.0 + 2.0 ** -np.arange(1, 24, dtype=np.float64),
            2.0 ** np.arange(-149, 128, dtype=np.float64),
            [float(f32.max)],
        ]
    ).astype(np.float32)
    with jax.ensure_compile_time_eval():
        got = np.asarray(jaxmx.round_to(jnp.asarray(probes), fmt, saturate=True))
    return np.unique(got[np.isfinite(got) & (got != 0)])


def _fmt_name(fmt) -> str:
    return fmt if isinstance(fmt, str) else getattr(fmt, "name", repr(fmt))


def _check_container(fmt, witnesses: np.ndarray, path: str, dtype, who: str) -> None:
    with np.errstate(over="ignore"):  # a value beyond the dtype's range becomes inf
        held = witnesses.astype(dtype).astype(np.float32)
    bad = held != witnesses
    if bad.any():
        v, w = float(witnesses[bad][0]), float(held[bad][0])
        name = np.dtype(dtype).name
        raise ValueError(
            f"{who}: param {path} is a {name} array, which cannot hold every "
            f"value of the format {_fmt_name(fmt)!r} (e.g. {v!r} = {v.hex()} would become "
            f"{w!r}); the format must be representable in the params' dtype: hold the params "
            f"in float32 arrays (on the grid: round_params(params, fmt)) or pick a format "
            f"within {name}"
        )


def round_params(params: Any, fmt: jaxmx.ElementFormat | jax.typing.DTypeLike = "bfloat16") -> Any:
    """Rounds every float leaf to ``fmt`` (nearest even), keeping each leaf's dtype.

    Use it once on the initial params before training with
    :func:`low_precision_params` in float32 containers (or cast to
    ``jnp.bfloat16`` to hold them in bfloat16 arrays).

    Raises:
      ValueError: unknown format, or a bfloat16/float16 leaf that cannot
        hold every value of ``fmt`` (e.g. ``"float16"`` in bfloat16 arrays:
        the rounded value would be rounded again to the leaf's dtype).

    >>> import jax.numpy as jnp
    >>> round_params({"w": jnp.array([1.0 + 2**-10, 3.0])})["w"]
    Array([1., 3.], dtype=float32)
    """
    _check_format(fmt)
    witnesses = _witnesses(fmt)
    for path, p in jax.tree_util.tree_leaves_with_path(params):
        if any(p.dtype == d for d in _NARROW):
            _check_container(fmt, witnesses, jax.tree_util.keystr(path), p.dtype, "round_params")
    return jax.tree.map(
        lambda p: jaxmx.round_to(p, fmt) if jnp.issubdtype(p.dtype, jnp.floating) else p, params
    )


def low_precision_params(
    inner: optax.GradientTransformation,
    fmt: jaxmx.ElementFormat | jax.typing.DTypeLike = "bfloat16",
    *,
    rounding: str = "nearest_even",
    compensation: str | None = None,
    key: jax.Array | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Keeps params on a low-precision grid: update in float32, round back.

    Params may be ``bfloat16`` / ``float16`` arrays, or float32 arrays whose
    values lie on the ``fmt`` grid (e.g. from :func:`round_params`); either
    way each new param value is ``round(p + u + c)`` on the grid, with ``u``
    the inner update computed from float32 gradients and params, and ``c``
    the compensation carried from the previous step (zero when off).

    Apply the result with ``optax.apply_updates``; it lands exactly on the
    rounded value for bfloat16 and float16 arrays, and for float32 arrays
    whenever the old and new values are within a factor ``2**15`` of each
    other or either is 0 (their difference is then exact in float32; an
    update that shrinks a weight more than that can leave it one float32
    rounding off the grid, and the next step puts it back). The format's
    values must be representable in the params' dtype, and ``init`` and
    ``update`` refuse params that are not: any format in float32 arrays; in
    bfloat16 arrays ``"bfloat16"`` or a format within it (``"fp8_e4m3"``,
    ``float_format(8, 3)``), not ``"float16"`` (three more mantissa bits);
    in float16 arrays ``"float16"`` or FP8, not ``"bfloat16"`` (its range).

    Args:
      inner: the float32 optimizer, e.g. ``optax.adamw(1e-3)``; its state is
        initialised from float32 copies of the params.
      fmt: any :func:`jaxmx.round_to` format: ``"bfloat16"``, ``"float16"``,
        ``"fp8_e4m3"``, ``jaxmx.formats.float_format(8, 3)``, ...
      rounding: ``"nearest_even"`` (alias ``"nearest"``) or ``"stochastic"`` (needs ``key``).
      compensation: None, or the dtype of a Kahan/Collage compensation buffer
        holding the rounding error of the last step (``"bfloat16"`` as in
        Collage, or ``"float32"``). Costs one buffer the size of the params.
      key: PRNG key for stochastic rounding.

    Returns:
      A transformation with a :class:`LowPrecisionParamsState`.

    Raises:
      ValueError: unknown format, rounding or compensation dtype, a
        stochastic rounding without key, or (at ``init``/``update``)
        bfloat16/float16 params that cannot hold the format's values.

    >>> import jax.numpy as jnp, optax, jaxmx.optax
    >>> params = {"w": jnp.ones(4, jnp.bfloat16)}
    >>> opt = jaxmx.optax.low_precision_params(optax.sgd(1e-3), "bfloat16")
    >>> state = opt.init(params)
    >>> grads = {"w": jnp.ones(4, jnp.bfloat16)}
    >>> updates, state = opt.update(grads, state, params)
    >>> optax.apply_updates(params, updates)["w"]  # 1 - 1e-3 rounds back to 1 in bf16
    Array([1, 1, 1, 1], dtype=bfloat16)
    """
    _check_format(fmt)
    rounding = _util.rounding(rounding)
    witnesses = _witnesses(fmt)
    stochastic = rounding == "stochastic"
    if stochastic and key is None:
        raise ValueError("rounding='stochastic' needs key=jax.random.key(...)")
    if compensation is not None:
        allowed = ("bfloat16", "float16", "float32")
        name = compensation if isinstance(compensation, str) else jnp.dtype(compensation).name
        if name not in allowed:
            raise ValueError(f"compensation must be None or one of {allowed}, got {compensation!r}")
        compensation = jnp.dtype(name)
    raw_key = _util.key_data(key) if key is not None else jnp.zeros(2, jnp.uint32)
    inner = optax.with_extra_args_support(inner)

    def check(params):
        if params is None:
            raise ValueError("low_precision_params needs params in update(); pass them")
        bad = {
            jax.tree_util.keystr(path): str(leaf.dtype)
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)
            if not any(leaf.dtype == d for d in _CONTAINERS)
        }
        if bad:
            raise TypeError(f"params must be float32, bfloat16 or float16 arrays; got {bad}")
        for path, leaf in jax.tree_util.tree_leaves_with_path(params):
            if any(leaf.dtype == d for d in _NARROW):
                path = jax.tree_util.keystr(path)
                _check_container(fmt, witnesses, path, leaf.dtype, "low_precision_params")

    def f32(tree):
        return jax.tree.map(lambda a: a.astype(jnp.float32), tree)

    def init_fn(params):
        check(params)
        comp = (
            jax.tree.map(lambda p: jnp.zeros(p.shape, compensation), params)
            if compensation is not None
            else ()
        )
        # A fresh copy per init: donating the state must not delete the caller's key.
        return LowPrecisionParamsState(inner.init(f32(params)), jnp.array(raw_key), comp)

    def update_fn(updates, state, params=None, **extra_args):
        check(params)
        p32 = f32(params)
        u, inner_state = inner.update(f32(updates), state.inner_state, p32, **extra_args)
        if stochastic:
            next_raw, step_key = _util.next_key(state.key)
        else:
            next_raw, step_key = state.key, None
        leaves, treedef = jax.tree.flatten(p32)
        u_leaves = treedef.flatten_up_to(u)
        c_leaves = (
            treedef.flatten_up_to(state.compensation)
            if compensation is not None
            else [None] * len(leaves)
        )
        new_u, new_c = [], []
        for i, (p, du, c) in enumerate(zip(leaves, u_leaves, c_leaves, strict=True)):
            exact = p + du.astype(jnp.float32)
            if c is not None:
                exact = exact + c.astype(jnp.float32)
            k = jax.random.fold_in(step_key, i) if stochastic else None
            rounded = jaxmx.round_to(exact, fmt, rounding=rounding, key=k)
            new_u.append(rounded - p)
            if c is not None:
                new_c.append((exact - rounded).astype(compensation))
        comp = treedef.unflatten(new_c) if compensation is not None else ()
        state = LowPrecisionParamsState(inner_state, next_raw, comp)
        return treedef.unflatten(new_u), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
