"""Which implementation runs, and which backend's kernel: shared by every jaxmx kernel.

* :data:`IMPLEMENTATIONS` and :func:`check_implementation`: what the
  ``implementation=`` arguments take; ``None`` is ``"xla"`` until a kernel
  has run and been measured on hardware.
* :data:`INTERPRET`: the backend whose interpreter runs the kernels, set by
  :func:`jaxmx.pallas.interpret` (``None``: the compiled kernel of the
  platform the program is lowered for).
* :func:`dispatch`: a kernel by the platform the program is lowered for
  (its record's ``pallas`` field), or through the interpreter; a platform
  with no kernel gets a branch that fails to compile with a message.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxmx import platforms
from jaxmx.pallas._branches import on_backend, unavailable

# What the implementation= arguments take (None: the default).
IMPLEMENTATIONS = ("xla", "pallas")

# The Pallas backend whose interpreter runs the kernels (jaxmx.pallas.interpret).
INTERPRET: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "jaxmx_pallas_interpret", default=None
)


def check_implementation(implementation: object) -> str:
    """``implementation`` validated; ``None`` is the default, ``"xla"``.

    The default becomes a kernel on a platform only once that kernel has
    run there and been measured against the XLA path.
    """
    if implementation is None:
        return "xla"
    if not isinstance(implementation, str) or implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown implementation {implementation!r}; allowed: None (the default, "
            f"currently 'xla' everywhere), {', '.join(map(repr, IMPLEMENTATIONS))}"
        )
    return implementation


def no_kernel_message() -> str:
    """The compile error of a platform without kernels (``{platform}``: its name)."""
    having = [p.name for p in platforms.PLATFORMS.values() if p.pallas]
    return (
        "implementation='pallas' has no kernel for platform '{platform}': jaxmx's "
        f"Pallas kernels are written for {', '.join(having)}. Use implementation='xla' "
        "(or None) here, or run the kernel through Pallas's interpreter within "
        "jaxmx.pallas.interpret()"
    )


def dispatch(
    call: Callable[..., list[jax.Array]],
    inputs: Sequence[jax.Array],
    outputs: Sequence[jax.ShapeDtypeStruct],
    interpret_as: str | None,
) -> list[jax.Array]:
    """``call(backend, interpret, *inputs)`` (a list shaped as ``outputs``) by the
    backend of the platform the program is lowered for, or interpreted as
    ``interpret_as``."""
    if interpret_as is not None:
        return call(interpret_as, True, *inputs)

    def branch(rec: platforms.Platform, *ins: jax.Array) -> list[jax.Array]:
        if not rec.pallas:
            like = [jnp.zeros(s.shape, s.dtype) for s in outputs]
            return unavailable(no_kernel_message(), *like)
        backend = rec.pallas[0]
        return on_backend(backend, lambda *a: call(backend, False, *a), *ins)

    return platforms.per_platform(branch, *inputs, reads=("pallas",))
