"""The modules of hyperfields import one way: no import cycles, and library code never imports the command line."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hyperfields"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the hyperfields modules it imports anywhere in its code (top level or inside functions)."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1 parents
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from a import b` imports module a.b when there is one, else a name defined in a.
                imported.update(
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
                )
        graph[name] = {target for target in imported if target in modules and target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first = last), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_the_imports_it_should():
    graph = import_graph()
    assert "hyperfields.predict" in graph["hyperfields.generate"]  # a top-level import
    assert "hyperfields.training" in graph["hyperfields.cli.train"]  # an import inside a function
    assert "hyperfields.models.loading" in graph["hyperfields.models"]  # a package's __init__


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_hyperfields_modules_have_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_library_code_never_imports_the_command_line():
    graph = import_graph()
    offenders = {
        name: sorted(t for t in targets if t.startswith("hyperfields.cli"))
        for name, targets in graph.items()
        if not name.startswith("hyperfields.cli") and name != "hyperfields.__main__"
    }
    assert {name: targets for name, targets in offenders.items() if targets} == {}


def test_only_the_command_line_imports_training():
    graph = import_graph()
    importers = {
        name
        for name, targets in graph.items()
        if not name.startswith("hyperfields.training") and any(t.startswith("hyperfields.training") for t in targets)
    }
    assert "hyperfields.cli.train" in importers
    assert {name for name in importers if not name.startswith("hyperfields.cli.")} == set()
