"""Fused quantize kernels in Pallas: one read of ``x``, codes and scales written once.

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
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import DTypeLike

from jaxmx import codes, platforms
from jaxmx.bitstream import pack_codes
from jaxmx.families._common import make_tensor
from jaxmx.formats import ScaleFormat, get_family
from jaxmx.pallas import _bits, _call, _layout, _nvfp4, _ocp
from jaxmx.pallas._branches import on_backend, unavailable
from jaxmx.pallas._choice import IMPLEMENTATIONS
from jaxmx.pallas._choice import INTERPRET as _INTERPRET
from jaxmx.pallas._choice import check_implementation as check_implementation
from jaxmx.pallas._matmul import weight_only_matmul
from jaxmx.spec import QuantSpec
from jaxmx.tensor import MXTensor

__all__ = [
    "IMPLEMENTATIONS",
    "fake_quantize",
    "interpret",
    "quantize",
    "unsupported_reason",
    "weight_only_matmul",
]

# The kernel bodies of each family that has them.
_KERNELS = {"ocp": _ocp, "nvfp4": _nvfp4}


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
    token = _INTERPRET.set(backend)
    try:
        yield backend
    finally:
        _INTERPRET.reset(token)


def unsupported_reason(spec: QuantSpec, dtype: DTypeLike = jnp.float32) -> str | None:
    """Why the kernels cannot quantize as ``spec`` (an error message), or None."""
    family = spec.format.family
    if family not in _KERNELS:
        return (
            f"jaxmx's Pallas kernels cover the families {', '.join(sorted(_KERNELS))}; "
            f"{spec.format.name} is of family {family!r}"
        )
    reason = _KERNELS[family].supported(spec)
    if reason is not None:
        return reason
    bs = spec.block_size
    if not isinstance(bs, int) or bs < 2 or bs > 1024 or bs & (bs - 1):
        return (
            f"the Pallas kernels take block sizes that are powers of two from 2 to 1024 "
            f"(Triton tiles are powers of two); got block_size={bs!r}"
        )
    if np.dtype(dtype) not in _bits.CARRIER:
        return f"the Pallas kernels take float32, bfloat16 or float16 input, got {dtype}"
    return None


def _check(spec: QuantSpec, x: jax.Array) -> None:
    reason = unsupported_reason(spec, x.dtype)
    if reason is not None:
        raise ValueError(f"implementation='pallas': {reason}; implementation='xla' takes it")


def quantize(
    x: jax.Array, rbits: jax.Array | None, tensor_amax: jax.Array | None, spec: QuantSpec
) -> MXTensor:
    """:func:`jaxmx.quantize` with validated arguments, by the Pallas kernel."""
    _check(spec, x)
    if x.size == 0 or not _whole_blocks(spec, x):
        # No block to quantize, or partial blocks that the family refuses
        # (NVFP4): the family says so.
        return get_family(spec.format).quantize(x, rbits, tensor_amax, spec)
    return _quantize(x, rbits, tensor_amax, spec, _INTERPRET.get(), platforms.forced())


def fake_quantize(
    x: jax.Array, rbits: jax.Array | None, tensor_amax: jax.Array | None, spec: QuantSpec
) -> jax.Array:
    """:func:`jaxmx.fake_quantize` with validated arguments, by the Pallas kernel."""
    _check(spec, x)
    if x.size == 0 or not _whole_blocks(spec, x):
        return get_family(spec.format).fake_quantize(x, rbits, tensor_amax, spec)
    return _fake_quantize(x, rbits, tensor_amax, spec, _INTERPRET.get(), platforms.forced())


def _whole_blocks(spec: QuantSpec, x: jax.Array) -> bool:
    """False where the family refuses a partial block (its references have none)."""
    return spec.rules.block_sizes != "tiles" or x.shape[spec.axis] % _block_size(spec) == 0


def _block_size(spec: QuantSpec) -> int:
    """The block size of a spec the kernels take (:func:`unsupported_reason`)."""
    bs = spec.block_size
    # unsupported_reason refuses tiles (a pair) and None before any kernel runs.
    assert isinstance(bs, int), f"a kernel reached with block_size={bs!r}"
    return bs


def _scale(spec: QuantSpec) -> ScaleFormat:
    """The block scale's format: both families with kernels have one (E8M0, E4M3)."""
    scale = spec.format.scale
    assert scale is not None, f"{spec.format.name}: a kernel family without a block scale"
    return scale


def _kernel(
    body: Callable[..., None],
    inputs: Sequence[jax.Array],
    outputs: Sequence[tuple[int, DTypeLike]],
    interpret_as: str | None,
    name: str,
) -> list[jax.Array]:
    """``body`` by the kernel of the platform the program is lowered for."""
    if interpret_as is not None:
        return _call.run(body, inputs, outputs, backend=interpret_as, interpret=True, name=name)

    def branch(rec: platforms.Platform, *ins: jax.Array) -> list[jax.Array]:
        if not rec.pallas:
            having = [p.name for p in platforms.PLATFORMS.values() if p.pallas]
            like = [jnp.zeros((ins[0].shape[0], cols), dt) for cols, dt in outputs]
            return unavailable(
                "implementation='pallas' has no kernel for platform '{platform}': jaxmx's "
                f"Pallas kernels are written for {', '.join(having)}. Use implementation='xla' "
                "(or None) here, or run the kernel through Pallas's interpreter within "
                "jaxmx.pallas.interpret()",
                *like,
            )
        backend = rec.pallas[0]
        run = functools.partial(
            _call.run, body, outputs=outputs, backend=backend, interpret=False, name=name
        )
        return on_backend(backend, lambda *a: run(list(a)), *ins)

    return platforms.per_platform(branch, *inputs, reads=("pallas",))


def _inputs(
    x: jax.Array, rbits: jax.Array | None, tensor_amax: jax.Array | None, spec: QuantSpec
) -> list[jax.Array]:
    """The kernel's operands: x's rows, the family's per-tensor ones, the random bits' rows."""
    bs = _block_size(spec)
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
    elem = fmt.element
    body = functools.partial(_KERNELS[fmt.family].quantize_body, spec, x.dtype)
    outputs: list[tuple[int, DTypeLike]] = [
        (_block_size(spec), codes.raw_dtype(elem.bits)),
        (1, jnp.uint8),
    ]
    ins = _inputs(x, rbits, tensor_amax, spec)
    raw, biased = _kernel(body, ins, outputs, interpret_as, "mx_quantize")
    raw = _layout.from_rows(raw, x.shape, axis)
    if spec.packed:
        data = pack_codes(raw, elem.bits, axis)
    else:
        data = codes.raw_to_storage(raw, elem)
    biased = _layout.scales_from_rows(biased[:, 0], x.shape, axis)
    scale = lax.bitcast_convert_type(biased, _scale(spec).storage_dtype)
    if not fmt.tensor_scale:
        return make_tensor(spec, x, data, scale)
    tensor_scale = _bits.from_carrier(ins[2][0, 0], jnp.float32)
    return make_tensor(spec, x, data, scale, tensor_scale=tensor_scale)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _fake_quantize(
    x: jax.Array,
    rbits: jax.Array | None,
    tensor_amax: jax.Array | None,
    spec: QuantSpec,
    interpret_as: str | None,
    forced: platforms.Platform | None,
) -> jax.Array:
    body = functools.partial(_KERNELS[spec.format.family].fake_quantize_body, spec, x.dtype)
    outputs: list[tuple[int, DTypeLike]] = [(_block_size(spec), _bits.CARRIER[np.dtype(x.dtype)])]
    ins = _inputs(x, rbits, tensor_amax, spec)
    (out,) = _kernel(body, ins, outputs, interpret_as, "mx_fake_quantize")
    return _bits.from_carrier(_layout.from_rows(out, x.shape, spec.axis), x.dtype)
