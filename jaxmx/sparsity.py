"""N:M sparsity along a matmul's contraction axis: which N of every M elements stay.

In each group of ``m`` consecutive elements along the contraction axis of an
operand, the ``n`` elements with the largest score are kept and the others
become zero (2:4, 4:8, 8:16 are the patterns sparse tensor cores run). The
score is one of:

* ``"magnitude"``: ``|x|``.
* ``"amber"``: Amber Pruner's robust-norm score for activations (An et al.
  2025, "Amber Pruner: Leveraging N:M Activation Sparsity for Efficient
  Prefill in Large Language Models", arXiv:2508.02128, method section,
  "Weight-Aware Scoring" and "Robust-Norm Scoring"):
  ``S_ij = |X_ij| * f(W_hat_j)`` with ``f(W_hat_j) = ||W_hat_j||_2 /
  min_k ||W_hat_k||_2``, where ``W_hat_j`` is the slice of the weight that
  input feature ``j`` multiplies, after the whole weight is standardized
  with the mean and standard deviation of its values between the 0.5% and
  99.5% quantiles. See :func:`amber_factor` for what is assumed.
* ``"wanda"``: Wanda's score for weights (Sun et al. 2023, "A Simple and
  Effective Pruning Approach for Large Language Models", arXiv:2306.11695,
  section 3): ``S_ij = |W_ij| * ||X_j||_2``, the activation feature's norm
  over every token.

"amber" and "wanda" need the other operand of the matmul; inside
``jaxmx.dot_general`` it is there, and :func:`sparsify` takes it as
``other=``. Both scores are defined for either side (``|x|`` times a norm of
the other operand's slice for each feature); "amber" is meant for
activations and "wanda" for weights.

Ties keep the lower index; exactly ``n`` elements are kept in every group,
zeros and ties included. A NaN scores above every number, so a NaN of ``x``
is kept and reaches the product (in a group with more NaNs than ``n``, the
first ``n`` are kept). Scores are computed in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxmx.spec import is_positive_int

__all__ = [
    "AmberFactor",
    "BACKWARDS",
    "NMSparsity",
    "SCORES",
    "amber_factor",
    "apply_mask",
    "probe_positions",
    "nm_mask",
    "score_mask",
    "sparsify",
    "wanda_factor",
]

SCORES = ("magnitude", "amber", "wanda")
BACKWARDS = ("masked", "straight_through")


@dataclasses.dataclass(frozen=True, eq=False)
class AmberFactor:
    """Amber Pruner's per-feature factors of one weight, computed once.

    Made by :meth:`AmberFactor.of` (:func:`amber_factor` of the weight,
    jitted) for :func:`jaxmx.precompute_amber`, and carried by
    ``NMSparsity(score="amber", factor=...)``, which then uses it instead of
    sorting the weight on every call (:meth:`fit`). Static data: compared and
    hashed by its shape, axes, trim and the bytes of its values and probe,
    so a config holding one is a valid static argument of ``jit``.
    """

    # float32 factors, indexed by the weight's axes in ``keep`` (ascending).
    values: np.ndarray
    # Shape of the weight they were computed from.
    shape: tuple[int, ...]
    # The weight's axes the matmul contracts (0-based, ascending).
    keep: tuple[int, ...]
    # NMSparsity.amber_trim they were computed with.
    trim: float
    # Where the weight came from (its parameter path), for messages.
    source: str = ""
    # The weight's float32 values at probe_positions(shape) (fit compares them).
    probe: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float32))

    def __post_init__(self) -> None:
        values = np.array(self.values, dtype=np.float32)  # a copy, read-only below
        values.setflags(write=False)
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "keep", tuple(sorted(int(d) for d in self.keep)))
        want = tuple(self.shape[d] for d in self.keep)
        if values.shape != want:
            raise ValueError(
                f"AmberFactor values of shape {values.shape}; a weight of shape {self.shape} "
                f"indexed by its axes {self.keep} needs {want}"
            )
        probe = np.array(self.probe, dtype=np.float32).reshape(-1)
        probe.setflags(write=False)
        object.__setattr__(self, "probe", probe)
        if probe.shape != probe_positions(self.shape).shape:
            raise ValueError(
                f"AmberFactor probe has {probe.size} values; a weight of shape {self.shape} "
                f"is probed at {probe_positions(self.shape).size} positions"
            )
        digest = hashlib.sha1(values.tobytes() + probe.tobytes()).hexdigest()
        object.__setattr__(self, "_digest", digest)

    @classmethod
    def of(cls, weight: Any, keep: Sequence[int], trim: float, source: str = "") -> AmberFactor:
        """The factors of a concrete ``weight`` contracted over its axes ``keep``,
        computed as inside a matmul (:func:`amber_factor`, jitted)."""
        w = jnp.asarray(weight, jnp.float32)
        keep = tuple(sorted(int(d) for d in keep))
        values = _amber_jit(w, keep, float(trim))
        probe = np.asarray(w).reshape(-1)[probe_positions(tuple(w.shape))]
        return cls(np.asarray(values), tuple(w.shape), keep, float(trim), source, probe)

    def _key(self) -> tuple:
        return (self.shape, self.keep, self.trim, self.__dict__["_digest"])

    def __hash__(self) -> int:
        return hash(self._key())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AmberFactor) and self._key() == other._key()

    def __repr__(self) -> str:
        return f"AmberFactor({self.source or '?'}, shape={self.shape}, keep={self.keep})"

    def fit(self, other: Any, keep: Sequence[int], batch: Sequence[int]) -> jax.Array:
        """The factors for the matmul's other operand ``other`` (a float array).

        Its shape and contracted axes must be the stored weight's (checked
        when tracing: a ValueError otherwise). Its values at :data:`PROBES`
        fixed positions are compared, bit for bit, with the stored weight's
        when the matmul runs: a weight that is not the one the factors were
        computed from (updated, cast to another dtype, used transposed) gets
        its factors computed on the call, as without a precomputed factor.
        """
        shape = None if other is None else tuple(other.shape)
        if shape != self.shape or tuple(sorted(keep)) != self.keep or tuple(batch):
            raise ValueError(
                f"the precomputed amber factor of {self.source or 'a weight'} (shape "
                f"{self.shape}, contracted over axes {self.keep}) does not fit this matmul, "
                f"whose other operand has shape {shape} and is contracted over axes "
                f"{tuple(sorted(keep))}{' with batch axes' if tuple(batch) else ''}: the weight "
                "is used reshaped or sliced here; leave it out of the rules given "
                "to jaxmx.precompute_amber (its factor is then computed on each call)"
            )
        w = jnp.asarray(other, jnp.float32)
        at = probe_positions(self.shape)
        got = jax.lax.bitcast_convert_type(w.reshape(-1)[at], jnp.uint32)
        same = jnp.all(got == jnp.asarray(self.probe.view(np.uint32)))
        return jax.lax.cond(
            same,
            lambda w: jnp.asarray(self.values),
            lambda w: amber_factor(w, self.keep, self.trim),
            w,
        )


@dataclasses.dataclass(frozen=True)
class NMSparsity:
    """Keep ``n`` of every ``m`` consecutive elements along the contraction axis.

    Args:
      n: elements kept per group, ``0 < n < m``.
      m: group length (an int >= 2; the hardware patterns use powers of two).
      score: ``"magnitude"`` (``|x|``), ``"amber"`` (Amber Pruner's
        robust-norm activation score, arXiv:2508.02128) or ``"wanda"``
        (``|w| * ||x_j||``, arXiv:2306.11695); the last two read the other
        operand of the matmul.
      backward: what the sparsified operand's own gradient is, in
        ``jaxmx.dot_general``. ``"masked"`` (default): the gradient of
        ``mask * x`` with the mask held fixed for the step, so pruned
        elements get zero (what training a model with a per-step N:M
        pattern needs: the update goes to the elements that took part).
        ``"straight_through"``: the gradient passes to every element as if
        nothing were masked (lets pruned elements grow back).
      amber_trim: the quantile trimmed from each end of the weight's values
        before the amber score takes their mean and standard deviation
        (0.005 in the paper).
      factor: amber only: the weight's factors computed once
        (:class:`AmberFactor`, made by :func:`jaxmx.precompute_amber`), used
        instead of computing them from the weight on every call; ``None``
        (default): computed on every call.

    >>> import jaxmx
    >>> jaxmx.NMSparsity(2, 4)
    NMSparsity(n=2, m=4, score='magnitude', backward='masked', amber_trim=0.005)
    >>> jaxmx.NMSparsity(2, 4, score="amber").needs_other
    True
    """

    # Elements kept in each group.
    n: int
    # Consecutive elements along the contraction axis that form a group.
    m: int
    # How elements are ranked within a group: magnitude, amber, wanda.
    score: str = "magnitude"
    # Gradient of the sparsified operand: masked (only kept elements) or
    # straight_through (all elements, as if unmasked).
    backward: str = "masked"
    # amber only: the quantile cut from each end before standardizing the weight.
    amber_trim: float = 0.005
    # amber only: the weight's factors computed once (jaxmx.precompute_amber), or None.
    factor: AmberFactor | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self):
        for name in ("n", "m"):
            if not is_positive_int(getattr(self, name)):
                raise ValueError(
                    f"NMSparsity.{name} must be a positive int, got {getattr(self, name)!r}"
                )
            object.__setattr__(self, name, int(getattr(self, name)))
        if not 0 < self.n < self.m:
            raise ValueError(
                f"NMSparsity needs 0 < n < m (keep n of every m), got n={self.n}, m={self.m}"
            )
        if not isinstance(self.score, str) or self.score not in SCORES:
            raise ValueError(
                f"unknown NMSparsity score {self.score!r}; allowed: {', '.join(SCORES)}"
            )
        if not isinstance(self.backward, str) or self.backward not in BACKWARDS:
            raise ValueError(
                f"unknown NMSparsity backward {self.backward!r}; allowed: {', '.join(BACKWARDS)}"
            )
        t = self.amber_trim
        if isinstance(t, bool) or not isinstance(t, (int, float, np.floating)) or not 0 <= t < 0.5:
            raise ValueError(f"NMSparsity.amber_trim must be a float in [0, 0.5), got {t!r}")
        object.__setattr__(self, "amber_trim", float(t))
        if self.factor is not None:
            if not isinstance(self.factor, AmberFactor):
                raise TypeError(
                    f"NMSparsity.factor must be a jaxmx.sparsity.AmberFactor or None, got "
                    f"{type(self.factor).__name__} (make them with jaxmx.precompute_amber)"
                )
            if self.score != "amber" or self.factor.trim != self.amber_trim:
                raise ValueError(
                    f"NMSparsity.factor is an amber factor computed with trim "
                    f"{self.factor.trim}; it goes with score='amber', amber_trim="
                    f"{self.factor.trim}, not score={self.score!r}, amber_trim={self.amber_trim}"
                )

    @property
    def needs_other(self) -> bool:
        """Whether the score reads the other operand of the matmul."""
        return self.score != "magnitude"

    def describe(self) -> str:
        return f"{self.n}:{self.m} {self.score}" + ("" if self.factor is None else " (precomputed)")

    def replace(self, **changes: Any) -> NMSparsity:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------
# The per-feature factors of the amber and wanda scores.
# --------------------------------------------------------------------------

# Values of a weight AmberFactor.fit compares with the stored weight's.
PROBES = 64


@functools.cache
def probe_positions(shape: tuple[int, ...]) -> np.ndarray:
    """:data:`PROBES` flat positions of a weight of ``shape``, fixed per shape,
    spread at random (a diagonal or a row would not tell a square weight from
    its transpose)."""
    size = math.prod(shape)
    rng = np.random.default_rng(size)
    at = np.sort(rng.choice(size, min(PROBES, size), replace=False))
    at.setflags(write=False)
    return at


@functools.partial(jax.jit, static_argnums=(1, 2))
def _amber_jit(w: jax.Array, keep: tuple[int, ...], trim: float) -> jax.Array:
    return amber_factor(w, keep, trim)


def _reduce_axes(ndim: int, keep: Sequence[int]) -> tuple[int, ...]:
    return tuple(d for d in range(ndim) if d not in keep)


def wanda_factor(other: ArrayLike, keep: Sequence[int]) -> jax.Array:
    """``||other_j||_2`` for each feature ``j``: the L2 norm over every axis of
    ``other`` not in ``keep`` (its contracting and batch axes), in float32.
    The result keeps ``keep``'s axes in ascending order."""
    o = jnp.asarray(other, jnp.float32)
    return jnp.sqrt(jnp.sum(o * o, axis=_reduce_axes(o.ndim, keep)))


def amber_factor(
    other: ArrayLike, keep: Sequence[int], trim: float = 0.005, batch: Sequence[int] = ()
) -> jax.Array:
    """Amber Pruner's robust-norm factor ``f(W_hat_j)`` for each feature ``j``.

    ``keep``: the axes of ``other`` the factor is indexed by (contracting
    and batch); ``batch``: those of them that are batch axes of the matmul.
    Each batch element is a matmul of its own, so steps 1 to 3 run once per
    batch index (as under ``jax.vmap``).

    1. Outliers: the values of the whole weight outside its ``trim`` and
       ``1 - trim`` quantiles (linear interpolation) are left out of the
       statistics (all values are used if none is inside).
    2. Standardization: ``W_hat = (W - mean) / std`` with the mean and the
       population standard deviation of the values kept in step 1
       (``std`` at least 1e-8). Every value is standardized, outliers
       included.
    3. ``f_j = ||W_hat_j||_2 / min_k ||W_hat_k||_2`` (the minimum at least
       1e-8), the norm over the axes of ``other`` not in ``keep``.

    The division by the smallest norm changes no ranking (it is one positive
    number per weight); the paper uses it to keep scores in range in low
    precision. Whether step 2 standardizes the outliers too is not spelled
    out in what we could read of the paper; here it does, as the public
    reimplementation accompanying arXiv:2509.22166 does.
    """
    w = jnp.asarray(other, jnp.float32)
    batch = tuple(batch)
    perm = (*batch, *_reduce_axes(w.ndim, batch))
    wt = jnp.transpose(w, perm)
    wb = wt.reshape(math.prod(w.shape[d] for d in batch), -1)  # (batch, rest)
    q = jnp.array([trim, 1.0 - trim], jnp.float32)
    lo, hi = jnp.quantile(wb, q, axis=1, keepdims=True)
    inside = (wb >= lo) & (wb <= hi)
    inside = jnp.where(jnp.any(inside, axis=1, keepdims=True), inside, True)
    count = jnp.sum(inside, axis=1, keepdims=True).astype(jnp.float32)
    mean = jnp.sum(jnp.where(inside, wb, 0.0), axis=1, keepdims=True) / count
    var = jnp.sum(jnp.where(inside, (wb - mean) ** 2, 0.0), axis=1, keepdims=True) / count
    std = jnp.maximum(jnp.sqrt(var), 1e-8)
    standardized = jnp.transpose(
        ((wb - mean) / std).reshape(wt.shape), tuple(np.argsort(perm).tolist())
    )
    norms = wanda_factor(standardized, keep)
    # norms' axes are keep's in ascending order; the minimum is per batch index.
    ranked = sorted(keep)
    per_batch = tuple(i for i, d in enumerate(ranked) if d not in batch)
    low = jnp.min(norms, axis=per_batch, keepdims=True)
    return norms / jnp.maximum(low, 1e-8)


# --------------------------------------------------------------------------
# Choosing n of every m.
# --------------------------------------------------------------------------


def nm_mask(scores: jax.Array, n: int, m: int, axis: int) -> jax.Array:
    """Boolean mask keeping the ``n`` largest scores of every ``m`` consecutive
    elements along ``axis``; ties keep the lower index, NaN ranks highest.

    An element's rank is the number of elements of its group that beat it:
    a larger score, or the same score (all NaNs counting as equal) at a
    lower index. Ranks are then a permutation of ``0..m-1``, so exactly
    ``n`` are below ``n``. Scores must be non-negative or NaN.
    """
    s = jnp.moveaxis(jnp.asarray(scores, jnp.float32), axis, -1)
    k = s.shape[-1]
    if k % m:
        raise ValueError(f"N:M sparsity with m={m} needs a length that m divides, got {k}")
    # Non-negative floats order as their bit patterns do; every NaN becomes
    # one pattern above +inf (0x7f800000), so NaNs tie with each other only.
    bits = jax.lax.bitcast_convert_type(s, jnp.int32) & 0x7FFFFFFF
    key = jnp.where(jnp.isnan(s), jnp.int32(0x7FC00000), bits)
    g = key.reshape(*s.shape[:-1], k // m, m)
    cols = [g[..., i] for i in range(m)]
    # m - 1 comparisons per element, unrolled (elementwise, so XLA fuses them
    # into one pass): j beats i with a larger key, or an equal one before i.
    keep = []
    for i in range(m):
        beaten = [
            (cols[j] >= cols[i]) if j < i else (cols[j] > cols[i]) for j in range(m) if j != i
        ]
        rank = functools.reduce(jnp.add, [b.astype(jnp.int32) for b in beaten])
        keep.append(rank < n)
    return jnp.moveaxis(jnp.stack(keep, axis=-1).reshape(s.shape), -1, axis)


def score_mask(
    x: ArrayLike,
    sparsity: NMSparsity,
    axis: int,
    other: ArrayLike | None = None,
    pairs: Sequence[tuple[int, int]] = (),
    batch: Sequence[int] = (),
) -> jax.Array:
    """The N:M mask of ``x`` along ``axis`` (checked, non-negative).

    ``other`` is the matmul's other operand and ``pairs`` the ``(x axis,
    other axis)`` pairs the two share (contracting and batch axes): the
    amber and wanda factors are per shared index, broadcast over ``x``'s
    other axes. ``batch``: the batch axes of ``other`` among them.
    """
    x32 = jnp.asarray(x, jnp.float32)
    score = jnp.abs(x32)
    if sparsity.needs_other:
        if other is None:
            raise ValueError(f"the {sparsity.score!r} score needs the matmul's other operand")
        keep = tuple(p[1] for p in pairs)
        if sparsity.factor is not None:
            factor = sparsity.factor.fit(other, keep, batch)
        elif sparsity.score == "amber":
            factor = amber_factor(other, keep, sparsity.amber_trim, batch)
        else:
            factor = wanda_factor(other, keep)
        # factor's axes follow other's axes ascending; place them on x's axes.
        order = sorted(pairs, key=lambda p: p[1])
        x_axes = [p[0] for p in order]
        factor = jnp.transpose(factor, tuple(np.argsort(x_axes).tolist()))
        shape = [1] * x32.ndim
        for d in x_axes:
            shape[d] = x32.shape[d]
        score = score * factor.reshape(shape)
    return nm_mask(score, sparsity.n, sparsity.m, axis)


def apply_mask(x: jax.Array, mask: jax.Array) -> jax.Array:
    """``x`` where ``mask``, zero elsewhere (a zeroed inf is 0, not NaN)."""
    return jnp.where(mask, x, jnp.zeros((), x.dtype))


def sparsify(
    x: ArrayLike,
    sparsity: NMSparsity,
    axis: int = -1,
    *,
    other: ArrayLike | None = None,
    other_axis: int | None = None,
) -> jax.Array:
    """``x`` with N:M sparsity along ``axis``: all but the ``n`` best-scored of
    every ``m`` consecutive elements set to zero.

    Args:
      x: a float array.
      sparsity: an :class:`NMSparsity`.
      axis: the axis the groups run along (a matmul's contraction axis).
      other: the other operand of the matmul, needed by the ``"amber"`` and
        ``"wanda"`` scores (a ``ValueError`` says so if it is missing;
        ``"magnitude"`` does not read it): the
        factor of feature ``j`` is a norm of ``other``'s slice at index ``j``
        of ``other_axis``, over all its other axes.
      other_axis: the axis of ``other`` contracted with ``x``'s ``axis``
        (required with ``other``).

    Returns:
      An array like ``x`` with exactly ``n`` of every ``m`` elements kept
      (ties keep the lower index; a NaN is kept).

    >>> import jax.numpy as jnp, jaxmx
    >>> x = jnp.array([[0.5, -3.0, 1.0, 2.0, 0.0, 0.0, 0.0, -1.0]])
    >>> jaxmx.sparsify(x, jaxmx.NMSparsity(2, 4), axis=1).tolist()
    [[0.0, -3.0, 0.0, 2.0, 0.0, 0.0, 0.0, -1.0]]
    >>> w = jnp.array([[8.0], [1.0], [1.0], [1.0], [1.0], [1.0], [1.0], [1.0]])  # x @ w
    >>> amber = jaxmx.NMSparsity(2, 4, score="amber", amber_trim=0.0)
    >>> jaxmx.sparsify(x, amber, axis=1, other=w, other_axis=0).tolist()[0][:4]
    [0.5, -3.0, 0.0, 0.0]
    """
    if not isinstance(sparsity, NMSparsity):
        raise TypeError(f"sparsity must be a jaxmx.NMSparsity, got {sparsity!r}")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x has dtype {x.dtype}; sparsify takes a float array")
    axis = _axis(axis, x.ndim, "axis")
    if x.shape[axis] % sparsity.m:
        raise ValueError(
            f"{sparsity.describe()} sparsity groups {sparsity.m} elements along axis {axis}, "
            f"whose length {x.shape[axis]} is not a multiple of {sparsity.m}"
        )
    pairs: tuple[tuple[int, int], ...] = ()
    if sparsity.needs_other:
        if other is None or other_axis is None:
            raise ValueError(
                f"the {sparsity.score!r} score needs the other operand of the matmul: give "
                "other= and other_axis= (the axis of other contracted with x's axis), or use "
                "score='magnitude'"
            )
        other = jnp.asarray(other)
        other_axis = _axis(other_axis, other.ndim, "other_axis")
        if other.shape[other_axis] != x.shape[axis]:
            raise ValueError(
                f"other's axis {other_axis} has length {other.shape[other_axis]}, x's axis "
                f"{axis} has length {x.shape[axis]}; they must be the contracted pair"
            )
        pairs = ((axis, other_axis),)
    return _sparsify(x, other, sparsity, axis, pairs)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _sparsify(
    x: jax.Array,
    other: jax.Array | None,
    sparsity: NMSparsity,
    axis: int,
    pairs: tuple[tuple[int, int], ...],
) -> jax.Array:
    return apply_mask(x, score_mask(x, sparsity, axis, other, pairs))


def _axis(axis: Any, ndim: int, name: str) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for an array of rank {ndim}")
    return int(axis) % ndim
