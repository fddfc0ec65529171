"""Reading YAML documents with errors that name the file and line, in bounded time and memory.

A Workspace or a ConfigMap is kilobytes (the API server stores at most 1 MiB of a ConfigMap), so
a file over MAX_FILE_BYTES is refused before it is read. PyYAML shares the node of an anchor
between its aliases, so a "billion laughs" document composes small and explodes only when walked
(validation, hashing, rendering): the composed tree's expanded size is counted first, through
the shared nodes once each, and refused over MAX_EXPANDED_NODES. The composer recurses per
nesting level, so nesting is refused past MAX_DEPTH, long before Python's recursion limit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tuner.errors import UserError

MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 64
MAX_EXPANDED_NODES = 100_000


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses nesting deeper than MAX_DEPTH while it composes."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise _TooDeep(mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _TooDeep(Exception):
    def __init__(self, mark):
        self.mark = mark


def load_yaml_file(path: Path, what: str) -> Any:
    """Parse one YAML document from `path`; `what` names the file's role in error messages."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise UserError(f"{what} file {path} is {size:,} bytes, more than a {what} can be "
                            f"({MAX_FILE_BYTES:,})", fix=f"pass the {what} manifest itself (kilobytes)")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} file {path} does not exist", fix="check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {what} file {path}: {exc}", fix="pass a readable UTF-8 YAML file") from None
    return parse_yaml(text, f"{what} file {path}")


def parse_yaml(text: str, source: str) -> Any:
    """Parse one YAML document (bounded in size, nesting and alias expansion); `source` names it."""
    if len(text) > MAX_FILE_BYTES:
        raise UserError(f"{source} holds {len(text):,} characters, more than {MAX_FILE_BYTES:,}",
                        fix="a training config or Workspace is kilobytes: remove what does not belong there")
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        expanded = _expanded_size(node)
        if expanded > MAX_EXPANDED_NODES:
            raise UserError(f"{source}: its anchors and aliases expand to more than {MAX_EXPANDED_NODES:,} values",
                            fix="write the values out instead of nesting aliases (a YAML alias bomb is refused)")
        return loader.construct_document(node)
    except _TooDeep as exc:
        raise UserError(f"{source} nests deeper than {MAX_DEPTH} levels at line {exc.mark.line + 1}",
                        fix="flatten the YAML: no training config or Workspace nests that deep") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        place = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{source} is not valid YAML{place}: {problem}", fix="fix the YAML syntax") from None
    finally:
        loader.dispose()


def _expanded_size(root: yaml.Node) -> int:
    """How many nodes the document holds with every alias expanded, counted without expanding
    (a node's size is computed once, however many aliases share it); a node that contains itself
    through an alias counts as too many."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        children = _children(node)
        if children_done or not children:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in children)
            if sizes[id(node)] > MAX_EXPANDED_NODES:
                return sizes[id(node)]
            continue
        if id(node) in open_nodes:
            return MAX_EXPANDED_NODES + 1  # reached again while its children are being sized: a cycle
        open_nodes.add(id(node))
        stack.append((node, True))
        for child in children:
            if id(child) in open_nodes:
                return MAX_EXPANDED_NODES + 1
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def field_path(loc: tuple) -> str:
    """Render a pydantic error location as a dotted path with list indices: `a.b[0].c`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out
