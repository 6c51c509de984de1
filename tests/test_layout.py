"""The tree shows the architecture (issue 21): CEPrompt itself in ``model/`` depending on no verb, no import
cycles, small modules, a small package root."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "ceprompt"
LAYERS = {  # each folder and what it may import from the package (besides itself)
    "core": set(),
    "model": {"core"},
    "data": {"core", "model"},
    "video": {"core", "data"},
    "experiment": {"core", "model", "data"},
    "weights": {"core", "model", "data", "experiment"},
    "engine": {"core", "model", "weights", "data", "experiment"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Package modules that ``path`` imports, at module level or inside functions."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("ceprompt"):
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("ceprompt"))
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PKG.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def test_no_import_cycles() -> None:
    edges = graph()
    # a package's __init__ is not a dependency of its modules in our tree (they are all docstrings)
    edges = {m: {t for t in deps if not (m.startswith(t + "."))} for m, deps in edges.items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


def test_each_folder_imports_only_the_layers_below() -> None:
    for name, deps in graph().items():
        parts = name.split(".")
        if len(parts) < 3 or parts[1] not in LAYERS:
            continue
        for dep in deps:
            dep_parts = dep.split(".")
            if dep == "ceprompt" or len(dep_parts) < 2 or dep_parts[1] == parts[1]:
                continue  # the package's version, or the same folder
            assert dep_parts[1] in LAYERS[parts[1]], f"{name} imports {dep}"


def test_modules_are_small_and_the_root_holds_few() -> None:
    for path in PKG.rglob("*.py"):
        lines = len(path.read_text().splitlines())
        assert lines <= 500, f"{path.relative_to(PKG)} has {lines} lines"
    root = sorted(p.name for p in PKG.glob("*.py"))
    assert len(root) <= 6, root
    for folder in ("model", "weights", "data", "engine", "verbs", "core", "server", "demo", "experiment", "video"):
        assert (PKG / folder / "__init__.py").read_text().startswith('"""'), folder  # says what lives there
