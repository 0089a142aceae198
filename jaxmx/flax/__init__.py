"""Flax integration: MX layers for linen and nnx, and module substitution.

>>> import jax, jax.numpy as jnp
>>> from flax import nnx
>>> import jaxmx.flax
>>> model = nnx.Sequential(nnx.Linear(32, 64, rngs=nnx.Rngs(0)), nnx.relu,
...                        nnx.Linear(64, 4, rngs=nnx.Rngs(1)))
>>> model = jaxmx.flax.quantize_model(model, [("layers/2", None), (".*", "mxfp6")])
>>> [p for p, *_ in jaxmx.flax.substitution_of(model).substituted]
['layers/0']
"""

# ruff: noqa: I001 (one re-export per line)
try:  # an optional extra: the core of jaxmx does not need it
    import flax as _flax  # noqa: F401
except ImportError as _err:  # pragma: no cover - only without the extra
    raise ImportError(
        "jaxmx.flax needs flax: pip install 'jaxmx[flax]' (or pip install flax)"
    ) from _err

from jaxmx.flax import linen
from jaxmx.flax import nnx
from jaxmx.flax._ops import MXAttention
from jaxmx.flax._ops import MXConv
from jaxmx.flax._ops import MXDotGeneral
from jaxmx.flax._ops import MXEinsumOp
from jaxmx.flax.substitute import MXLinen
from jaxmx.flax.substitute import Rule
from jaxmx.flax.substitute import Substitution
from jaxmx.flax.substitute import quantize_model
from jaxmx.flax.substitute import substitution_of

__all__ = [
    "MXAttention",
    "MXConv",
    "MXDotGeneral",
    "MXEinsumOp",
    "MXLinen",
    "Rule",
    "Substitution",
    "linen",
    "nnx",
    "quantize_model",
    "substitution_of",
]
