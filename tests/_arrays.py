"""Array helpers shared by the tests: inputs, bitwise comparisons of pytrees, jaxpr walks."""

import jax
import jax.numpy as jnp
import numpy as np


def normal(i, shape, scale=1.0):
    """``scale`` times standard normal float32 values from key ``i``."""
    return scale * jax.random.normal(jax.random.key(i), shape, jnp.float32)


def assert_same(a, b):
    """Two pytrees' leaves are equal, bit for bit."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_differs(a, b):
    """Some leaf of two pytrees of the same structure differs."""
    assert any(
        not np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def pallas_calls(jaxpr):
    """The ``pallas_call`` equations of an (open) jaxpr, nested ones included."""
    for e in jaxpr.eqns:
        if e.primitive.name == "pallas_call":
            yield e
        for p in e.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from pallas_calls(inner)
