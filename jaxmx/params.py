"""Post-training quantization of a parameter tree: matmul weights to packed MXTensors.

:func:`quantize_params` turns the matmul weights of any parameter pytree
(Flax linen variables, an nnx ``State``, a dict of arrays) into MXTensors
blocked along the axis each weight is contracted over, by rules on the
leaf paths. The model then runs from those weights under
:func:`jaxmx.intercept`, which hands each MXTensor to the matmul that
contracts along its blocks as it is (never quantized twice) and decodes it
for anything else.

>>> import jax, jax.numpy as jnp, jaxmx
>>> params = {"dense": {"kernel": jnp.ones((64, 16)), "bias": jnp.zeros(16)}}
>>> q = jaxmx.quantize_params(params, "mxfp4")
>>> q["dense"]["kernel"]
MXTensor(mxfp4_e2m1, shape=(64, 16), dtype=float32, axis=-2, block_size=32, packed, nbytes=544)
>>> jaxmx.param_bytes(q), jaxmx.param_bytes(params)
(608, 4160)
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from jaxmx._paths import axis_function, contraction_axis, path_string
from jaxmx._sparse_weights import quantize_sparse
from jaxmx.config import DotConfig
from jaxmx.formats import MXFormat
from jaxmx.ptq import PTQMethod, ScaleSearch
from jaxmx.quantize import quantize
from jaxmx.rules import RulesLike, parse_rules
from jaxmx.sparse_tensor import NMSparseTensor
from jaxmx.sparsity import NMSparsity
from jaxmx.tensor import MXTensor

__all__ = ["contraction_axis", "param_bytes", "quantize_params"]


def quantize_params(
    params: Any,
    rules: RulesLike = "mxfp4",
    *,
    packed: bool = True,
    axes: Mapping[str, int] | Callable[[str, jax.Array], int | None] | None = None,
    block_size: int | None = None,
    warn: bool = True,
    method: PTQMethod | None = None,
    sparsity: NMSparsity | Mapping[str, NMSparsity | None] | None = None,
) -> Any:
    """Quantizes the matmul weights of a parameter tree to MXTensors.

    Args:
      params: any pytree of arrays: linen variables (``{"params": ...}``),
        an nnx ``State`` (``nnx.state(model)``), a dict.
      rules: which weights get which format, by regular expression searched
        in the leaf's path (``"params/block_0/mlp/kernel"``; the first match
        decides): ``[(pattern, fmt), ...]``, a dict, or one format for all.
        ``fmt`` is a format name, an :class:`~jaxmx.MXFormat`, a preset or
        :class:`~jaxmx.DotConfig` (its ``rhs``, the weight format), or
        ``None`` to keep the weight as it is.
      packed: store sub-byte codes packed (two FP4 codes per byte): the real
        storage. Formats that do not pack (8-bit) are stored as they are.
      axes: the contraction axis of weights the naming convention of
        :func:`contraction_axis` does not cover: a dict ``{pattern: axis}``
        (first match) or a function ``(path, array) -> axis or None``;
        consulted before the convention.
      block_size: overrides the format's block size.
      warn: warn about rules that matched no weight.
      method: how each weight is rounded. ``None`` or ``"direct"``: direct
        cast (OCP floor scales, round to nearest even); ``"search"``: per-block
        scale search (:class:`jaxmx.ptq.ScaleSearch` with its defaults); or a
        method object, :class:`jaxmx.ptq.ScaleSearch` or
        :class:`jaxmx.ptq.GPTQ` (which needs calibration Hessians). Rotations
        (:func:`jaxmx.ptq.rotate_weights`) change the model too, so they are
        applied to ``params`` before this call.
      sparsity: store weights N:M sparse along their contraction axis
        (:func:`jaxmx.quantize_sparse`): a :class:`~jaxmx.NMSparsity` for
        every weight a rule quantizes, or ``{pattern: NMSparsity or None}``
        (the first pattern found in the leaf's path decides; no match or
        ``None``: dense). Such a weight becomes an
        :class:`~jaxmx.NMSparseTensor`: its kept values in the rule's format,
        ``block_size`` (or the format's) counting kept values, and their
        positions; :func:`jaxmx.intercept` serves it. Magnitude scores only,
        with the direct cast (``method=None``).

    Returns:
      The same tree with each matched matmul weight replaced by a packed
      :class:`~jaxmx.MXTensor` (an :class:`~jaxmx.NMSparseTensor` where
      ``sparsity`` says so); every other leaf is unchanged.

    Raises:
      ValueError: a rule names a weight for which no contraction axis is
        known (give it in ``axes``), or an axis is out of range; a sparse
        weight whose contraction axis ``m`` does not divide, or whose format
        or block size cannot hold whole groups (the message names the weight).

    >>> import jax.numpy as jnp, jaxmx
    >>> params = {"attn": {"kernel": jnp.ones((64, 64))}, "head": {"kernel": jnp.ones((64, 8))}}
    >>> q = jaxmx.quantize_params(params, [("head", None), (".*", "mxfp4")])
    >>> type(q["attn"]["kernel"]).__name__, type(q["head"]["kernel"]).__name__
    ('MXTensor', 'ArrayImpl')
    >>> s = jaxmx.quantize_params(params, "mxfp4", sparsity={"attn": jaxmx.NMSparsity(2, 4)})
    >>> s["attn"]["kernel"].bits_per_element, q["attn"]["kernel"].bits_per_element
    (3.125, 4.25)
    """
    rules = parse_rules(rules)
    method = _method(method)
    axis_of = axis_function(axes)
    sparsity_of = _sparsity_function(sparsity)
    hits = [0] * len(rules)
    unknown: list[str] = []

    def one(path, x):
        p = path_string(path)
        for i, rule in enumerate(rules):
            if rule.matches(p):
                hits[i] += 1
                fmt = _weight_format(rule.config)
                break
        else:
            return x
        if fmt is None or not _is_float_array(x):
            return x
        axis = axis_of(p, x)
        if axis is None:
            if np.ndim(x) >= 2:
                unknown.append(f"{p} {tuple(np.shape(x))}")
            return x
        if not -x.ndim <= axis < x.ndim:
            raise ValueError(f"axis {axis} of {p} is out of range for shape {tuple(x.shape)}")
        pack = packed and fmt.element.bits < 8
        sp = sparsity_of(p)
        if sp is not None:
            if method is not None:
                raise ValueError(
                    f"{p}: sparsity= stores kept values by direct cast; method={method!r} is "
                    "not supported with it (use method=None)"
                )
            try:
                return quantize_sparse(x, fmt, sp, axis=axis, block_size=block_size, packed=pack)
            except ValueError as err:
                raise ValueError(f"{p} {tuple(x.shape)}: {err}") from None
        if method is not None:
            return method.quantize_weight(p, x, fmt, axis=axis, block_size=block_size, packed=pack)
        return quantize(x, fmt, axis=axis, block_size=block_size, packed=pack)

    out = jax.tree_util.tree_map_with_path(one, params)
    if unknown:
        raise ValueError(
            "no contraction axis known for these weights matched by a rule: "
            + ", ".join(unknown)
            + "; give it with axes={pattern: axis}, or a rule with None to keep them"
        )
    if warn:
        for rule, n in zip(rules, hits, strict=True):
            if not n:
                warnings.warn(
                    f"jaxmx.quantize_params: rule {rule.pattern!r} matched no parameter",
                    stacklevel=2,
                )
    return out


def param_bytes(tree: Any) -> int:
    """Bytes held by a tree's arrays; an MXTensor counts its codes and scales, an
    NMSparseTensor its kept values' codes and scales and its indices.

    >>> import jax.numpy as jnp, jaxmx
    >>> w = jnp.ones((128, 64))
    >>> q = jaxmx.quantize(w, "mxfp4", packed=True)
    >>> jaxmx.param_bytes({"w": w}), jaxmx.param_bytes({"w": q})
    (32768, 4352)
    """
    total = 0
    mx = (MXTensor, NMSparseTensor)
    for leaf in jax.tree_util.tree_leaves(tree, is_leaf=lambda t: isinstance(t, mx)):
        if isinstance(leaf, mx):
            total += leaf.nbytes
        elif hasattr(leaf, "dtype") and hasattr(leaf, "shape"):
            total += int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    return total


def _method(method):
    """None for a direct cast, else a :class:`jaxmx.ptq.PTQMethod`."""
    if method is None or method == "direct":
        return None
    if method == "search":
        return ScaleSearch()
    if isinstance(method, str) or not isinstance(method, PTQMethod):
        raise ValueError(
            f"unknown method {method!r}; allowed: None or 'direct' (direct cast), 'search', "
            "jaxmx.ptq.ScaleSearch(...), jaxmx.ptq.GPTQ(hessians=...), or any object with "
            "the jaxmx.ptq.PTQMethod method quantize_weight"
        )
    return method


def _sparsity_function(
    sparsity: NMSparsity | Mapping[str, NMSparsity | None] | None,
) -> Callable[[str], NMSparsity | None]:
    """``path -> NMSparsity or None`` from ``quantize_params(sparsity=...)``."""
    if sparsity is None or isinstance(sparsity, NMSparsity):
        return lambda p: sparsity
    if not isinstance(sparsity, Mapping):
        raise TypeError(
            "sparsity must be a jaxmx.NMSparsity, a dict {pattern: NMSparsity or None} or None, "
            f"got {sparsity!r}"
        )
    table = list(sparsity.items())
    for pattern, sp in table:
        if not isinstance(pattern, str):
            raise TypeError(f"a sparsity pattern is a regular expression string, got {pattern!r}")
        if sp is not None and not isinstance(sp, NMSparsity):
            raise TypeError(f"sparsity[{pattern!r}] must be a jaxmx.NMSparsity or None, got {sp!r}")

    def by_pattern(p: str) -> NMSparsity | None:
        return next((sp for pattern, sp in table if re.search(pattern, p)), None)

    return by_pattern


def _weight_format(config: DotConfig | None) -> MXFormat | None:
    return None if config is None else config.role("rhs")


def _is_float_array(x: object) -> bool:
    return hasattr(x, "dtype") and jax.numpy.issubdtype(x.dtype, jax.numpy.floating)
