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


def test_core_needs_neither_flax_nor_optax():
    """flax and optax are extras: the core imports and runs without them, and
    jaxmx.flax / jaxmx.optax say which extra to install."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for m in ('flax', 'flax.nnx', 'flax.linen', 'optax', 'chex'): sys.modules[m] = None\n"
        "import jax.numpy as jnp, jaxmx\n"
        "t = jaxmx.quantize(jnp.ones((2, 32)), 'nvfp4')\n"
        "jaxmx.dot_general(jnp.ones((2, 32)), jnp.ones((32, 4)), (((1,), (0,)), ((), ())),"
        " config='mxfp8')\n"
        "for sub in ('flax', 'optax'):\n"
        "    try:\n"
        "        __import__('jaxmx.' + sub)\n"
        "    except ImportError as e:\n"
        "        assert f'jaxmx[{sub}]' in str(e), e\n"
        "    else:\n"
        "        raise AssertionError(sub)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
