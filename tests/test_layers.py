"""The package's import graph: no cycles, and nothing imports a layer above its own.

Read from the source with ``ast`` (every ``import`` statement at any depth,
inside functions too), so a late import that hides a cycle from Python's
import machinery still fails here. The layers, bottom to top:

* numerics: format records and the family protocol, bit-level rounding and
  scales, block layouts;
* tensor: the MXTensor pytree and what reads, stores and reshapes it;
* families: each family's arithmetic (jaxmx.families), its fused Pallas
  kernels (jaxmx.pallas), and quantize / dequantize, which hand a tensor to
  its format's family or kernel;
* ops: matmul configuration, the quantized matmuls, rules, intercept,
  serving and post-training quantization;
* integrations: Flax and Optax, which may also use the public surface
  (``import jaxmx``).

A module may import its own layer or any layer below.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "jaxmx"

LAYERS = {
    "numerics": (
        "jaxmx._hadamard",
        "jaxmx._leaf_dtypes",
        "jaxmx._paths",
        "jaxmx.bitstream",
        "jaxmx.blocks",
        "jaxmx.codes",
        "jaxmx.formats",
        "jaxmx.numerics",
        "jaxmx.platforms",
        "jaxmx.sparsity",
        "jaxmx.spec",
    ),
    "tensor": (
        "jaxmx._bitmove",
        "jaxmx.array_ops",
        "jaxmx.checkpoint",
        "jaxmx.packing",
        "jaxmx.shards",
        "jaxmx.sparse_tensor",
        "jaxmx.tensor",
    ),
    "families": (
        "jaxmx.analysis",
        "jaxmx.families",
        "jaxmx.pallas",
        "jaxmx.quantize",
        "jaxmx.rounding",
    ),
    "ops": (
        "jaxmx._amber",
        "jaxmx._intercept",
        "jaxmx._operand",
        "jaxmx._sparse_operand",
        "jaxmx._pallas_operand",
        "jaxmx._sparse_weights",
        "jaxmx.config",
        "jaxmx.conv",
        "jaxmx.dot",
        "jaxmx.einsum",
        "jaxmx.fsdp",
        "jaxmx.intercept",
        "jaxmx.native",
        "jaxmx.params",
        "jaxmx.ptq",
        "jaxmx.rules",
    ),
    "integrations": ("jaxmx.flax", "jaxmx.optax"),
    "surface": ("jaxmx",),
}
ORDER = list(LAYERS)


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _layer(module: str) -> str:
    best = None
    for layer, prefixes in LAYERS.items():
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (
                best is None or len(p) > len(best[1])
            ):
                best = (layer, p)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")
    return best[0]


def _annotation_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:``: names an annotation
    refers to (a protocol's return type from the layer above), never imported
    when the program runs, so they make neither an upward import nor a cycle."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skipped


def _imports(module: str) -> set[str]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text(), str(path))
    skipped = _annotation_only(tree)
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
            ]
        else:
            continue
        for name in names:
            # The deepest package module the name lies in.
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def test_every_module_has_a_layer():
    for m in MODULES:
        _layer(m)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_upward_imports(module):
    own = ORDER.index(_layer(module))
    up = sorted(d for d in GRAPH[module] if ORDER.index(_layer(d)) > own and d != "jaxmx")
    if _layer(module) != "integrations":
        up += ["jaxmx"] if "jaxmx" in GRAPH[module] else []
    assert not up, f"{module} ({_layer(module)}) imports {up} from a layer above"


def test_no_import_cycles():
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"
