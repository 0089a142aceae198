"""A value that cannot be compiled: the branch of a platform with no kernel.

:func:`jax.lax.platform_dependent` traces a branch for every platform but
lowers only those a program is compiled for, so a program that asks for
the Pallas kernels can still be exported for a TPU from a CPU host; the CPU
branch is :func:`unavailable`, whose lowering raises the message, so it is
only ever seen by someone compiling that program for that platform.
"""

from __future__ import annotations

import jax
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

_p = Primitive("jaxmx_unavailable")
_p.multiple_results = True


def unavailable(message: str, *like: jax.Array) -> list[jax.Array]:
    """Arrays shaped like ``like`` in a program that fails to compile with ``message``."""
    return list(_p.bind(*like, message=message))


def _raise(*args, message: str, **kwargs):
    raise ValueError(message)


_p.def_impl(_raise)
_p.def_abstract_eval(lambda *avals, message: list(avals))
mlir.register_lowering(_p, _raise)
batching.primitive_batchers[_p] = lambda args, dims, message: (
    _p.bind(*args, message=message),
    list(dims),
)
