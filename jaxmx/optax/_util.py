"""Small helpers shared by the jaxmx.optax transformations: roundings, keys and byte counts."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Rounding names: the core's vocabulary ("nearest_even", "stochastic"), plus
# "nearest", the name jaxmx.optax used first, kept as an alias.
ROUNDINGS = ("nearest_even", "stochastic")
ROUNDING_ALIASES = {"nearest": "nearest_even"}


def rounding(name: Any, what: str = "rounding") -> str:
    """The canonical rounding name: ``"nearest_even"`` (alias ``"nearest"``) or ``"stochastic"``."""
    canonical = ROUNDING_ALIASES.get(name, name) if isinstance(name, str) else name
    if canonical not in ROUNDINGS:
        raise ValueError(
            f"unknown {what} {name!r}; allowed: 'nearest_even' (alias 'nearest'), 'stochastic'"
        )
    return canonical


def key_data(key: Any, what: str = "key") -> jax.Array:
    """uint32[2] data of a PRNG key (typed ``jax.random.key`` or raw ``PRNGKey``).

    States hold the raw words rather than a typed key: every checkpoint
    backend stores uint32 arrays.
    """
    if key is None:
        raise TypeError(
            f"{what} must be a threefry PRNG key (jax.random.key(n) or PRNGKey(n)), got None"
        )
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    if key.dtype != jnp.uint32 or key.shape != (2,):
        raise TypeError(
            f"{what} must be a threefry PRNG key (jax.random.key(n) or PRNGKey(n)), "
            f"got an array of dtype {key.dtype} and shape {key.shape}"
        )
    return key


def wrap(raw: jax.Array) -> jax.Array:
    """The typed key of raw uint32[2] data."""
    return jax.random.wrap_key_data(raw)


def next_key(raw: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Splits raw key data into (data of the key to keep, typed key to use now)."""
    keep, use = jax.random.split(wrap(raw))
    return jax.random.key_data(keep), use


def tree_nbytes(tree: Any) -> int:
    """Bytes held by every array leaf of a pytree (works on abstract trees too)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            total += math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    return total


def tree_size(tree: Any) -> int:
    """Number of elements over every array leaf of a pytree."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree) if hasattr(leaf, "shape"))
