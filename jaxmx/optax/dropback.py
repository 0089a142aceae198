"""DropBack and Procrustes: train only the top-k weights, regenerate the rest.

DropBack (Golub, Lemieux and Lis 2019, "Full deep neural network training on
a pruned weight budget", SysML; arXiv:1806.06949) updates only the ``k``
weights with the largest accumulated gradient (the distance a weight has
moved from its initial value, for SGD ``|sum_t lr_t g_t|``). Every other
weight is reset to its initial value, which is never stored: it is
recomputed from the initialization PRNG key whenever needed. Only the ``k``
tracked weights then need memory, during training and after it.

Procrustes (Yang et al. 2020, "Procrustes: a Dataflow and Accelerator for
Sparse Deep Neural Network Training", MICRO; arXiv:2009.10976) adapts it to
hardware in two ways, both options here:

* the initial values decay towards zero (``init_decay``): an untracked
  weight is ``w0 * init_decay**t``, so after a while untracked weights are
  exactly 0 and the network is truly sparse;
* the top-k threshold is not found by sorting every step: a running
  estimate is nudged each step by how far the count it let through missed
  the budget (``threshold="quantile"``).

In :func:`dropback` a weight's initial value is ``init_fn(key_for(path),
shape, dtype)``, with ``key_for`` folding a hash of the parameter's path
(``jax.tree_util.keystr``) into ``init_key``. :func:`initial_params` makes
the starting params the same way, so the values regenerated inside the
update equal the initial ones bit for bit, and the state holds no copy.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxmx.optax import _util

__all__ = [
    "DropBackState",
    "default_init",
    "dropback",
    "dropback_stats",
    "initial_params",
    "leaf_key",
]

SCOPES = ("global", "per_tensor")
THRESHOLDS = ("exact", "quantile")
InitFn = Callable[[jax.Array, tuple, tuple, Any], jax.Array]


class DropBackState(NamedTuple):
    """State of :func:`dropback`: a few scalars, nothing the size of the params."""

    count: jax.Array  # int32 updates applied so far; sets the decay of the initial values
    init_key: jax.Array  # uint32[2] PRNG key data the initial values are regenerated from
    threshold: Any  # float32 score threshold: a scalar (global) or a tree of scalars (per tensor)
    tracked: jax.Array  # int32 weights tracked by the last update, over the whole tree


def default_init(
    key: jax.Array, path: tuple, shape: tuple, dtype: jax.typing.DTypeLike
) -> jax.Array:
    """LeCun-normal kernels (>= 2 dims) and zero biases: Flax's ``Dense`` defaults.

    >>> import jax
    >>> default_init(jax.random.key(0), (), (3,), "float32")
    Array([0., 0., 0.], dtype=float32)
    """
    del path
    if len(shape) >= 2:
        return jax.nn.initializers.lecun_normal()(key, shape, dtype)
    return jnp.zeros(shape, dtype)


def leaf_key(key: jax.Array, path: tuple) -> jax.Array:
    """The PRNG key of one parameter: ``fold_in(key, crc32(keystr(path)))``.

    >>> import jax
    >>> from jax.tree_util import DictKey
    >>> k = leaf_key(jax.random.key(0), (DictKey("dense"), DictKey("kernel")))
    >>> k.dtype
    key<fry>
    """
    if not jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
        key = _util.wrap(_util.key_data(key))
    digest = zlib.crc32(jax.tree_util.keystr(path).encode())
    return jax.random.fold_in(key, np.uint32(digest))


def _regenerate(key, path, leaf, init_fn):
    # The barrier keeps the generator out of the consumers' fusions (it would
    # be recomputed in each); the values are those of initial_params bit for bit.
    value = init_fn(leaf_key(key, path), path, tuple(leaf.shape), leaf.dtype)
    return lax.optimization_barrier(jnp.asarray(value, leaf.dtype))


def initial_params(key: jax.Array, like: Any, init_fn: InitFn | None = None) -> Any:
    """Initial params drawn so that :func:`dropback` can regenerate them.

    Args:
      key: the initialization key (pass the same one as ``init_key``).
      like: a pytree of arrays or ``jax.ShapeDtypeStruct`` giving shapes and
        dtypes, e.g. ``jax.eval_shape(model.init, ...)["params"]``.
      init_fn: ``init_fn(key, path, shape, dtype) -> array``; defaults to
        :func:`default_init`.

    Returns:
      The params pytree.

    >>> import jax, jax.numpy as jnp
    >>> shapes = {"kernel": jax.ShapeDtypeStruct((4, 3), jnp.float32)}
    >>> initial_params(jax.random.key(0), shapes)["kernel"].shape
    (4, 3)
    """
    init_fn = init_fn or default_init
    leaves, treedef = jax.tree.flatten(like)
    spec = tuple((tuple(leaf.shape), jnp.dtype(leaf.dtype)) for leaf in leaves)
    return _initializer(treedef, spec, init_fn)(_util.key_data(key))


@functools.lru_cache(maxsize=32)
def _initializer(treedef, spec, init_fn):
    # One compiled generator per tree layout and init_fn.
    like = treedef.unflatten([jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in spec])

    @jax.jit
    def make(raw):
        key = _util.wrap(raw)
        return jax.tree_util.tree_map_with_path(
            lambda path, leaf: _regenerate(key, path, leaf, init_fn), like
        )

    return make


def _check_initial(params, raw_key, init_fn) -> None:
    """Refuses params that are not the ones ``initial_params`` regenerates.

    DropBack resets every untracked weight to the value regenerated from the
    key; params drawn otherwise (``model.init``, another key or ``init_fn``)
    would be silently replaced by other values. Only concrete params can be
    compared: under ``jit`` or ``eval_shape`` the check is skipped.
    """
    leaves = jax.tree.leaves(params)
    if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
        return
    want = initial_params(raw_key, params, init_fn)
    bad = {}
    for (path, p), w in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(want), strict=True
    ):
        p = jnp.asarray(p)
        differ = int(jnp.sum(p != w)) if p.shape == w.shape else p.size
        if differ:
            bad[jax.tree_util.keystr(path)] = f"{differ} of {p.size}"
    if bad:
        shown = ", ".join(f"{k} ({v} weights)" for k, v in list(bad.items())[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ValueError(
            f"dropback: the params given to init differ from the initial values regenerated "
            f"from init_key and init_fn at {shown}{more}. DropBack resets every untracked "
            "weight to its regenerated initial value, so params must be "
            "jaxmx.optax.initial_params(init_key, like, init_fn) with the same key and "
            "init_fn (and init_fn must give the same bits in every compiled program). "
            "Resuming from a checkpoint: init with those initial params, or abstractly "
            "(jax.eval_shape(opt.init, params)), then restore the state."
        )


def _check_args(tracked, scope, threshold, init_decay, quantile_rate):
    if isinstance(tracked, bool) or not isinstance(tracked, (int, float, np.integer, np.floating)):
        raise TypeError(f"tracked must be an int (weights) or a float fraction, got {tracked!r}")
    if isinstance(tracked, (int, np.integer)) and tracked < 1:
        raise ValueError(f"tracked must be >= 1 weights, got {tracked}")
    if isinstance(tracked, (float, np.floating)) and not 0.0 < tracked <= 1.0:
        raise ValueError(f"a fractional tracked budget must be in (0, 1], got {tracked}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; allowed: {', '.join(SCOPES)}")
    if threshold not in THRESHOLDS:
        raise ValueError(f"unknown threshold {threshold!r}; allowed: {', '.join(THRESHOLDS)}")
    if not 0.0 < init_decay <= 1.0:
        raise ValueError(f"init_decay must be in (0, 1], got {init_decay}")
    if not quantile_rate > 0.0:
        raise ValueError(f"quantile_rate must be > 0, got {quantile_rate}")


def _budgets(tracked, sizes: list[int], scope: str) -> list[int]:
    total = sum(sizes)
    if isinstance(tracked, (int, np.integer)):
        fraction = min(int(tracked), total) / total
        if scope == "global":
            return [min(int(tracked), total)]
    else:
        fraction = float(tracked)
        if scope == "global":
            return [max(1, round(fraction * total))]
    return [max(1, min(n, round(fraction * n))) for n in sizes]


def _kth_largest(bits_list: list[jax.Array], k: int) -> jax.Array:
    """float32 k-th largest of non-negative values, given their uint32 bit patterns.

    A radix select: 31 passes decide the threshold's bits from the top, each
    counting the values at or above a candidate; no sort. Returns 0 when
    there are fewer than ``k`` values.
    """

    def body(i, prefix):
        candidate = prefix | (jnp.uint32(1) << (30 - i).astype(jnp.uint32))
        count = sum(jnp.sum(b >= candidate, dtype=jnp.int32) for b in bits_list)
        return jnp.where(count >= k, candidate, prefix)

    prefix = lax.fori_loop(0, 31, body, jnp.uint32(0))
    return lax.bitcast_convert_type(prefix, jnp.float32)


def dropback(
    tracked: int | float,
    *,
    init_key: jax.Array,
    init_fn: InitFn | None = None,
    scope: str = "global",
    init_decay: float = 1.0,
    threshold: str = "exact",
    quantile_rate: float = 0.05,
) -> optax.GradientTransformation:
    """DropBack: only the top-k weights by accumulated gradient are trained.

    Put it last in a chain, after the optimizer's scaling (``optax.chain(
    optax.sgd(lr), dropback(...))``): it receives the step ``u`` the
    optimizer would apply. A weight's score is ``|p + u - r|``, its distance
    from its regenerated initial value ``r`` after the step; the weights with
    the ``k`` largest scores are updated to ``p + u``, every other one is set
    to its initial value (decayed by ``init_decay`` per step). Params must be
    initialised by :func:`initial_params` with the same key and ``init_fn``;
    ``init`` checks it (bit for bit) when given concrete params and raises
    otherwise (under ``jit``/``eval_shape`` it cannot look at the values).

    Args:
      tracked: the budget: a number of weights (int) or a fraction of all
        weights (float in (0, 1]); "10x fewer tracked weights" is ``0.1``.
      init_key: the initialization key given to :func:`initial_params`.
      init_fn: ``init_fn(key, path, shape, dtype)``; default :func:`default_init`.
      scope: ``"global"`` (one top-k over the whole pytree, as DropBack) or
        ``"per_tensor"`` (each tensor keeps the same fraction).
      init_decay: Procrustes' decay of the initial values per step; 1 keeps
        them (DropBack), e.g. 0.9 makes untracked weights 0 after ~1000 steps.
      threshold: ``"exact"`` (the k-th largest score, found by a radix
        select) or ``"quantile"`` (Procrustes: a running estimate, seeded by
        one exact selection at the first step, then moved each step by
        ``exp(quantile_rate * (tracked / k - 1))``, so the tracked count
        hovers around ``k`` instead of hitting it exactly).
      quantile_rate: step size of the running estimate (log scale).

    Returns:
      A transformation with a :class:`DropBackState` (scalars only).

    Raises:
      ValueError / TypeError: bad budget, scope, threshold, decay or rate;
        ``init_key`` None or not a key; at ``init``, params that differ from
        the initial values regenerated from ``init_key``.

    >>> import jax, jax.numpy as jnp, optax, jaxmx.optax
    >>> key = jax.random.key(0)
    >>> params = jaxmx.optax.initial_params(key, {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32)})
    >>> opt = optax.chain(optax.sgd(0.1), jaxmx.optax.dropback(0.25, init_key=key))
    >>> state = opt.init(params)
    >>> grads = {"w": jnp.arange(64.0).reshape(8, 8)}
    >>> updates, state = opt.update(grads, state, params)
    >>> new = optax.apply_updates(params, updates)
    >>> int((new["w"] != params["w"]).sum()), int(state[1].tracked)  # 16 of 64 moved
    (16, 16)
    """
    _check_args(tracked, scope, threshold, init_decay, quantile_rate)
    init_fn = init_fn or default_init
    if init_key is None:
        raise TypeError(
            "dropback needs init_key: the PRNG key the params were drawn from with "
            "jaxmx.optax.initial_params(init_key, like, init_fn) (jax.random.key(n) or "
            "PRNGKey(n)), from which every untracked weight is regenerated; got None"
        )
    raw_key = _util.key_data(init_key, "init_key")
    decay = float(init_decay)

    def leaves_of(params):
        return jax.tree_util.tree_leaves_with_path(params)

    def init_fn_(params):
        n = len(leaves_of(params))
        if n == 0:
            raise ValueError("dropback needs at least one parameter")
        _check_initial(params, raw_key, init_fn)
        thr = jnp.zeros((), jnp.float32)
        thresholds = thr if scope == "global" else [thr] * n
        return DropBackState(
            count=jnp.zeros((), jnp.int32),
            init_key=jnp.array(raw_key),  # a copy: donating the state keeps the caller's key
            threshold=thresholds,
            tracked=jnp.zeros((), jnp.int32),
        )

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("dropback needs params in update(); pass them")
        leaves = leaves_of(params)
        treedef = jax.tree.structure(params)
        u_leaves = treedef.flatten_up_to(updates)
        key = _util.wrap(state.init_key)
        scale_prev = jnp.power(jnp.float32(decay), state.count.astype(jnp.float32))
        scale_next = scale_prev * jnp.float32(decay)
        moved, targets, scores = [], [], []
        for (path, p), u in zip(leaves, u_leaves, strict=True):
            w0 = _regenerate(key, path, p, init_fn).astype(jnp.float32)
            ref_prev = w0 if decay == 1.0 else w0 * scale_prev
            ref_next = w0 if decay == 1.0 else w0 * scale_next
            new = p.astype(jnp.float32) + u.astype(jnp.float32)
            moved.append(new)
            targets.append(ref_next)
            # XLA:CPU may contract the initializer's last multiply with this
            # subtraction into an FMA, leaving a rounding residue where the
            # weight sits exactly at its initial value; the compare is exact.
            scores.append(jnp.where(new == ref_prev, 0.0, jnp.abs(new - ref_prev)))
        bits = [lax.bitcast_convert_type(s, jnp.uint32) for s in scores]
        budgets = _budgets(tracked, [s.size for s in scores], scope)
        groups = [bits] if scope == "global" else [[b] for b in bits]

        def exact(_):
            return [_kth_largest(g, k) for g, k in zip(groups, budgets, strict=True)]

        if threshold == "exact":
            thresholds = exact(None)
        else:
            previous = [state.threshold] if scope == "global" else list(state.threshold)
            thresholds = lax.cond(state.count == 0, exact, lambda _: previous, None)
        per_leaf = thresholds * len(scores) if scope == "global" else thresholds
        new_updates, counts = [], []
        for p, new, target, s, t in zip(
            [leaf for _, leaf in leaves], moved, targets, scores, per_leaf, strict=True
        ):
            keep = (s >= t) & (s > 0)
            counts.append(jnp.sum(keep, dtype=jnp.int32))
            value = jnp.where(keep, new, target)
            new_updates.append((value - p.astype(jnp.float32)).astype(p.dtype))
        if threshold == "quantile":
            group_counts = [sum(counts)] if scope == "global" else counts
            thresholds = [
                t * jnp.exp(jnp.float32(quantile_rate) * (c.astype(jnp.float32) / k - 1.0))
                for t, c, k in zip(thresholds, group_counts, budgets, strict=True)
            ]
        new_state = DropBackState(
            count=state.count + 1,
            init_key=state.init_key,
            threshold=thresholds[0] if scope == "global" else list(thresholds),
            tracked=sum(counts),
        )
        return treedef.unflatten(new_updates), new_state

    return optax.GradientTransformation(init_fn_, update_fn)


def dropback_stats(state: DropBackState, params: Any) -> dict[str, float]:
    """Budget, tracked count, sparsity and state memory of a DropBack run.

    Args:
      state: the :class:`DropBackState` (e.g. ``opt_state[-1]`` of a chain).
      params: the current params.

    Returns:
      ``total`` weights, ``tracked`` by the last update, ``compression``
      (total / tracked), ``zero_fraction`` (params exactly 0, e.g. after
      Procrustes' decay), ``state_bytes`` (the DropBack state) and
      ``params_bytes`` (for comparison).

    >>> import jax, jax.numpy as jnp, jaxmx.optax
    >>> state = jaxmx.optax.dropback(10, init_key=jax.random.key(0)).init(jnp.zeros(100))
    >>> jaxmx.optax.dropback_stats(state, jnp.zeros(100))["state_bytes"]
    20
    """
    if not isinstance(state, DropBackState):
        raise TypeError(f"expected a DropBackState, got {type(state).__name__}")
    total = _util.tree_size(params)
    tracked = int(state.tracked)
    zeros = sum(int(jnp.sum(leaf == 0)) for leaf in jax.tree.leaves(params))
    return {
        "total": total,
        "tracked": tracked,
        "compression": total / tracked if tracked else float("inf"),
        "zero_fraction": zeros / total if total else 0.0,
        "state_bytes": _util.tree_nbytes(state),
        "params_bytes": _util.tree_nbytes(params),
    }
