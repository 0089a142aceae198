"""The public signatures of jaxmx, as data: what tests/data/public_api.json holds.

``python -m tests._public_api`` writes the snapshot anew (only when a public
name or parameter is meant to change); ``tests/test_public_api.py`` compares
the package against it.
"""

from __future__ import annotations

import enum
import importlib
import inspect
import json
import pathlib

MODULES = ("jaxmx", "jaxmx.ptq", "jaxmx.flax", "jaxmx.flax.linen", "jaxmx.flax.nnx", "jaxmx.optax")
SNAPSHOT = pathlib.Path(__file__).parent / "data" / "public_api.json"


def _default(value) -> str | None:
    if value is inspect.Parameter.empty:
        return None
    if value is None or isinstance(value, (bool, int, float, str, tuple, frozenset)):
        return repr(value)
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    return f"<{type(value).__name__}>"


def _signature(obj) -> list[dict] | None:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    return [
        {"name": p.name, "kind": p.kind.name, "default": _default(p.default)}
        for p in sig.parameters.values()
    ]


def _describe(obj) -> dict:
    if inspect.ismodule(obj):
        return {"kind": "module"}
    if inspect.isclass(obj):
        members = sorted(
            name
            for name, _ in inspect.getmembers(obj)
            if not name.startswith("_") and name in _own_names(obj)
        )
        return {"kind": "class", "signature": _signature(obj), "members": members}
    if callable(obj):
        return {"kind": "function", "signature": _signature(obj)}
    return {"kind": "value", "type": type(obj).__name__}


def _own_names(cls) -> set[str]:
    # Members defined by the package's classes, not inherited from builtins
    # (tuple's count/index, Enum machinery, flax's Module API).
    names: set[str] = set()
    for base in cls.__mro__:
        if (base.__module__ or "").startswith("jaxmx"):
            names |= set(vars(base))
    return names


def snapshot() -> dict:
    out = {}
    for modname in MODULES:
        mod = importlib.import_module(modname)
        out[modname] = {name: _describe(getattr(mod, name)) for name in sorted(mod.__all__)}
    return out


if __name__ == "__main__":
    SNAPSHOT.write_text(json.dumps(snapshot(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {SNAPSHOT}")
