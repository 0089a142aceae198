"""The public surface: every name in __all__ imports and is documented."""

import inspect

import jaxmx


def test_every_public_name_imports_and_has_a_docstring():
    assert sorted(jaxmx.__all__) == sorted(set(jaxmx.__all__))
    for name in jaxmx.__all__:
        obj = getattr(jaxmx, name)
        assert inspect.getdoc(obj), name


def test_public_functions_have_examples():
    for name in jaxmx.__all__:
        obj = getattr(jaxmx, name)
        if inspect.isfunction(obj):
            assert ">>>" in (obj.__doc__ or ""), f"{name} has no runnable example"


def test_format_cards():
    for name in jaxmx.list_formats():
        card = jaxmx.get_format(name).card()
        assert "max" in card and "min subnormal" in card and "specials" in card
