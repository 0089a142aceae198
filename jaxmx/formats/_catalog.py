"""The registry of formats by name.

The formats jaxmx ships are registered by their families (:mod:`jaxmx.families`).
"""

from __future__ import annotations

import difflib

import numpy as np

from jaxmx.formats._records import MXFormat

# --------------------------------------------------------------------------
# The registry.
# --------------------------------------------------------------------------

_REGISTRY: dict[str, MXFormat] = {}
_ALIASES: dict[str, str] = {}


def register_format(fmt: MXFormat, *, aliases: tuple[str, ...] = ()) -> MXFormat:
    """Adds ``fmt`` (and optional alias names) to the registry.

    Args:
      fmt: the format to register; its ``name`` must be new.
      aliases: other names that :func:`get_format` resolves to ``fmt``.

    Returns:
      ``fmt``, so the call can be used in an assignment.

    >>> import jaxmx
    >>> fmt = jaxmx.MXFormat(name="mxfp8_e4m3_b16", element=jaxmx.formats.FP8_E4M3,
    ...                      scale=jaxmx.formats.E8M0, block_size=16, reference="example")
    >>> jaxmx.register_format(fmt).block_size
    16
    """
    if not isinstance(fmt, MXFormat):
        raise TypeError(f"register_format expects an MXFormat, got {type(fmt).__name__}")
    if not isinstance(aliases, (tuple, list)) or not all(isinstance(a, str) and a for a in aliases):
        # A bare string would register each of its characters as an alias.
        raise TypeError(f"aliases must be a tuple of non-empty names, got {aliases!r}")
    for name in (fmt.name, *aliases):
        if name in _REGISTRY or name in _ALIASES:
            raise ValueError(
                f"format name {name!r} is already registered; names and aliases must be new "
                "(see jaxmx.list_formats(aliases=True))"
            )
    _REGISTRY[fmt.name] = fmt
    for alias in aliases:
        _ALIASES[alias] = fmt.name
    return fmt


def list_formats(*, aliases: bool = False) -> list[str]:
    """Names of the registered formats (and, if asked, their aliases).

    >>> import jaxmx
    >>> jaxmx.list_formats()[:3]
    ['mxfp8_e4m3', 'mxfp8_e5m2', 'mxfp6_e3m2']
    """
    if not isinstance(aliases, (bool, np.bool_)):
        raise TypeError(f"aliases must be True or False, got {aliases!r}")
    names = list(_REGISTRY)
    if aliases:
        names += list(_ALIASES)
    return names


def get_format(fmt: str | MXFormat) -> MXFormat:
    """Resolves a format name (or alias) to its :class:`MXFormat`.

    Args:
      fmt: a registered name such as ``"mxfp4_e2m1"``, an alias such as
        ``"mxfp4"``, or an :class:`MXFormat` (returned unchanged).

    Raises:
      ValueError: ``fmt`` is not a known name; the message lists the known ones.

    >>> import jaxmx
    >>> jaxmx.get_format("mxfp6").name
    'mxfp6_e3m2'
    """
    if isinstance(fmt, MXFormat):
        return fmt
    if not isinstance(fmt, str):
        raise TypeError(f"format must be a format name or an MXFormat, got {type(fmt).__name__}")
    key = fmt.lower()
    key = _ALIASES.get(key, key)
    try:
        return _REGISTRY[key]
    except KeyError:
        known = (
            ", ".join(list_formats())
            + "; aliases: "
            + ", ".join(f"{a} -> {t}" for a, t in _ALIASES.items())
        )
        close = difflib.get_close_matches(key, [*_REGISTRY, *_ALIASES], n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise ValueError(f"unknown format {fmt!r}{hint}; known formats: {known}") from None
