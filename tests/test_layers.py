"""The library's import structure: no circles, and imports only go down the layers.

Every import counts, also those inside functions and under ``TYPE_CHECKING``: a circle that
only type checking sees is still two modules that cannot be read apart. The layers, bottom
up: ``configkit`` imports none of the others; ``streams`` and ``backbones`` import only
``configkit``; inside ``specialize`` each unit may import its own modules and the units of
lower layers (:data:`SPECIALIZE_LAYERS`), never a unit of its own layer or above.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("configkit", "streams", "backbones", "specialize")

# top-level package -> the top-level packages it may import
ALLOWED_PACKAGES = {
    "configkit": set(),
    "streams": {"configkit"},
    "backbones": {"configkit"},
    "specialize": {"configkit", "streams", "backbones"},
}

# bottom up; a unit of layer i may import units of layers < i (and the package root, which
# holds only __version__ and the lazy public names)
SPECIALIZE_LAYERS: tuple[tuple[str, ...], ...] = (
    ("specialize.summary", "specialize.evaluation", "specialize.models"),
    ("specialize.policy",),
    ("specialize.engine", "specialize.drift", "specialize.updater"),
    ("specialize.operating_point",),
    ("specialize.specializer", "specialize.report"),
    ("specialize.run",),
    ("specialize.cli",),
)


def module_names(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """``{dotted module name: file}`` of every module under ``root``'s ``packages``."""
    names = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names[".".join(parts)] = path
    return names


def _imported(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: from the module's package, one level up per extra dot
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[:len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    # ``from package import submodule`` imports the submodule
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
            for alias in node.names]


def import_graph(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, set[str]]:
    """``{module: modules of the library it imports}``, every import statement counted."""
    names = module_names(root, packages)
    known = set(names)
    graph = {}
    for module, path in names.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            for name in _imported(node, module, path.name == "__init__.py", known):
                while name and name not in known:  # ``import a.b.c`` of a name inside a.b
                    name = name.rpartition(".")[0]
                if name and name != module:
                    targets.add(name)
        graph[module] = targets
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of two or more modules (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups)


def _unit(module: str) -> str | None:
    for layer in SPECIALIZE_LAYERS:
        for unit in layer:
            if module == unit or module.startswith(unit + "."):
                return unit
    return None


def _layer(unit: str) -> int:
    return next(i for i, layer in enumerate(SPECIALIZE_LAYERS) if unit in layer)


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports that go up or sideways, and ``specialize`` modules outside every layer."""
    out = []
    for module, targets in sorted(graph.items()):
        package = module.partition(".")[0]
        for target in sorted(targets):
            target_package = target.partition(".")[0]
            if target_package != package and target_package not in ALLOWED_PACKAGES[package]:
                out.append(f"{module} imports {target}: {package} may import only "
                           f"{sorted(ALLOWED_PACKAGES[package]) or 'none of the others'}")
        if package != "specialize" or module == "specialize":
            continue
        unit = _unit(module)
        if unit is None:
            out.append(f"{module}: in no layer; add its unit to SPECIALIZE_LAYERS")
            continue
        for target in sorted(t for t in targets if t.startswith("specialize.")):
            target_unit = _unit(target)
            if target_unit not in (None, unit) and _layer(target_unit) >= _layer(unit):
                out.append(f"{module} imports {target}: {unit} (layer {_layer(unit)}) may "
                           f"only import layers below it, {target_unit} is layer "
                           f"{_layer(target_unit)}")
    return out


def test_the_library_has_no_import_circle():
    assert import_cycles(import_graph(ROOT)) == []


def test_imports_go_down_the_layers_only():
    assert layer_violations(import_graph(ROOT)) == []


def test_the_graph_sees_the_imports_it_must():
    graph = import_graph(ROOT)
    assert "specialize.run.config" in graph["specialize.run.experiment"]
    assert "specialize.evaluation.curves" in graph["specialize.policy"]  # from pkg import mod
    assert "specialize.updater.prior" in graph["specialize.operating_point.controller"]


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_planted_circle_is_found(tmp_path):
    _write(tmp_path, {
        "specialize/__init__.py": "",
        "specialize/run/__init__.py": "",
        "specialize/run/a.py": "from specialize.run.b import f\n",
        "specialize/run/b.py": "def f():\n    from . import a\n",  # inside a function
        "specialize/policy.py": "",
    })
    assert import_cycles(import_graph(tmp_path, ["specialize"])) == [
        ["specialize.run.a", "specialize.run.b"]]


@pytest.mark.parametrize(("files", "expected"), [
    ({"streams/x.py": "import specialize.policy\n", "specialize/policy.py": ""},
     "streams.x imports specialize.policy"),
    ({"configkit/x.py": "from backbones import y\n", "backbones/y.py": ""},
     "configkit.x imports backbones.y"),
    ({"specialize/policy.py": "from specialize.run import config\n",
      "specialize/run/__init__.py": "", "specialize/run/config.py": ""},
     "specialize.policy imports specialize.run.config"),
    ({"specialize/engine.py": "import specialize.drift\n", "specialize/drift/__init__.py": ""},
     "specialize.engine imports specialize.drift"),  # sideways: the same layer
    ({"specialize/extras.py": ""}, "specialize.extras: in no layer"),
])
def test_a_planted_upward_import_is_refused(tmp_path, files, expected):
    _write(tmp_path, {f"{package}/__init__.py": "" for package in PACKAGES} | files)
    violations = layer_violations(import_graph(tmp_path))
    assert len(violations) == 1 and violations[0].startswith(expected)


def test_no_module_is_over_500_lines():
    long = {name: count for name, path in module_names(ROOT, PACKAGES).items()
            if (count := len(path.read_text().splitlines())) > 500}
    assert long == {}


def test_the_architecture_map_names_every_module_and_package():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    unnamed = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name != "__init__.py" and f"`{path.name}`" not in text:
                unnamed.append(str(path.relative_to(ROOT)))
        for folder in sorted(p for p in (ROOT / package).rglob("*") if p.is_dir()):
            if folder.name != "__pycache__" and f"{folder.name}/" not in text:
                unnamed.append(f"{folder.relative_to(ROOT)}/")
    assert unnamed == [], "add them to ARCHITECTURE.md's map"
