"""jaxmx: Microscaling (MX) formats for JAX.

>>> import jax.numpy as jnp, jaxmx
>>> t = jaxmx.quantize(jnp.arange(64.0).reshape(2, 32), "mxfp8")
>>> t
MXTensor(mxfp8_e4m3, shape=(2, 32), dtype=float32, axis=-1, block_size=32, nbytes=66)
"""

from jaxmx import formats, numerics
from jaxmx.formats import (
    ElementFormat,
    MXFormat,
    ScaleFormat,
    get_format,
    list_formats,
    register_format,
)
from jaxmx.packing import pack, unpack
from jaxmx.quantize import dequantize, fake_quantize, quantize
from jaxmx.tensor import MXTensor

__version__ = "0.1.0"

__all__ = [
    "ElementFormat",
    "MXFormat",
    "MXTensor",
    "ScaleFormat",
    "dequantize",
    "fake_quantize",
    "formats",
    "get_format",
    "list_formats",
    "numerics",
    "pack",
    "quantize",
    "register_format",
    "unpack",
]
