"""The primitives and op classes the intercept planner and interpreter know."""

from __future__ import annotations

import os

from jax.extend import core as jcore

P = jcore.primitives
DOT = P.dot_general_p
CONV = P.conv_general_dilated_p
# Matmul primitives jaxmx has no MX version of: reported, never replaced.
OTHER_MATMULS = frozenset({"ragged_dot_general", "ragged_dot"})
# Ops whose output is a view of their first operand's values (for argument
# paths: a weight reshaped, transposed, cast or sliced is still that weight).
VIEWS = frozenset(
    {
        "reshape",
        "transpose",
        "convert_element_type",
        "squeeze",
        "expand_dims",
        "broadcast_in_dim",
        "slice",
        "dynamic_slice",
        "gather",
        "copy",
        "copy_p",
        "reduce_precision",
        "sharding_constraint",
    }
)
# Ops whose i-th output is their i-th operand, moved or fenced.
IDENTITIES = frozenset({"device_put", "optimization_barrier"})
# jaxmx/ (this package sits one level below it).
JAXMX_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JAXMX_OPS = {"_mx_dot": "dot_general", "_mx_conv": "conv_general_dilated"}
