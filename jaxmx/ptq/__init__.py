"""Post-training quantization methods that beat round-to-nearest direct cast.

A direct cast (:func:`jaxmx.quantize`) takes each block's scale from the
block maximum and rounds every element to nearest. Three methods here spend
some offline work to do better, and all of them still produce ordinary
:class:`~jaxmx.MXTensor` weights (same format, codes, scales and layout), so
a model runs from them exactly as from a direct cast. They work on every
block family: OCP MX (E8M0 exponents), NVFP4 (E4M3 block scales under a
tensor scale) and the shared-microexponent formats MX9/MX6/MX4 and MSFP
(an exponent per block, a micro bit per pair); per-tensor FP8 has no
blocks and is refused.

* **Per-block scale search** (:func:`quantize_search`, :class:`ScaleSearch`):
  each block tries the max-based exponent ``e`` and smaller ones (``e - 1``,
  ``e - 2``: the block maximum clips, the rest of the block gets a finer
  grid) and keeps the one with the least squared error. The MSE-optimal
  clipping of Banner et al. 2019 (ACIQ, arXiv:1810.05723) and Sakr et al.
  2022 (OCTAV, arXiv:2206.06501), restricted to the power-of-two scales an
  E8M0 block can hold. For NVFP4 it is Four Over Six (Cook et al. 2025,
  arXiv:2512.02010): each block's maximum maps to 6 or to 4; for the BDR
  formats the exponent offsets plus each pair's micro bit chosen by error.
* **Block-diagonal Hadamard rotation** (:func:`hadamard`, :func:`rotate`,
  :func:`rotate_weights`): ``x @ w = (x H) @ (H^T w)`` with ``H`` an
  orthonormal Hadamard matrix of 16 or 32 along the contraction axis, so the
  rotated operands spread an outlier over its block before quantization.
  QuaRot (Ashkboos et al. 2024, arXiv:2404.00456) and SpinQuant use full
  Hadamards; block-diagonal ones of the MX block size are what NVIDIA's
  NVFP4 pre-training recipe (arXiv:2509.25149, "random Hadamard transforms
  of size 16") and MXFP4 PTQ studies (Egiazarian et al. 2025, "Bridging the
  gap between promise and performance for microscaling FP4 quantization",
  arXiv:2509.23202) apply. The activation side must be rotated inside the
  model at run time (the weights are rotated once, offline).
* **GPTQ for block formats** (:func:`quantize_gptq`, :class:`GPTQ`): Frantar
  et al. 2023 (arXiv:2210.17323), Algorithm 1: quantize the weight one input
  row at a time and push each row's error, weighted by the inverse
  Hessian ``(X^T X + damp I)^-1`` of the layer's calibration inputs, onto
  the rows not yet quantized. Adapted to MX: the block scales are fixed
  first (from the original weights, by a scale rule or the scale search)
  and the rows are then rounded onto those fixed grids, as GPTQ's
  ``static_groups`` option does for grouped integer formats.

:func:`jaxmx.quantize_params` takes :class:`ScaleSearch` and :class:`GPTQ`
as its ``method=``; :func:`collect_hessians` gathers the GPTQ Hessians of a
Flax linen model's Dense layers from calibration batches.
:func:`quantize_model` does it all for any JAX function ``fn(params, *inputs)``
in one call: it finds the weights of the matmuls ``jaxmx.intercept`` puts in
MX, collects their Hessians, rotates, quantizes, and returns the function to
serve (rotating activations inside ``intercept``) with the quantized weights.

>>> import jax, jax.numpy as jnp, jaxmx
>>> w = jax.random.normal(jax.random.key(0), (64, 8))
>>> direct = jaxmx.quantize(w, "mxfp4", axis=0)
>>> searched = jaxmx.ptq.quantize_search(w, "mxfp4", axis=0)
>>> err = lambda t: float(jnp.sum((jaxmx.dequantize(t) - w) ** 2))
>>> err(searched) <= err(direct)
True
"""

from __future__ import annotations

from jaxmx.ptq._gptq import GPTQ, quantize_gptq
from jaxmx.ptq._hessians import collect_hessians
from jaxmx.ptq._method import PTQMethod
from jaxmx.ptq._model import PTQReport, TiedWeight, WeightResult, quantize_model
from jaxmx.ptq._rotate import hadamard, rotate, rotate_weights
from jaxmx.ptq._search import ScaleSearch, fake_quantize_search, quantize_search

__all__ = [
    "GPTQ",
    "PTQMethod",
    "PTQReport",
    "ScaleSearch",
    "TiedWeight",
    "WeightResult",
    "collect_hessians",
    "fake_quantize_search",
    "hadamard",
    "quantize_gptq",
    "quantize_model",
    "quantize_search",
    "rotate",
    "rotate_weights",
]
