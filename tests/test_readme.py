"""Each Python example of the README runs as written, alone, in a fresh namespace.

A reader copies one block at a time, so no block may lean on names that an
earlier one defined.
"""

import contextlib
import io
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_its_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs_alone(index, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # tempfile.mkdtemp() lands in tmp_path
    monkeypatch.setattr("tempfile.tempdir", None)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), {})
        except Exception as err:
            raise AssertionError(f"README python block {index} failed: {err!r}") from err
    assert "nan" not in out.getvalue().lower()
