"""The import structure, read from the source (every import: module level, inside functions and
under TYPE_CHECKING): no module depends on itself through others, the stage packages depend on
each other in one direction only, and the Workspace spec depends on no stage of the job. And what
the submit side really imports, seen in `sys.modules` after a command ran in a fresh process."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import tuner

PACKAGE = Path(tuner.__file__).parent
# Lower layers first: a module may import its own package and the packages before it, never one
# after it (errors and workdir are shared by all; the CLI is the top).
LAYERS = ["errors", "workdir", "spec", "observe", "oci", "data", "train", "kube", "job", "cli"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, typing: bool):
    """The import nodes of a module; without `typing`, those under `if TYPE_CHECKING:` are left out."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and not typing and getattr(node.test, "id", None) == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in _imports(ast.Module(body=[child]), typing))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports(node, typing)


def import_graph(*, typing: bool = True) -> dict[str, set[str]]:
    """tuner module -> the tuner modules it imports anywhere in its source."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in _imports(ast.parse(path.read_text()), typing):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tuner":
                for alias in node.names:  # `from tuner.data import fetch` imports the module tuner.data.fetch
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


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[1])


def test_the_reader_sees_real_imports():
    graph = import_graph()
    assert {"tuner.spec.plan", "tuner.data.fetch", "tuner.observe.events"} <= graph["tuner.job"]  # module level
    assert "tuner.train.trainer" in graph["tuner.job"]  # inside a function
    assert "tuner.spec.plan" in graph["tuner.observe.summary"]  # under TYPE_CHECKING
    assert "tuner.spec.plan" not in import_graph(typing=False)["tuner.observe.summary"]


def test_no_module_imports_itself_through_others():
    graph = import_graph()
    assert cycles(graph) == []
    # and it would find one: a and b import each other, c only uses a
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_every_module_is_in_a_layer():
    assert {module.split(".")[1] for module in import_graph() if module != "tuner"} == set(LAYERS)


def test_stages_import_only_earlier_layers():
    """What runs flows one way: spec -> observe -> oci -> data -> train -> kube -> job -> cli. Type
    hints may name a later stage's record (the summary names the data's statistics)."""
    upward = sorted(f"{module} -> {target}" for module, targets in import_graph(typing=False).items()
                    if module != "tuner" for target in targets if layer(target) > layer(module))
    assert upward == []


def test_the_spec_depends_on_no_stage():
    """The Workspace and the training config are read and checked before any stage runs: the spec may
    use the shared error type and work-directory layout and its own rules, nothing that fetches,
    prepares, trains, packages or renders."""
    graph = import_graph()
    outside = sorted(f"{module} -> {target}" for module, targets in graph.items() if module.startswith("tuner.spec")
                     for target in targets if not target.startswith("tuner.spec"))
    assert [edge for edge in outside if not edge.endswith(("-> tuner.errors", "-> tuner.workdir"))] == []


HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "trl")
SUBMIT_SIDE = {
    "validate": ["validate", "{workspace}"],
    "render": ["render", "{workspace}"],
    "presets": ["presets"],
    "help": ["--help"],
    "status": ["status", "ws", "--kubeconfig", "{missing}"],
}


@pytest.mark.parametrize("command", list(SUBMIT_SIDE))
def test_the_submit_side_never_imports_the_ml_libraries(command, tmp_path):
    """What runs on a laptop or in CI before any GPU is booked imports none of the training stack."""
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text(yaml.safe_dump({
        "apiVersion": "kaito.sh/v1beta1", "kind": "Workspace", "metadata": {"name": "phi3-qlora"},
        "resource": {"instanceType": "Standard_NC6s_v3"},
        "tuning": {"preset": {"name": "phi-3-mini-4k-instruct"}, "method": "qlora",
                   "input": {"urls": ["https://datasets.example.com/train.parquet"]},
                   "output": {"image": "myacr.azurecr.io/adapters/phi3:0.0.1", "imagePushSecret": "acr-push"}}}))
    argv = [a.format(workspace=workspace, missing=tmp_path / "no-kubeconfig") for a in SUBMIT_SIDE[command]]
    probe = ("import contextlib, io, json, sys\n"
             "from tuner import cli\n"
             "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
             "    try:\n"
             f"        code = cli.main({argv!r})\n"
             "    except SystemExit as exit:\n"
             "        code = exit.code\n"
             f"print(json.dumps([code, sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})]))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    code, heavy = json.loads(done.stdout.strip().splitlines()[-1])
    assert code == (2 if command == "status" else 0), done.stderr
    assert heavy == [], f"tuner {command} imported {heavy}"
