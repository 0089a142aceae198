"""The documentation's Python examples run, each block alone; the site covers every page.

Every ```python block of docs/**/*.md runs by itself in a fresh namespace,
as a reader who copies one block would run it. docs/serving.md and
docs/optax.md have their own tests (test_serving_docs.py,
test_optax_docs.py), which run each block the same way and check more.
The site itself is built by ``make docs`` (Sphinx, warnings as errors);
the checks here are the cheap ones: every page is in a toctree and every
public name has an entry in the API reference.
"""

import contextlib
import importlib
import io
import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
OWN_TESTS = {"serving.md", "optax.md"}
PAGES = sorted(
    str(p.relative_to(DOCS))
    for p in DOCS.rglob("*.md")
    if "_build" not in p.parts and p.name != "README.md"
)
BLOCKS = [
    (page, i, block)
    for page in PAGES
    if page not in OWN_TESTS
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), re.S))
]


IDS = [f"{page}[{i}]" for page, i, _ in BLOCKS]


@pytest.mark.parametrize(("page", "index", "block"), BLOCKS, ids=IDS)
def test_block_runs_alone(page, index, block, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # tempfile.mkdtemp() lands in tmp_path
    monkeypatch.setattr("tempfile.tempdir", None)
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            code = compile(block, f"docs/{page} python block {index}", "exec")
            exec(code, {"__name__": "__doc__"})
        except Exception as err:
            raise AssertionError(f"docs/{page} block {index} failed: {err!r}\n{block}") from err


def _toctree_entries() -> set[str]:
    """Every document named in a toctree of any page, as a path below docs/ without .md."""
    entries = set()
    for page in PAGES:
        folder = pathlib.PurePosixPath(page).parent
        for body in re.findall(r"```\{toctree\}\n(.*?)```", (DOCS / page).read_text(), re.S):
            for line in body.splitlines():
                line = line.strip()
                if not line or line.startswith(":"):
                    continue
                path = line[1:] if line.startswith("/") else str(folder / line)
                entries.add(str(pathlib.PurePosixPath(path)))
    return entries


def test_every_page_is_in_a_toctree():
    entries = _toctree_entries()
    missing = [p for p in PAGES if p != "index.md" and p.removesuffix(".md") not in entries]
    assert not missing, f"pages in no toctree of docs/ (Sphinx would warn): {missing}"
    absent = sorted(e for e in entries if not (DOCS / f"{e}.md").exists())
    assert not absent, f"toctree entries without a page: {absent}"


# The API reference lists each public name on its module's page (autosummary
# entries are indented names on lines of their own).
API_PAGES = {
    "jaxmx": "api/jaxmx.md",
    "jaxmx.ptq": "api/ptq.md",
    "jaxmx.flax": "api/flax.md",
    "jaxmx.flax.linen": "api/flax.md",
    "jaxmx.flax.nnx": "api/flax.md",
    "jaxmx.optax": "api/optax.md",
}
LINKED = {("jaxmx", "ptq"), ("jaxmx.flax", "linen"), ("jaxmx.flax", "nnx")}  # pages of their own


@pytest.mark.parametrize("module", sorted(API_PAGES))
def test_api_reference_lists_every_public_name(module):
    names = importlib.import_module(module).__all__
    text = (DOCS / API_PAGES[module]).read_text()
    listed = set(re.findall(r"^ {3}(\w+)$", text, re.M))
    missing = [n for n in names if n not in listed and (module, n) not in LINKED]
    assert not missing, f"{API_PAGES[module]} has no entry for {module}.{missing}"
