"""Every ```python block of docs/optax.md runs (each in a fresh namespace)."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "optax.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_page_has_an_example_for_each_transformation():
    text = "\n".join(BLOCKS)
    for name in ("compress_state", "low_precision_params", "dropback", "initial_params"):
        assert f"jaxmx.optax.{name}(" in text, name


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_runs(index):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(compile(BLOCKS[index], f"{DOC.name}[{index}]", "exec"), {"__name__": "__doc__"})
    assert "nan" not in out.getvalue().lower()
