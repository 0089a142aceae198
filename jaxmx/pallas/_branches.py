"""Branches that lower for some platforms only: a kernel's, and a refusal's.

:func:`jax.lax.platform_dependent` traces a branch for every platform and
lowers only those a program is compiled for; but a program compiled for
several platforms at once (``jax.export(..., platforms=["tpu", "cuda"])``)
lowers every one of its branches for each of them, and a Pallas kernel
cannot be lowered for a platform it was not written for. So each branch is
one primitive whose lowering depends on the platform being lowered:

* :func:`on_backend`: ``fn`` (a Pallas kernel) where the platform's record
  names that backend; elsewhere zeros, which nothing reads (the switch of
  ``platform_dependent`` takes that platform's own branch);
* :func:`unavailable`: raises the message where the platform has no kernel
  at all, so a program asking for the kernels on a CPU fails to compile
  there, saying why; elsewhere zeros, as above.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from jaxmx import platforms

_p = Primitive("jaxmx_platform_branch")
_p.multiple_results = True


def on_backend(backend: str, fn: Callable, *args: jax.Array) -> list[jax.Array]:
    """``fn(*args)`` when lowered for a platform whose Pallas backend is ``backend``."""
    shapes = tuple(jax.eval_shape(fn, *args))
    return list(_p.bind(*args, fn=fn, backend=backend, message=None, shapes=shapes))


def unavailable(message: str, *like: jax.Array) -> list[jax.Array]:
    """Arrays shaped like ``like`` in a program that fails to compile for a
    platform without Pallas kernels, with ``message`` (``{platform}``: its name)."""
    shapes = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in like)
    return list(_p.bind(*like, fn=None, backend=None, message=message, shapes=shapes))


def _abstract(
    *avals: jax.core.ShapedArray,
    fn: Callable | None,
    backend: str | None,
    message: str | None,
    shapes: tuple[jax.ShapeDtypeStruct, ...],
) -> list[jax.core.ShapedArray]:
    return [jax.core.ShapedArray(s.shape, s.dtype) for s in shapes]


def _zeros(shapes: Sequence[jax.ShapeDtypeStruct]) -> Callable[..., list[jax.Array]]:
    return lambda *args: [jnp.zeros(s.shape, s.dtype) for s in shapes]


def _rule(platform: str) -> Callable[..., Sequence[Any]]:
    """The lowering rule of the branch primitive for ``platform``."""

    def rule(
        ctx: mlir.LoweringRuleContext,
        *args: Any,
        fn: Callable | None,
        backend: str | None,
        message: str | None,
        shapes: tuple[jax.ShapeDtypeStruct, ...],
    ) -> Sequence[Any]:
        rec = platforms.PLATFORMS.get(platform)
        has = rec is not None and bool(rec.pallas)
        if message is not None:  # a refusal
            if not has:
                raise ValueError(message.format(platform=platform))
            return mlir.lower_fun(_zeros(shapes), multiple_results=True)(ctx, *args)
        if rec is not None and backend in rec.pallas:
            assert fn is not None  # only a refusal (message set) binds no function
            return mlir.lower_fun(fn, multiple_results=True)(ctx, *args)
        return mlir.lower_fun(_zeros(shapes), multiple_results=True)(ctx, *args)

    return rule


def _impl(*args: jax.Array, **params: Any) -> list[jax.Array]:
    return jax.jit(lambda *a: _p.bind(*a, **params))(*args)


def _batch(
    args: Sequence[jax.Array],
    dims: Sequence[int | None],
    *,
    fn: Callable | None,
    backend: str | None,
    message: str | None,
    shapes: tuple[jax.ShapeDtypeStruct, ...],
) -> tuple[list[jax.Array], list[int]]:
    axes = tuple(dims)  # None where an operand is not mapped
    if message is not None:
        size = next(a.shape[d] for a, d in zip(args, axes, strict=True) if d is not None)
        like = [jnp.zeros((size, *s.shape), s.dtype) for s in shapes]
        return unavailable(message, *like), [0] * len(shapes)
    # A kernel branch always names its backend and function (on_backend).
    assert backend is not None and fn is not None
    return on_backend(backend, jax.vmap(fn, in_axes=axes), *args), [0] * len(shapes)


_p.def_impl(_impl)
_p.def_abstract_eval(_abstract)
for _name in platforms.PLATFORMS:
    mlir.register_lowering(_p, _rule(_name), platform=_name)
batching.primitive_batchers[_p] = _batch
