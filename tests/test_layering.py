"""The import structure, read from the source (every import: module level, inside functions and
under TYPE_CHECKING): no module depends on itself through others, and the Workspace spec depends
on no stage of the job."""

from __future__ import annotations

import ast
from pathlib import Path

import tuner

PACKAGE = Path(tuner.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """tuner module -> the tuner modules it imports anywhere in its source."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tuner":
                for alias in node.names:  # `from tuner import events` imports the module tuner.events
                    found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                              else node.module)
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "tuner"}
        graph[name] = {m for m in found if m in modules and m != name and m != "tuner"}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while (member := stack.pop()) != node:
                group.append(member)
            if group:
                found.append(sorted([node, *group]))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_reader_sees_real_imports():
    graph = import_graph()
    assert {"tuner.plan", "tuner.fetch", "tuner.events"} <= graph["tuner.run"]  # module and function level
    assert "tuner.plan" in graph["tuner.summary"]  # under TYPE_CHECKING


def test_no_module_imports_itself_through_others():
    graph = import_graph()
    assert cycles(graph) == []
    # and it would find one: a and b import each other, c only uses a
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_the_spec_depends_on_no_stage():
    """The Workspace is read and checked before any stage runs: it may use the shared error type and
    the rules it applies, nothing that fetches, prepares, trains, packages or renders."""
    assert import_graph()["tuner.spec"] <= {"tuner.errors", "tuner.image_ref", "tuner.k8s_names", "tuner.yamlio"}
