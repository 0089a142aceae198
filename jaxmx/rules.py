"""Rules: which matmuls get which MX config, by regular expression on a path.

One rule pairs a pattern, searched (``re.search``) in a path such as
``"block_0/attn/query"``, with a config; the first rule that matches
decides. Both ways of putting MX into a model read rules through this
module: :func:`jaxmx.flax.quantize_model` (module paths) and
:func:`jaxmx.intercept` (name-stack and argument paths).

>>> from jaxmx.rules import parse_rules
>>> rules = parse_rules([("head", None), (".*", "mxint8")])
>>> [(r.pattern, r.config and r.config.lhs.name) for r in rules]
[('head', None), ('.*', 'mxint8')]
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping

from jaxmx.config import DotConfig, as_dot_config
from jaxmx.formats import MXFormat

# One config for every matmul (a DotConfig, a preset or format name, an
# MXFormat; None keeps them in high precision), or ``(pattern, config)`` pairs
# and Rule objects in a list, or a dict of them, tried in order.
Config = DotConfig | MXFormat | str | None
RulesLike = Config | Mapping[str, Config] | Iterable["Rule | tuple[str, Config]"]

__all__ = ["Rule", "parse_rules", "resolve_config"]


def resolve_config(mx: Config, *, what: str = "mx") -> DotConfig | None:
    """Resolves an MX setting: a DotConfig, a preset or format name, or None.

    Only ``None`` means high precision (as does a config whose every role is
    high precision, e.g. ``"fp32"``); any other value that is not a config is
    refused rather than read as "off", so ``0``, ``False`` or ``""`` cannot
    silently switch MX off.

    Args:
      mx: the value given.
      what: how to name it in an error (``"mx"``, ``"the config of rule 'head'"``).

    Returns:
      The DotConfig, or None for high precision.

    Raises:
      TypeError: ``mx`` is neither None, a DotConfig, an MXFormat nor a string.
      ValueError: ``mx`` is a string that names no preset or format.

    >>> resolve_config("mxfp8").describe()
    'fwd mxfp8_e4m3 x mxfp8_e4m3; dgrad mxfp8_e4m3 x mxfp8_e4m3; wgrad mxfp8_e4m3 x mxfp8_e4m3'
    >>> resolve_config("fp32") is None
    True
    >>> resolve_config(False)
    Traceback (most recent call last):
    ...
    TypeError: mx must be a DotConfig, a preset or format name, or None ...; got False (bool)
    """
    if mx is None:
        return None
    if not isinstance(mx, (DotConfig, MXFormat, str)):
        raise TypeError(
            f"{what} must be a DotConfig, a preset or format name, or None (high precision); "
            f"got {mx!r} ({type(mx).__name__})"
        )
    try:
        cfg = as_dot_config(mx)  # the one place a name becomes a DotConfig
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None
    return None if cfg.is_noop else cfg


@dataclasses.dataclass(frozen=True)
class Rule:
    """One rule: paths matching ``pattern`` get ``config``.

    ``config`` is resolved when the rule is made (:func:`resolve_config`): a
    DotConfig, a preset or format name, or ``None`` for high precision.
    Nothing else is read as "high precision": ``0``, ``False`` or ``""`` are
    errors.

    >>> Rule("mlp", "mxfp6").config.lhs.name
    'mxfp6_e3m2'
    >>> Rule("head", None).config is None
    True
    """

    # Regular expression searched (re.search) in a path joined with "/"
    # ("block_0/attn/query"); a Flax model itself has the empty path "".
    pattern: str
    # DotConfig, preset or format name, or None (keep high precision).
    config: DotConfig | MXFormat | str | None

    def __post_init__(self):
        if not isinstance(self.pattern, str):
            raise TypeError(f"a rule pattern is a regular expression string, got {self.pattern!r}")
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise ValueError(
                f"rule pattern {self.pattern!r} is not a regular expression: {err}"
            ) from None
        config = resolve_config(self.config, what=f"the config of rule {self.pattern!r}")
        object.__setattr__(self, "config", config)

    def matches(self, path: str) -> bool:
        """Whether the pattern is found in ``path`` (``re`` caches the compiled pattern)."""
        return re.search(self.pattern, path) is not None


def parse_rules(rules: RulesLike) -> tuple[Rule, ...]:
    """Normalises what rules may be given as.

    A list of ``(pattern, config)`` pairs or :class:`Rule` objects, a dict
    (its items, in order), or a single DotConfig, preset or format name, or
    None, which means ``[(".*", rules)]``.
    """
    if rules is None or isinstance(rules, (DotConfig, MXFormat, str)):
        return (Rule(".*", rules),)
    if isinstance(rules, Mapping):
        rules = list(rules.items())
    if not isinstance(rules, Iterable):
        raise TypeError(
            "rules must be a list of (pattern, config) pairs or Rules, a dict, a DotConfig, "
            f"a preset or format name, or None; got {rules!r} ({type(rules).__name__})"
        )
    out = []
    for r in rules:
        if isinstance(r, Rule):
            out.append(r)
        elif isinstance(r, tuple) and len(r) == 2:
            out.append(Rule(*r))
        else:
            raise TypeError(f"a rule is a Rule or a (pattern, config) pair, got {r!r}")
    return tuple(out)
