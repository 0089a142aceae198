"""The coverage record of ``intercept(..., vector_ops=...)``: what was rounded."""

from __future__ import annotations

import dataclasses

__all__ = ["VectorCoverage"]


@dataclasses.dataclass(frozen=True)
class VectorCoverage:
    """Which vector ops of one traced program are rounded, and which float
    outputs are left alone (``Coverage.vector_ops``).

    Counts are of equations: an op in a loop body counts once. ``rounded``
    and ``left_alone`` are ``(primitive, count)`` pairs sorted by name; a
    left-alone entry ``"name[dtype]"`` is an op in the set whose output
    dtype ``round_to`` does not take (float64, FP8 dtypes), and
    ``"jaxmx dot_general"`` a jaxmx op already in the function.
    """

    format: str
    rounding: str
    rounded: tuple[tuple[str, int], ...]
    left_alone: tuple[tuple[str, int], ...]

    @property
    def total(self) -> int:
        """The number of rounded equations."""
        return sum(n for _, n in self.rounded)

    @property
    def counts(self) -> str:
        """``"N vector ops rounded to FORMAT (ROUNDING)"``."""
        return f"{self.total} vector ops rounded to {self.format} ({self.rounding})"

    def summary(self) -> str:
        """Three lines: the count, the rounded primitives, the ones left alone."""

        def join(pairs):
            return ", ".join(f"{name} {n}" for name, n in pairs) or "none"

        return (
            f"{self.counts}\n  rounded:    {join(self.rounded)}\n"
            f"  left alone: {join(self.left_alone)} (float outputs not rounded)"
        )
