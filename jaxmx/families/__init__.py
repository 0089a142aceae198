"""The families jaxmx ships, each one :class:`jaxmx.formats.Family` with its formats.

* :mod:`.ocp`: OCP MX v1.0 (MXFP8, MXFP6, MXFP4, MXINT8 and extensions);
* :mod:`.nvfp4`: NVIDIA's NVFP4 with TransformerEngine's arithmetic;
* :mod:`.microexp`: MX9/MX6/MX4 and MSFP16/MSFP12 with AMD Quark's;
* :mod:`.tensor_fp8`: per-tensor FP8 (current scaling).

Importing this package registers them (``import jaxmx`` does). A new family
is a module like these: a :class:`~jaxmx.formats.Family` subclass,
registered with :func:`~jaxmx.formats.register_family`, then its formats
with :func:`~jaxmx.formats.register_format`.
"""

# ruff: noqa: I001 (registration order is the order of list_formats())
from jaxmx.families import ocp
from jaxmx.families import nvfp4
from jaxmx.families import microexp
from jaxmx.families import tensor_fp8

__all__ = ["ocp", "nvfp4", "microexp", "tensor_fp8"]
