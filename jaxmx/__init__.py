"""jaxmx: Microscaling (MX) formats for JAX."""

from jaxmx import formats, numerics
from jaxmx.formats import ElementFormat, MXFormat, ScaleFormat, get_format, list_formats, register_format
from jaxmx.quantize import dequantize, fake_quantize, quantize
from jaxmx.tensor import MXTensor

__version__ = "0.1.0"
