"""What differs by platform, as data, chosen when a program is lowered.

jaxmx computes the same values everywhere; what a platform changes is how:
the dtype the operands of an emulated matmul are decoded into, whether a
bfloat16 dot needs XLA:CPU's layout care, whether 4-bit float codes are held
in ``float4_e2m1fn`` arrays, and which native block-scaled matmuls may
exist, and which Pallas backend jaxmx's fused kernels (:mod:`jaxmx.pallas`)
are written for there. Each platform is one :class:`Platform` record in
:data:`PLATFORMS`.

The choice is made when lowering, not when tracing: :func:`per_platform`
traces a computation once per record and joins them with
:func:`jax.lax.platform_dependent`, so a program lowered for the CPU keeps
the CPU branch only, and ``jax.export(..., platforms=["tpu"])`` on a CPU
host carries the TPU's choices. Under :func:`force` every branch is the
forced record's (to test an accelerator's path on a CPU, or to export with
one platform's choices).

Storage dtypes are part of a program's types, which every branch must
share, so they cannot follow the platform a program is lowered for: unpacked
4-bit float codes are held one per byte everywhere (XLA:CPU miscompiles
some ``float4_e2m1fn`` programs, and packed storage is what saves memory),
except under a forced platform whose record holds them as float4.

>>> import jaxmx
>>> jaxmx.platforms.PLATFORMS["tpu"].dot_dtype
'bfloat16'
>>> with jaxmx.platforms.force("tpu"):
...     jaxmx.quantize(jaxmx.numerics.jnp.ones(32), "mxfp4").data.dtype
dtype(float4_e2m1fn)
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
from jax import lax

__all__ = ["Platform", "PLATFORMS", "PALLAS_BACKENDS", "force", "forced", "per_platform"]


@dataclasses.dataclass(frozen=True)
class Platform:
    """The choices jaxmx makes for one platform."""

    # jax's platform name: "cpu", "cuda", "rocm", "tpu".
    name: str
    # dtype the operands of an emulated dot_general are decoded into:
    # "float32", "bfloat16", or "host" (bfloat16 where the CPU has bfloat16
    # dot instructions, float32 otherwise). Every product is exact either
    # way and accumulates in float32; only speed differs.
    dot_dtype: str
    # The same for convolutions ("float32" or "bfloat16").
    conv_dtype: str
    # Whether a bfloat16 dot must be laid out for XLA:CPU's library kernels
    # (see jaxmx._operand.product).
    cpu_dot_layouts: bool
    # Whether unpacked 4-bit float codes are held as float4_e2m1fn (applies
    # under force() only; see the module docstring).
    float4_codes: bool
    # Native block-scaled matmuls that may exist ("scaled_dot": lax.scaled_dot
    # runs in hardware, on GPUs of compute capability 10 and newer).
    native: tuple[str, ...] = ()
    # Pallas backends jaxmx.pallas has kernels for on this platform:
    # "mosaic_tpu" (Pallas's TPU backend) or "triton" (Pallas's Triton
    # backend for NVIDIA GPUs). Empty: implementation="pallas" is refused.
    pallas: tuple[str, ...] = ()
    # Whether a weight-only matmul decodes its MXTensor weight a slab at a
    # time (jaxmx._intercept.slabs): XLA:CPU allocates a large decoded
    # temporary afresh on every call, and its page faults outweigh the decode.
    sliced_decode: bool = False

    def __post_init__(self):
        if self.dot_dtype not in ("float32", "bfloat16", "host"):
            raise ValueError(
                f"platform {self.name!r}: dot_dtype must be 'float32', 'bfloat16' or 'host', "
                f"got {self.dot_dtype!r}"
            )
        if self.conv_dtype not in ("float32", "bfloat16"):
            raise ValueError(
                f"platform {self.name!r}: conv_dtype must be 'float32' or 'bfloat16', got "
                f"{self.conv_dtype!r}"
            )
        unknown = [b for b in self.pallas if b not in PALLAS_BACKENDS]
        if unknown:
            raise ValueError(
                f"platform {self.name!r}: unknown Pallas backend {unknown[0]!r}; allowed: "
                f"{', '.join(PALLAS_BACKENDS)}"
            )


# The Pallas backends jaxmx.pallas writes kernels for.
PALLAS_BACKENDS = ("mosaic_tpu", "triton")

PLATFORMS: dict[str, Platform] = {
    "cpu": Platform(
        "cpu", "host", "float32", cpu_dot_layouts=True, float4_codes=False, sliced_decode=True
    ),
    "cuda": Platform(
        "cuda", "bfloat16", "bfloat16", False, True, native=("scaled_dot",), pallas=("triton",)
    ),
    "rocm": Platform("rocm", "bfloat16", "bfloat16", False, True),
    "tpu": Platform("tpu", "bfloat16", "bfloat16", False, True, pallas=("mosaic_tpu",)),
}

_FORCED: contextvars.ContextVar[Platform | None] = contextvars.ContextVar(
    "jaxmx_platform", default=None
)


def _record(name: Platform | str) -> Platform:
    if isinstance(name, Platform):
        return name
    try:
        return PLATFORMS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown platform {name!r}; allowed: {', '.join(PLATFORMS)} (or a Platform record)"
        ) from None


@contextlib.contextmanager
def force(name: str | Platform | None) -> Iterator[Platform | None]:
    """Within the block, jaxmx traces every platform choice as ``name``'s.

    ``None`` lifts a force. It applies to what is traced inside the block: a
    function jitted and traced before keeps the choices of its trace.
    """
    token = _FORCED.set(None if name is None else _record(name))
    try:
        yield _FORCED.get()
    finally:
        _FORCED.reset(token)


def forced() -> Platform | None:
    """The forced platform record, or None when the choice is left to lowering."""
    return _FORCED.get()


def per_platform(
    fn: Callable,
    *args: Any,
    platform: Platform | str | None = None,
    reads: tuple[str, ...] = (),
) -> Any:
    """``fn(record, *args)`` for the platform the program is lowered for.

    ``fn`` is traced once per distinct set of choices (platforms whose records
    differ only in name share one branch; so do native matmuls of a platform
    with no device in this process, which cannot be taken), the results must
    have the same types, and :func:`jax.lax.platform_dependent` picks one
    when lowering. ``platform`` (or a :func:`force`) traces that record's
    branch only. The ``pallas`` field splits branches only for callers that
    name it in ``reads`` (the others never look at it).
    """
    chosen = _record(platform) if platform is not None else forced()
    if chosen is not None:
        return fn(chosen, *args)
    shared: dict[Platform, Callable] = {}
    branches = {}
    for name, rec in PLATFORMS.items():
        # platform_dependent traces one branch per distinct callable.
        branches[name] = shared.setdefault(_choices(rec, reads), functools.partial(fn, rec))
    return lax.platform_dependent(*args, **branches, default=branches["cpu"])


def _choices(rec: Platform, reads: tuple[str, ...] = ()) -> Platform:
    """What a branch for ``rec`` can depend on: its record without the name."""
    native = rec.native if _has_devices(rec.name) else ()
    pallas = rec.pallas if "pallas" in reads else ()
    return dataclasses.replace(rec, name="", native=native, pallas=pallas)


@functools.cache
def _has_devices(name: str) -> bool:
    """Whether this process has devices of platform ``name``."""
    try:
        return bool(jax.devices(name))
    except RuntimeError:  # no such backend here
        return False
