"""jaxmx: Microscaling (MX) formats for JAX.

>>> import jax.numpy as jnp, jaxmx
>>> t = jaxmx.quantize(jnp.arange(64.0).reshape(2, 32), "mxfp8")
>>> t
MXTensor(mxfp8_e4m3, shape=(2, 32), dtype=float32, axis=-1, block_size=32, nbytes=66)
"""

# ruff: noqa: I001 (one re-export per line, grouped by layer)

# Numerics: formats, bit-level rounding, scales.
from jaxmx import codes
from jaxmx import formats
from jaxmx import numerics
from jaxmx import platforms

# The families (OCP MX, NVFP4, shared microexponents, per-tensor FP8) and
# their formats, registered on import.
from jaxmx import families
from jaxmx.formats import ElementFormat
from jaxmx.formats import Family
from jaxmx.formats import MXFormat
from jaxmx.formats import ScaleFormat
from jaxmx.formats import get_family
from jaxmx.formats import get_format
from jaxmx.formats import list_families
from jaxmx.formats import list_formats
from jaxmx.formats import register_family
from jaxmx.formats import register_format
from jaxmx.rounding import round_to

# The MXTensor pytree and conversions.
from jaxmx.tensor import MXTensor
from jaxmx.quantize import quantize
from jaxmx.quantize import dequantize
from jaxmx.quantize import fake_quantize
from jaxmx import pallas

# MXTensor as an array: exact structural ops on codes and scales.
from jaxmx.array_ops import concatenate
from jaxmx.array_ops import ldexp
from jaxmx.array_ops import moveaxis
from jaxmx.array_ops import reshape
from jaxmx.array_ops import stack
from jaxmx.array_ops import swapaxes
from jaxmx.array_ops import take
from jaxmx.array_ops import transpose

# Analysis: what a format keeps.
from jaxmx import analysis
from jaxmx.analysis import qsnr
from jaxmx.packing import pack
from jaxmx.packing import unpack

# Checkpoints: trees of MXTensors and arrays on disk (orbax, safetensors).
from jaxmx.checkpoint import SaveInfo
from jaxmx.checkpoint import save
from jaxmx.checkpoint import load

# Sharding MXTensors with every block whole on one device.
from jaxmx.shards import check_blocks_whole
from jaxmx.shards import mx_shardings

# Ops: quantized matmuls for training and inference.
from jaxmx import native
from jaxmx.config import FORWARD
from jaxmx.config import DotConfig
from jaxmx.config import as_dot_config
from jaxmx.config import list_presets
from jaxmx.config import preset
from jaxmx.dot import dot_general
from jaxmx.einsum import einsum
from jaxmx.conv import conv_general_dilated

# N:M sparsity along a matmul's contraction axis (DotConfig.lhs_sparsity/rhs_sparsity).
from jaxmx.sparsity import NMSparsity
from jaxmx.sparsity import sparsify
from jaxmx.sparse_tensor import NMSparseTensor
from jaxmx._sparse_weights import quantize_sparse
from jaxmx._amber import precompute_amber

# Whole-program MX: every matmul a function runs, by rules.
from jaxmx.intercept import Coverage
from jaxmx.intercept import MatmulSite
from jaxmx.intercept import VectorOps
from jaxmx.intercept import intercept

# Fully-sharded data parallelism: weights all-gathered as MX codes and scales.
from jaxmx.fsdp import fsdp_axis
from jaxmx.fsdp import fsdp_gather
from jaxmx.fsdp import fsdp_shardings

# Serving: matmul weights quantized once, run from MXTensors under intercept.
from jaxmx.params import param_bytes
from jaxmx.params import quantize_params

# Post-training quantization methods beyond direct cast (quantize_params(method=...)).
from jaxmx import ptq

__version__ = "0.1.0"

__all__ = [
    "Coverage",
    "FORWARD",
    "DotConfig",
    "ElementFormat",
    "Family",
    "MXFormat",
    "MXTensor",
    "MatmulSite",
    "NMSparseTensor",
    "NMSparsity",
    "analysis",
    "as_dot_config",
    "SaveInfo",
    "ScaleFormat",
    "codes",
    "conv_general_dilated",
    "dequantize",
    "dot_general",
    "einsum",
    "fake_quantize",
    "fsdp_axis",
    "fsdp_gather",
    "fsdp_shardings",
    "intercept",
    "families",
    "formats",
    "get_family",
    "get_format",
    "list_families",
    "list_formats",
    "list_presets",
    "load",
    "native",
    "numerics",
    "pack",
    "pallas",
    "param_bytes",
    "platforms",
    "precompute_amber",
    "preset",
    "ptq",
    "qsnr",
    "quantize",
    "quantize_params",
    "quantize_sparse",
    "register_family",
    "register_format",
    "round_to",
    "save",
    "sparsify",
    "unpack",
    "VectorOps",
    # Sharding MXTensors
    "check_blocks_whole",
    "mx_shardings",
    # MXTensor as an array
    "concatenate",
    "ldexp",
    "moveaxis",
    "reshape",
    "stack",
    "swapaxes",
    "take",
    "transpose",
]
