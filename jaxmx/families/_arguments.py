"""A quantize call's argument checks: each message names what was given and what is allowed.

:func:`jaxmx.quantize`, :func:`jaxmx.fake_quantize` and
:func:`jaxmx.pallas.quantize_rows_and_columns` take the same arguments and
refuse them the same way; they live here, below both :mod:`jaxmx.quantize`
and :mod:`jaxmx.pallas`, so that neither imports the other's checks.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxmx import numerics
from jaxmx.spec import QuantSpec
from jaxmx.tensor import MXTensor


def check_array(x: Any, what: str = "x") -> jax.Array:
    """``x`` as a float32, bfloat16 or float16 array; anything else is refused."""
    if isinstance(x, MXTensor):
        raise TypeError(f"{what} is already an MXTensor; dequantize it first")
    x = jnp.asarray(x)
    if not any(x.dtype == d for d in numerics.FLOAT_DTYPES):
        kind = (
            "complex"
            if jnp.issubdtype(x.dtype, jnp.complexfloating)
            else "integer"
            if jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_
            else "unsupported"
        )
        extra = (
            " (convert float64 to float32 yourself: jaxmx does not round twice silently)"
            if x.dtype == jnp.float64
            else ""
        )
        raise TypeError(
            f"{what} has {kind} dtype {x.dtype}; MX quantization takes float32, "
            f"bfloat16 or float16 input{extra}"
        )
    return x


def check_rounding(rounding: Any, key: Any, what: str = "rounding") -> None:
    """Validates a rounding name and its key: one that draws random bits needs
    a key, the others take none."""
    if numerics.rounding_mode(rounding, what).random_bits:
        if key is None:
            raise ValueError(f"{what}={rounding!r} needs a PRNG key: pass key=jax.random.key(...)")
    elif key is not None:
        raise ValueError(
            f"a key was given but {what} is {rounding!r}, which uses no random bits; "
            "pass rounding='stochastic' or drop the key"
        )


def check_tensor_amax(tensor_amax: Any, spec: QuantSpec) -> jax.Array | None:
    """``tensor_amax`` as a float32 scalar, for formats with a per-tensor scale."""
    if tensor_amax is None:
        return None
    if not spec.rules.tensor_amax:
        raise ValueError(
            f"tensor_amax= sets the per-tensor scale of NVFP4-like formats; {spec.format.name} "
            "has none to set"
        )
    a = jnp.asarray(tensor_amax)
    if a.shape != () or not (
        jnp.issubdtype(a.dtype, jnp.floating) or jnp.issubdtype(a.dtype, jnp.integer)
    ):
        raise TypeError(f"tensor_amax must be a real scalar, got {tensor_amax!r}")
    return a.astype(jnp.float32)


def random_bits(key: Any, shape: tuple[int, ...]) -> jax.Array:
    """The uint32 random bits of stochastic rounding, one per element of ``shape``."""
    # Accepts new-style keys (jax.random.key) and raw uint32[2] ones (PRNGKey).
    return jax.random.bits(key, shape, jnp.uint32)


def arguments(
    x: Any, format: Any, key: Any, tensor_amax: Any, **options: Any
) -> tuple[jax.Array, jax.Array | None, jax.Array | None, QuantSpec]:
    """Checked ``(x, random bits, tensor amax, QuantSpec)`` of a quantize call."""
    x = check_array(x)
    spec = QuantSpec.make(format, x.ndim, **options)
    check_rounding(spec.rounding, key)
    amax = check_tensor_amax(tensor_amax, spec)
    rbits = random_bits(key, x.shape) if spec.random_bits else None
    return x, rbits, amax, spec
