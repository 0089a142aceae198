"""The coverage record of :func:`jaxmx.intercept`: every matmul and what runs there."""

from __future__ import annotations

import dataclasses

from jaxmx._intercept.vector_coverage import VectorCoverage
from jaxmx.config import DotConfig

__all__ = ["Coverage", "MatmulSite"]


@dataclasses.dataclass(frozen=True)
class MatmulSite:
    """One matmul of the traced program and what runs there.

    A matmul inside a loop body is one site however many times it runs.

    >>> import jax, jax.numpy as jnp
    >>> from jaxmx.intercept import intercept
    >>> f = intercept(lambda p, x: jnp.int32(2) * (x @ p["w"]), "mxfp8")
    >>> (site,) = f.coverage_for({"w": jnp.ones((32, 4))}, jnp.ones((2, 32))).sites
    >>> site.path, site.operands, site.shapes, site.mx
    ('dot_general', ('', 'w'), ((2, 32), (32, 4)), True)
    """

    # Name stack of the operation plus the op: "Model/attn/q/dot_general".
    path: str
    # "dot_general", "conv_general_dilated", or another matmul primitive.
    op: str
    # Argument path of each operand that is (a view of) an input of fn:
    # ("", "params/attn/q/kernel"); "" where it is computed or unnamed.
    operands: tuple[str, str]
    # Operand shapes and dtypes (per example under vmap).
    shapes: tuple[tuple[int, ...], tuple[int, ...]]
    dtypes: tuple[str, str]
    # Higher-order operations around it, outermost first: "scan(length=4)/checkpoint".
    within: str
    # True when the matmul runs in MX.
    mx: bool
    # The config it runs with; None for high precision and for jaxmx ops
    # that were already in fn (they keep their own config).
    config: DotConfig | None
    # The deciding rule's pattern, or None.
    rule: str | None
    # Why: the config, "jaxmx op in the function", or "high precision (...)".
    reason: str

    @property
    def operand_paths(self) -> str:
        """The non-empty operand argument paths, for display."""
        return ", ".join(o for o in self.operands if o)

    def describe(self, width: int = 0) -> str:
        """One line: MX or high, path, operand paths, shapes, reason, surrounding ops."""
        shapes = " x ".join(str(tuple(s)) for s in self.shapes)
        src = f" <- {self.operand_paths}" if self.operand_paths else ""
        where = f"  [in {self.within}]" if self.within else ""
        head = f"{'MX  ' if self.mx else 'high'}  {self.path + src:<{width}}"
        return f"{head}  {shapes}  {self.reason}{where}"


@dataclasses.dataclass(frozen=True)
class Coverage:
    """Which matmuls of one traced program run in MX, and which do not.

    Attributes:
      rules: ``(pattern, config)`` pairs in priority order (configs resolved).
      sites: every matmul of the program, in program order.
      unmatched: patterns of the rules that decided no matmul (shadowed
        rules included).
      vector_ops: with ``intercept(..., vector_ops=...)``, which vector ops
        are rounded and which float outputs are left alone
        (a ``VectorCoverage``); None without.

    >>> import jax, jax.numpy as jnp
    >>> from jaxmx.intercept import intercept
    >>> def f(x, w):
    ...     with jax.named_scope("proj"):
    ...         y = x @ w
    ...     return y, jnp.arange(3) @ jnp.arange(3)  # an integer dot
    >>> mx_f = intercept(f, [("proj", "mxfp6"), ("never", None)], warn=False)
    >>> cov = mx_f.coverage_for(jnp.ones((2, 32)), jnp.ones((32, 4)))
    >>> cov.counts, cov.unmatched
    ('1 of 2 matmuls in MX', ('never',))
    >>> print(cov.summary())
    1 of 2 matmuls in MX
      MX    proj/dot_general  (2, 32) x (32, 4)  fwd mxfp6_e3m2 x mxfp6_e3m2; ...
      high  dot_general  (3,) x (3,)  high (no rule matched)
      rule 'never' matched no matmul
    """

    rules: tuple[tuple[str, DotConfig | None], ...]
    sites: tuple[MatmulSite, ...]
    unmatched: tuple[str, ...]
    vector_ops: VectorCoverage | None = None

    @property
    def in_mx(self) -> tuple[MatmulSite, ...]:
        return tuple(s for s in self.sites if s.mx)

    @property
    def high_precision(self) -> tuple[MatmulSite, ...]:
        return tuple(s for s in self.sites if not s.mx)

    @property
    def counts(self) -> str:
        """``"N of M matmuls in MX"``."""
        return f"{len(self.in_mx)} of {len(self.sites)} matmuls in MX"

    def summary(self) -> str:
        """A table: one line per matmul site, then the rules that matched nothing
        (and, with ``vector_ops``, the rounded vector ops)."""
        lines = [self.counts]
        width = max((len(s.path) + len(s.operand_paths) + 4 for s in self.sites), default=0)
        lines += [f"  {s.describe(width)}" for s in self.sites]
        lines += [f"  rule {p!r} matched no matmul" for p in self.unmatched]
        if self.vector_ops is not None:
            lines.append(self.vector_ops.summary())
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()
