"""Sphinx configuration for the jaxmx documentation.

The guides are MyST Markdown pages (docs/*.md); the API reference is built
from the docstrings by autodoc and autosummary (docs/api/). Build it with
``make docs``, which treats every warning as an error.
"""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jaxmx  # noqa: E402

project = "jaxmx"
author = "the jaxmx authors"
copyright = "the jaxmx authors, Apache License 2.0"
release = jaxmx.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

# Markdown guides and the reStructuredText stubs autosummary writes. No
# notebook reader is installed, so nothing in the docs is executed here: the
# pages' code blocks run in tests/test_docs.py instead.
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "**.ipynb", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]

# MyST: anchors for "page.md#section" links, and $...$ maths where a page uses it.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence", "dollarmath"]

# API reference: one page per public name, written at build time into
# docs/api/_generated (ignored by git).
autosummary_generate = True
autosummary_imported_members = True
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = "furo"
html_title = f"jaxmx {release}"
html_static_path: list[str] = []


def _skip_top_level_names(app, what, name, obj, skip, options):
    """A submodule's page (jaxmx.formats, ...) leaves out what jaxmx itself exports.

    Those names have pages of their own; a class described twice would be a
    duplicate-description warning.
    """
    if what == "module" and name in jaxmx.__all__ and getattr(jaxmx, name) is obj:
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_top_level_names)
