"""Parametrizations that split a product between ``make test`` and ``make test-slow``.

Every case compiles its own XLA programs, so running every format through
every test costs minutes. :func:`covering` keeps one value in ``every`` in
the default suite, rotated by ``salt`` so that different tests pick
different values (over a file's tests every value runs), and marks the rest
``slow``: ``make test-slow`` runs the full product.
"""

import pytest


def covering(values, *, salt: int = 0, every: int = 2, always=()):
    """``pytest.param`` of each value; the default suite runs every ``every``-th one.

    Args:
      values: the parameter values (tuples for several arguments).
      salt: rotation, so that tests with different salts run different values.
      every: one value in ``every`` runs in the default suite.
      always: values that run in the default suite whatever the rotation.
    """
    out = []
    for i, v in enumerate(values):
        fast = (i + salt) % every == 0 or v in always
        args = v if isinstance(v, tuple) else (v,)
        out.append(pytest.param(*args, marks=() if fast else pytest.mark.slow))
    return out
