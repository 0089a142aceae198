"""Where a weight sits in a parameter tree, and which axis a matmul contracts.

Leaf-path conventions shared by :func:`jaxmx.quantize_params` and
:mod:`jaxmx.ptq`: a path is the ``/``-joined key string of a pytree leaf
(``params/Dense_0/kernel``), and the contraction axis of a weight follows
from the framework's naming (Flax ``kernel``, PyTorch-style ``weight``,
``embedding``) unless a user's ``axes`` says otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import jax
import numpy as np

__all__ = ["axis_function", "contraction_axis", "path_string"]


def contraction_axis(path: str, x: jax.Array | np.ndarray) -> int | None:
    """The axis a weight at ``path`` is contracted over, by framework convention.

    >>> import jax.numpy as jnp
    >>> contraction_axis("params/Dense_0/kernel", jnp.ones((8, 4)))
    0
    >>> contraction_axis("fc/weight", jnp.ones((4, 8)))  # (out, in)
    1

    * ``.../kernel`` (Flax ``Dense``, ``Conv``, ``DenseGeneral``): 2-D
      ``(in, out)`` -> 0; 3-D and more -> ``ndim - 2`` (a ``Conv`` kernel's
      input features ``I`` in ``(*window, I, O)``, and ``DenseGeneral``
      kernels whose last two axes are ``(in, out)``);
    * ``.../weight`` 2-D (PyTorch-style ``(out, in)``, Equinox ``Linear``) -> 1;
    * ``.../embedding`` (Flax ``Embed``) -> 1, the feature axis that
      ``Embed.attend`` (tied output layers) contracts;
    * anything else (biases, norms, scalars) -> ``None``: not a matmul weight.

    Weights laid out otherwise (e.g. a ``DenseGeneral`` kernel ``(in, heads,
    head_dim)``, contracted over axis 0) need ``axes=`` in
    :func:`quantize_params`. A wrong axis is never silent: under
    :func:`jaxmx.intercept` such a weight is decoded and re-quantized by the
    rule, and :func:`jaxmx.dot_general` refuses it with an error.
    """
    parts = [q for q in path.split("/") if q not in ("value", "raw_value")]  # nnx Variables
    name = parts[-1] if parts else ""
    ndim = np.ndim(x) if not hasattr(x, "ndim") else x.ndim
    if name == "kernel" and ndim >= 2:
        return 0 if ndim == 2 else ndim - 2
    if name == "weight" and ndim == 2:
        return 1
    if name == "embedding" and ndim == 2:
        return 1
    return None


def path_string(path: Iterable[object]) -> str:
    """The ``/``-joined key string of a pytree key path (``params/Dense_0/kernel``)."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def axis_function(axes):
    """``(path, x) -> axis or None`` from ``axes``: None, ``{pattern: axis}`` or a function.

    Paths no pattern matches (or for which the function returns None) fall
    back to :func:`contraction_axis`.
    """
    if axes is None:
        return contraction_axis
    if callable(axes):

        def by_function(p, x):
            got = axes(p, x)
            return contraction_axis(p, x) if got is None else got

        return by_function
    if not isinstance(axes, Mapping):
        raise TypeError(
            "axes must be a dict {pattern: axis} or a function (path, array) -> axis, "
            f"got {axes!r}"
        )
    compiled = [(re.compile(k), v) for k, v in axes.items()]

    def by_pattern(p, x):
        for pattern, axis in compiled:
            if pattern.search(p):
                return axis
        return contraction_axis(p, x)

    return by_pattern
