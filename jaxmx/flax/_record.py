"""Substitution rules, and the record of what a substitution did.

A :class:`Rule` pairs a regular expression on module paths with an MX
config; a :class:`Substitution` holds the rules of one
:func:`jaxmx.flax.quantize_model` call and records, for every module that
multiplies, whether it runs in MX (and with which config) or stays in high
precision (and why). Entries are written from what each module holds after
substitution (nnx) or runs with (linen), never from what a rule asked for.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import warnings

import flax
import jax

from jaxmx.config import DotConfig
from jaxmx.formats import MXFormat
from jaxmx.rules import Rule, parse_rules

__all__ = ["Rule", "Substitution", "parse_rules", "warn_at_caller"]


def kept_reason(rule: Rule | None) -> str:
    """Why a module with Flax's own matmul stays in high precision."""
    if rule is None:
        return "no rule matched"
    return f"rule {rule.pattern!r} keeps it"


@dataclasses.dataclass(eq=False)
class Substitution:
    """Rules, and a record of what they did.

    ``rules`` holds the rules in priority order; the properties
    ``substituted``, ``kept`` and ``unmatched`` say what they did.

    The model itself has the empty path ``""`` (printed as ``(root)``), so a
    top-level ``Dense`` is matched by ``".*"`` or ``"^$"``.
    """

    rules: tuple[Rule, ...]
    # Warn once about rules that matched nothing (False: never).
    warn: bool = True
    # How many leading rules were given to this substitution; the others come
    # from an earlier one (re-substituting an MXLinen) and are not warned about.
    own: int | None = None
    # (path, kind) -> (config description or None, reason kept).
    _entries: dict = dataclasses.field(default_factory=dict, repr=False)
    _hits: dict = dataclasses.field(default_factory=dict, repr=False)
    _warned: bool = dataclasses.field(default=False, repr=False)

    def match(self, path: str) -> Rule | None:
        """The first rule whose pattern is found in ``path`` (counted as a hit)."""
        for i, rule in enumerate(self.rules):
            if rule.matches(path):
                self._hits[i] = self._hits.get(i, 0) + 1
                return rule
        return None

    def record(self, path: str, kind: str, config: DotConfig | None, reason: str = "") -> None:
        """Notes that module ``path`` runs with ``config`` (None: high precision, why)."""
        entry = (None, reason) if config is None else (config.describe(), "")
        self._entries[(path, kind)] = entry

    @property
    def substituted(self) -> list[tuple[str, str, str]]:
        """``(path, layer type, config description)`` of every matmul module in MX."""
        return [(p, k, d) for (p, k), (d, _) in self._entries.items() if d is not None]

    @property
    def kept(self) -> list[tuple[str, str, str]]:
        """``(path, layer type, reason)`` of every matmul module kept in high precision.

        A module is kept when a ``None`` rule or no rule matches it, when it
        holds a matmul function of the user's own, or when Flax gives its
        matmul no injection point (``ConvTranspose``, ``Embed.attend``).
        """
        return [(p, k, r) for (p, k), (d, r) in self._entries.items() if d is None]

    @property
    def unmatched(self) -> list[Rule]:
        """Rules that matched no matmul module."""
        return [r for i, r in enumerate(self.rules) if not self._hits.get(i)]

    def warn_unmatched(self) -> None:
        """Warns, once and at the user's line, about each rule that matched nothing."""
        if self._warned or not self.warn:
            return
        self._warned = True
        own = self.rules[: self.own] if self.own is not None else self.rules
        for i, rule in enumerate(own):
            if not self._hits.get(i):
                warn_at_caller(f"jaxmx substitution rule {rule.pattern!r} matched no matmul module")

    def summary(self) -> str:
        """A table of what runs in MX and what stays in high precision."""
        subst, kept = self.substituted, self.kept
        lines = [f"{len(subst)} matmul modules in MX, {len(kept)} kept in high precision"]
        lines += [f"  MX    {p or '(root)':<40} {k:<30} {d}" for p, k, d in subst]
        lines += [f"  high  {p or '(root)':<40} {k:<30} {r}" for p, k, r in kept]
        lines += [f"  rule {r.pattern!r} matched nothing" for r in self.unmatched]
        return "\n".join(lines)

    def recipe(self) -> list[list]:
        """The rules as JSON-ready data: ``[[pattern, config fields or None], ...]``.

        Two substitutions with equal recipes run the same model identically;
        a training checkpoint records it to refuse resuming under another.

        >>> Substitution(parse_rules([("head", None)])).recipe()
        [['head', None]]
        """
        return [
            [r.pattern, None if r.config is None else config_fields(r.config)] for r in self.rules
        ]


def config_fields(config: DotConfig) -> dict:
    """Every field of a DotConfig, formats by name (JSON-ready)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = value.name if isinstance(value, MXFormat) else value
    return out


# Frames in these folders are library code between the user and a warning.
# flax, jax and all of jaxmx (linen calls run through jaxmx.intercept too).
_LIBRARY_DIRS = tuple(
    os.path.dirname(path) + os.sep
    for path in (flax.__file__, jax.__file__, os.path.dirname(__file__))
)


def warn_at_caller(message: str) -> None:
    """``warnings.warn`` pointing at the first frame outside jaxmx.flax, flax and jax.

    linen substitution warns from inside ``init``/``apply`` (or a jit trace,
    or a parent module), so no fixed ``stacklevel`` finds the user's line.
    """
    level, frame = 1, inspect.currentframe()
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)
