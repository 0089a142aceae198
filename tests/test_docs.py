"""The Python examples of docs/*.md run as written, in order, one namespace per page.

docs/serving.md and docs/optax.md have their own tests (test_serving_docs.py,
test_optax_docs.py), which also check what the examples print.
"""

import contextlib
import io
import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
OWN_TESTS = {"serving.md", "optax.md"}
PAGES = sorted(
    p.name for p in DOCS.glob("*.md") if p.name not in OWN_TESTS and "```python" in p.read_text()
)


@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page):
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), re.S)
    namespace: dict = {"__name__": "__doc__"}
    with contextlib.redirect_stdout(io.StringIO()):
        for i, block in enumerate(blocks):
            try:
                exec(compile(block, f"docs/{page} python block {i}", "exec"), namespace)
            except Exception as err:
                raise AssertionError(f"docs/{page} block {i} failed: {err!r}\n{block}") from err
