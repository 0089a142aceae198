"""Every function and method of the public API is fully annotated.

mypy (``make lint``) checks the package; this test pins down the promise that
matters to users whatever mypy's per-module settings: each name exported by
``jaxmx``, ``jaxmx.flax``, ``jaxmx.optax`` and ``jaxmx.ptq`` (and each public
method of an exported class) annotates every parameter and its return type.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import types

import pytest

import jaxmx

PACKAGE = pathlib.Path(jaxmx.__file__).parent
PUBLIC = ("jaxmx", "jaxmx.flax", "jaxmx.optax", "jaxmx.ptq")


def _written_in_jaxmx(fn) -> bool:
    # Leaves out what dataclasses generate and what Flax wraps in its own code.
    return PACKAGE in pathlib.Path(fn.__code__.co_filename).parents


def _functions():
    seen = set()
    for module_name in PUBLIC:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if isinstance(obj, types.ModuleType):
                continue
            if inspect.isclass(obj):
                if not obj.__module__.startswith("jaxmx"):
                    continue
                for attr, value in vars(obj).items():
                    if attr.startswith("_") and attr not in ("__init__", "__call__"):
                        continue
                    fn = value.fget if isinstance(value, property) else value
                    fn = getattr(fn, "__func__", fn)  # staticmethod, classmethod
                    if inspect.isfunction(fn) and _written_in_jaxmx(fn):
                        if "<locals>" not in fn.__qualname__ and fn not in seen:
                            seen.add(fn)
                            yield f"{module_name}.{name}.{attr}", fn
            elif inspect.isfunction(obj) and _written_in_jaxmx(obj):
                if obj not in seen:
                    seen.add(obj)
                    yield f"{module_name}.{name}", obj


FUNCTIONS = dict(_functions())


def _unannotated(fn) -> list[str]:
    sig = inspect.signature(fn)
    missing = [
        p.name
        for i, p in enumerate(sig.parameters.values())
        if p.annotation is inspect.Parameter.empty and not (i == 0 and p.name in ("self", "cls"))
    ]
    if sig.return_annotation is inspect.Signature.empty and fn.__name__ != "__init__":
        missing.append("return")
    return missing


def test_the_public_api_was_found():
    assert {"jaxmx.quantize", "jaxmx.dot_general", "jaxmx.flax.quantize_model"} <= set(FUNCTIONS)
    assert len(FUNCTIONS) > 100


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_public_function_is_fully_annotated(name):
    fn = FUNCTIONS[name]
    missing = _unannotated(fn)
    where = f"{inspect.getsourcefile(fn)}:{inspect.getsourcelines(fn)[1]}"
    assert not missing, f"{name} ({where}) lacks annotations for: {', '.join(missing)}"
