"""jaxmx's Pallas kernels: fused quantize, its training variant, and a weight-only matmul.

* :func:`quantize` / :func:`fake_quantize` (reached through
  ``jaxmx.quantize(..., implementation="pallas")``): one read of ``x``,
  codes and scales written once; described below.
* :func:`quantize_rows_and_columns`: both quantized copies of a matrix
  (blocks along its last and its second-to-last axis) from one read, which
  ``jaxmx.dot_general`` uses under ``DotConfig(implementation="pallas")``.
* :func:`weight_only_matmul`: ``x @ W`` for an MXTensor weight decoded tile
  by tile in on-chip memory, for serving.

``jaxmx.quantize(..., implementation="pallas")`` and
``jaxmx.fake_quantize(..., implementation="pallas")`` run these kernels
instead of the XLA emulation. Their results are the XLA path's, bit for bit
(codes, scales, fake-quantized values), for:

* formats of the OCP MX family (MXFP8 E4M3/E5M2, MXFP6 E3M2/E2M3, MXFP4,
  MXINT8/4/2), every scale rule, rounding (stochastic included: the random
  bits are drawn as the XLA path draws them) and ``flush_subnormals``;
* NVFP4 (blocks of 16 along one axis, not 2-D tiles; nearest-even or
  stochastic rounding; ``tensor_amax``). Its tensor scale needs the whole
  tensor's amax, which XLA reduces before the kernel unless ``tensor_amax``
  is given. Its fake-quantized NaNs are all the quiet NaN ``0x7FC00000``
  (the XLA path's NaN signs depend on which of its two forms ran);
* blocks along any axis (moved last outside the kernel), block sizes that
  are powers of two from 2 to 1024, any length (a partial last block is
  padded with zeros, as everywhere in jaxmx; NVFP4 refuses partial blocks,
  as its family does);
* float32, bfloat16 and float16 input. ``packed=True`` packs the kernel's
  codes in an XLA pass after it.

Other families (MX9/MX6/MX4, per-tensor FP8) and options are refused with
an error naming what is allowed; ``implementation="xla"`` takes everything.

:func:`quantize_rows_and_columns` is the training variant: the two copies a
quantized matmul's step needs of an operand (blocks along the last axis and
along the second-to-last), written by one kernel from one read of ``x``.

A program that uses the kernels may be exported for several platforms at
once (``platforms=["tpu", "cuda"]``): each platform's kernel is lowered for
that platform only.

The platform a program is compiled for chooses the kernel (its
:class:`jaxmx.platforms.Platform` record's ``pallas`` field, read when
lowering): TPUs run the Mosaic (``mosaic_tpu``) kernel, NVIDIA GPUs the
Triton one; a platform with no kernel (the CPU) fails to compile such a
program with a message that says so. :func:`interpret` runs a backend's
kernel through Pallas's interpreter on any platform instead, which is how
the kernels are tested on a CPU.

Status: the kernels are checked bit for bit against the XLA path in
interpret mode, and their TPU and CUDA lowerings are checked to export; they
have not yet been compiled or run on a TPU or a GPU. That is why
``implementation=None`` still means ``"xla"`` on every platform; it will
choose a kernel where one has been measured on hardware.

>>> import jax.numpy as jnp, jaxmx
>>> x = jnp.linspace(-3.0, 3.0, 64)
>>> with jaxmx.pallas.interpret("mosaic_tpu"):
...     t = jaxmx.quantize(x, "mxfp8", implementation="pallas")
>>> bool((t.data == jaxmx.quantize(x, "mxfp8").data).all())
True
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from jaxmx import codes, platforms
from jaxmx.formats import get_family
from jaxmx.pallas import _bits, _call, _dispatch, _layout, _nvfp4
from jaxmx.pallas._choice import dispatch
from jaxmx.pallas._dispatch import IMPLEMENTATIONS, unsupported_reason
from jaxmx.pallas._dispatch import check_implementation as check_implementation
from jaxmx.pallas._dual import pair_reason as pair_reason
from jaxmx.pallas._dual import quantize_rows_and_columns
from jaxmx.pallas._dual import rows_and_columns as rows_and_columns
from jaxmx.pallas._matmul import weight_only_matmul
from jaxmx.spec import QuantSpec
from jaxmx.tensor import MXTensor

__all__ = [
    "IMPLEMENTATIONS",
    "fake_quantize",
    "interpret",
    "quantize",
    "quantize_rows_and_columns",
    "unsupported_reason",
    "weight_only_matmul",
]


@contextlib.contextmanager
def interpret(backend: str = "mosaic_tpu") -> Iterator[str]:
    """Within the block, ``implementation="pallas"`` runs ``backend``'s kernel interpreted.

    On any platform, the CPU included: ``"mosaic_tpu"`` through Pallas's TPU
    interpreter (with its race detector), ``"triton"`` through the generic
    one. Slow; for tests and for checking a kernel without its hardware. As
    with :func:`jaxmx.platforms.force`, it applies to what is traced inside
    the block.
    """
    if backend not in platforms.PALLAS_BACKENDS:
        raise ValueError(
            f"unknown Pallas backend {backend!r}; allowed: {', '.join(platforms.PALLAS_BACKENDS)}"
        )
    token = _dispatch.INTERPRET.set(backend)
    try:
        yield backend
    finally:
        _dispatch.INTERPRET.reset(token)


def quantize(
    x: jax.Array, rbits: jax.Array | None, tensor_amax: jax.Array | None, spec: QuantSpec
) -> MXTensor:
    """:func:`jaxmx.quantize` with validated arguments, by the Pallas kernel."""
    _dispatch.check(spec, x)
    if x.size == 0 or not _dispatch.whole_blocks(spec, x.shape):
        # No block to quantize, or partial blocks that the family refuses
        # (NVFP4): the family says so.
        return get_family(spec.format).quantize(x, rbits, tensor_amax, spec)
    return _quantize(x, rbits, tensor_amax, spec, _dispatch.INTERPRET.get(), platforms.forced())


def fake_quantize(
    x: jax.Array, rbits: jax.Array | None, tensor_amax: jax.Array | None, spec: QuantSpec
) -> jax.Array:
    """:func:`jaxmx.fake_quantize` with validated arguments, by the Pallas kernel."""
    _dispatch.check(spec, x)
    if x.size == 0 or not _dispatch.whole_blocks(spec, x.shape):
        return get_family(spec.format).fake_quantize(x, rbits, tensor_amax, spec)
    return _fake_quantize(
        x, rbits, tensor_amax, spec, _dispatch.INTERPRET.get(), platforms.forced()
    )


def _kernel(
    body: Callable[..., None],
    inputs: list[jax.Array],
    outputs: list[tuple[int, DTypeLike]],
    interpret_as: str | None,
    name: str,
) -> list[jax.Array]:
    """``body`` over the rows of ``inputs`` by the kernel of the platform (or interpreted)."""

    def run(backend: str, interpret: bool, *ins: jax.Array) -> list[jax.Array]:
        return _call.run(body, ins, outputs, backend=backend, interpret=interpret, name=name)

    rows = inputs[0].shape[0]
    like = [jax.ShapeDtypeStruct((rows, cols), dt) for cols, dt in outputs]
    return dispatch(run, inputs, like, interpret_as)


def _inputs(
    x: jax.Array, rbits: jax.Array | None, tensor_amax: jax.Array | None, spec: QuantSpec
) -> list[jax.Array]:
    """The kernel's operands: x's rows, the family's per-tensor ones, the random bits' rows."""
    bs = _dispatch.block_size(spec)
    ins = [_layout.to_rows(_bits.to_carrier(x), spec.axis, bs)]
    if spec.format.tensor_scale:
        ins.extend(_nvfp4.tensor_scales(x, tensor_amax))
    if rbits is not None:
        ins.append(_layout.to_rows(rbits, spec.axis, bs))
    return ins


# The forced platform is a static argument: it decides the codes' storage
# dtype (jaxmx.codes.storage_dtype), so it must be part of the jit cache key.


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _quantize(
    x: jax.Array,
    rbits: jax.Array | None,
    tensor_amax: jax.Array | None,
    spec: QuantSpec,
    interpret_as: str | None,
    forced: platforms.Platform | None,
) -> MXTensor:
    fmt, axis = spec.format, spec.axis
    body = functools.partial(_dispatch.KERNELS[fmt.family].quantize_body, spec, x.dtype)
    outputs: list[tuple[int, DTypeLike]] = [
        (_dispatch.block_size(spec), codes.raw_dtype(fmt.element.bits)),
        (1, jnp.uint8),
    ]
    ins = _inputs(x, rbits, tensor_amax, spec)
    raw, biased = _kernel(body, ins, outputs, interpret_as, "mx_quantize")
    raw = _layout.from_rows(raw, x.shape, axis)
    biased = _layout.scales_from_rows(biased[:, 0], x.shape, axis)
    tensor_scale = ins[2][0, 0] if fmt.tensor_scale else None
    return _dispatch.make(spec, x, raw, biased, tensor_scale)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _fake_quantize(
    x: jax.Array,
    rbits: jax.Array | None,
    tensor_amax: jax.Array | None,
    spec: QuantSpec,
    interpret_as: str | None,
    forced: platforms.Platform | None,
) -> jax.Array:
    kernels = _dispatch.KERNELS[spec.format.family]
    body = functools.partial(kernels.fake_quantize_body, spec, x.dtype)
    outputs: list[tuple[int, DTypeLike]] = [
        (_dispatch.block_size(spec), _bits.CARRIER[np.dtype(x.dtype)])
    ]
    ins = _inputs(x, rbits, tensor_amax, spec)
    (out,) = _kernel(body, ins, outputs, interpret_as, "mx_fake_quantize")
    return _bits.from_carrier(_layout.from_rows(out, x.shape, spec.axis), x.dtype)
