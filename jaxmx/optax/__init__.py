"""Optax pieces for low-precision training: compressed state, low-precision params, DropBack.

Every piece is a plain ``optax.GradientTransformation`` whose state is a
NamedTuple of arrays, so it composes with ``optax.chain``, runs under
``jit`` and sharding, and checkpoints with orbax.

>>> import jax.numpy as jnp, optax, jaxmx.optax
>>> opt = jaxmx.optax.compress_state(optax.adamw(1e-3), "4bit")
>>> state = opt.init({"w": jnp.zeros((128, 128))})
>>> round(jaxmx.optax.bytes_per_param(state, {"w": jnp.zeros((128, 128))}), 4)
1.0945
"""

# ruff: noqa: I001 (one re-export per line, grouped by concept)

# Quantization maps and state codecs.
try:  # an optional extra: the core of jaxmx does not need it
    import optax as _optax  # noqa: F401
except ImportError as _err:  # pragma: no cover - only without the extra
    raise ImportError(
        "jaxmx.optax needs optax: pip install 'jaxmx[optax]' (or pip install optax)"
    ) from _err

from jaxmx.optax.maps import QuantMap
from jaxmx.optax.maps import dynamic_map
from jaxmx.optax.maps import linear_map
from jaxmx.optax.codecs import Codec
from jaxmx.optax.codecs import Compressed
from jaxmx.optax.codecs import StateCodec
from jaxmx.optax.codecs import blockwise
from jaxmx.optax.codecs import cast
from jaxmx.optax.codecs import mx
from jaxmx.optax.codecs import rank1

# Compressed optimizer state.
from jaxmx.optax.compress import CompressedState
from jaxmx.optax.compress import bytes_per_param
from jaxmx.optax.compress import compress_state
from jaxmx.optax.compress import state_nbytes

# Low-precision master weights.
from jaxmx.optax.master import LowPrecisionParamsState
from jaxmx.optax.master import low_precision_params
from jaxmx.optax.master import round_params

# DropBack and Procrustes.
from jaxmx.optax.dropback import DropBackState
from jaxmx.optax.dropback import default_init
from jaxmx.optax.dropback import dropback
from jaxmx.optax.dropback import dropback_stats
from jaxmx.optax.dropback import initial_params
from jaxmx.optax.dropback import leaf_key

__all__ = [
    "Codec",
    "Compressed",
    "CompressedState",
    "DropBackState",
    "LowPrecisionParamsState",
    "QuantMap",
    "StateCodec",
    "blockwise",
    "bytes_per_param",
    "cast",
    "compress_state",
    "default_init",
    "dropback",
    "dropback_stats",
    "dynamic_map",
    "initial_params",
    "leaf_key",
    "linear_map",
    "low_precision_params",
    "mx",
    "rank1",
    "round_params",
    "state_nbytes",
]
