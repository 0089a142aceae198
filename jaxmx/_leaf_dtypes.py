"""What dtype each leaf of an MXTensor has, and which leaves exist, by format.

The part of :func:`jaxmx.tensor.check_leaves` that runs on every MXTensor
construction: dtypes and presence of the leaves that are arrays, read off
the format record (no shapes, no values). It takes any object with an
MXTensor's fields, so it sits below the tensor module.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jaxmx.formats import MXFormat

__all__ = ["check_leaf_dtypes", "is_leaf_array"]

_UINT8 = np.dtype(np.uint8)
_FLOAT32 = np.dtype(np.float32)
_LEAF_TYPES = (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)


def is_leaf_array(x: Any) -> bool:
    """Whether ``x`` is an array leaf (not a JAX placeholder, not a float0 cotangent)."""
    tp = type(x)
    if tp not in _ARRAY_TYPES:
        if not isinstance(x, _LEAF_TYPES):
            return False
        _ARRAY_TYPES.add(tp)
    # Not float0 (a structured dtype), the cotangent of integer leaves under
    # jax.grad(..., allow_int=True); ml_dtypes' dtypes are "V" kind too, unnamed.
    return x.dtype.names is None


# Types seen to be arrays (a set lookup is cheaper than isinstance on jax.Array).
_ARRAY_TYPES: set[type] = set()
# Per format: (format, unpacked code dtypes, and the dtype scale, tensor_scale
# and micro are held in, or None where the format has none). Keyed by id
# (hashing a format hashes every field of its records), the format kept in
# the entry so that the id stays its own.
_LEAF_RULES: dict[int, tuple] = {}


def _leaf_rules(fmt: MXFormat) -> tuple:
    rules = _LEAF_RULES.get(id(fmt))
    if rules is not None and rules[0] is fmt:
        return rules
    elem = fmt.element
    held = np.dtype(elem.storage_dtype)
    codes: tuple[np.dtype, ...] = (held,)
    if elem.kind == "float" and held.itemsize * 8 != elem.bits:
        # Sub-byte floats held in a byte on CPU (jaxmx.codes.storage_dtype).
        codes = (held, np.dtype(np.uint16 if elem.bits > 8 else np.uint8))
    rules = (
        fmt,
        codes,
        None if fmt.scale is None else np.dtype(fmt.scale.storage_dtype),
        _FLOAT32 if fmt.tensor_scale else None,
        None if fmt.micro is None else _UINT8,
    )
    if len(_LEAF_RULES) > 1024:  # formats made in a loop: start over
        _LEAF_RULES.clear()
    _LEAF_RULES[id(fmt)] = rules
    return rules


def check_leaf_dtypes(t: Any) -> None:
    """dtypes of the leaves that are arrays, and which optional leaves exist."""
    fmt = t.format
    _, codes, scale, tensor_scale, micro = _leaf_rules(fmt)
    data = t.data
    real = is_leaf_array(data)
    if real:
        allowed = (_UINT8,) if t.packed else codes
        if data.dtype not in allowed:
            raise ValueError(
                f"this {fmt.name} MXTensor's data (its codes) is {np.dtype(data.dtype).name}; "
                f"{'packed ' if t.packed else ''}{fmt.element.name} codes are held in "
                f"{' or '.join(d.name for d in allowed)}"
            )
    _check_optional(t, "scale", scale, "block scales", real)
    if tensor_scale is not None or t.tensor_scale is not None:
        _check_optional(t, "tensor_scale", tensor_scale, "a per-tensor scale", real)
    if micro is not None or t.micro is not None:
        _check_optional(t, "micro", micro, "microexponent bits", real)


def _check_optional(t: Any, name: str, dtype: Any, what: str, real: bool) -> None:
    leaf = getattr(t, name)
    fmt = t.format
    if leaf is None:
        if dtype is not None and real:
            raise ValueError(
                f"this {fmt.name} MXTensor has no {name}; {fmt.name} has {what} ({dtype.name})"
            )
    elif is_leaf_array(leaf):
        if dtype is None:
            raise ValueError(
                f"this {fmt.name} MXTensor holds a {name}, but {fmt.name} has no {what} "
                f"({name} must be None)"
            )
        if leaf.dtype != dtype:
            raise ValueError(
                f"this {fmt.name} MXTensor's {name} is {np.dtype(leaf.dtype).name}; "
                f"{fmt.name} holds {what} in {dtype.name}"
            )
