"""The package imports strictly downward: math, settings and formats, mergekit glue,
commands, CLI. Read from the source with ``ast``, so a new module must be placed."""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mergekit_lssf")

#: module -> layer; a module may import its own layer or lower ones, never higher.
LAYERS = {
    # 0 names, no dependencies
    "version": 0, "vocabulary": 0,
    # 1 the parameters, declared once, and the math that takes them: no mergekit
    "parameters": 1, "leading_eigh": 1, "precision": 1, "kernel": 1, "contrastive": 1,
    # 2 file formats, layouts, checks on files, running a model (no mergekit planning)
    "layout": 2, "fused": 2, "contrastive_file": 2, "safetensors_io": 2, "subspace_file": 2, "stats": 2,
    "guards": 2, "provenance": 2, "model_card": 2, "generation": 2, "measure": 2,
    # 3 the mergekit glue
    "merge_method": 3, "recipe": 3, "plan": 3, "traversal": 3, "registration": 3,
    # 4 the commands and the models they build
    "check": 4, "multi_recipe": 4, "calibrate": 4, "contrastive_calibrate": 4, "evaluate": 4, "report": 4, "patch": 4, "toy_models": 4, "real_models": 4,
    "tune": 4, "tune_points": 4, "tune_recipes": 4, "tune_report": 4,
    # 5 the demo, which runs the commands
    "demo": 5,
    # 6 the CLI, and the package's own namespace
    "cli": 6, "__init__": 6,
}
MATH = {m for m, layer in LAYERS.items() if layer <= 1}


def _modules():
    return sorted(f[:-3] for f in os.listdir(PACKAGE) if f.endswith(".py"))


def _imports(tree: ast.Module):
    """(imported module, at module level?) for every import in the file; package
    modules by their short name, others by their full dotted name."""
    top = set()
    for node in tree.body:  # module level, including under a module-level if/try
        for inner in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
            top.add(id(inner))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from .x import y / from . import x
                names = [node.module] if node.module else [a.name for a in node.names]
                names = [f"mergekit_lssf.{n}" for n in names]
            elif node.module == "mergekit_lssf":
                names = [f"mergekit_lssf.{a.name}" for a in node.names]
            else:
                names = [node.module]
        else:
            continue
        for name in names:
            yield name, id(node) in top


def _package_imports(module: str):
    with open(os.path.join(PACKAGE, module + ".py"), encoding="utf-8") as fp:
        tree = ast.parse(fp.read())
    for name, at_top in _imports(tree):
        if name.startswith("mergekit_lssf."):
            yield name.split(".")[1], at_top


def test_every_module_has_a_layer():
    assert set(_modules()) == set(LAYERS), "place new modules in LAYERS: " + str(sorted(set(_modules()) ^ set(LAYERS)))


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_imports_go_down_and_sit_at_module_level(module):
    for imported, at_top in _package_imports(module):
        if imported not in LAYERS:  # a name imported from the package root, e.g. __version__
            imported = "__init__"
        assert at_top, f"{module} imports {imported} inside a function"
        assert LAYERS[imported] <= LAYERS[module], (
            f"{module} (layer {LAYERS[module]}) imports {imported} (layer {LAYERS[imported]})")


def test_no_cycles_within_a_layer():
    graph = {m: {i for i, _ in _package_imports(m) if i in LAYERS and i != m} for m in LAYERS}
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import cycle: " + " -> ".join(path + [m])
        state[m] = "open"
        for n in sorted(graph[m]):
            visit(n, path + [m])
        state[m] = "done"

    for m in sorted(graph):
        visit(m, [])


@pytest.mark.parametrize("module", sorted(MATH))
def test_the_math_imports_no_mergekit(module):
    with open(os.path.join(PACKAGE, module + ".py"), encoding="utf-8") as fp:
        tree = ast.parse(fp.read())
    assert not [n for n, _ in _imports(tree) if n == "mergekit" or n.startswith("mergekit.")]


def test_the_checker_sees_a_function_level_import(tmp_path):
    """The checker itself: an import inside a function is not at module level."""
    tree = ast.parse("import os\nfrom . import kernel\ndef f():\n    from mergekit_lssf.cli import main\n")
    assert sorted(_imports(tree)) == [("mergekit_lssf.cli", False), ("mergekit_lssf.kernel", True), ("os", True)]
