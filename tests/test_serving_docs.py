"""Every ```python block of docs/serving.md runs (each in a fresh namespace)."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "serving.md"
TEXT = DOC.read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)


def _section(title: str) -> str:
    start = TEXT.index(f"\n## {title}\n")
    end = TEXT.find("\n## ", start + 1)
    return TEXT[start : end if end >= 0 else None]


def test_save_and_load_section_shows_both_calls():
    code = "\n".join(re.findall(r"```python\n(.*?)```", _section("Save and load"), flags=re.S))
    assert "jaxmx.save(" in code and "jaxmx.load(" in code and "target=" in code


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # tempfile.mkdtemp() lands in tmp_path
    monkeypatch.setattr("tempfile.tempdir", None)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(compile(BLOCKS[index], f"{DOC.name}[{index}]", "exec"), {"__name__": "__doc__"})
    assert "nan" not in out.getvalue().lower()
