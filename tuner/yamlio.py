"""Reading YAML documents with errors that name the file and line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tuner.errors import UserError


def load_yaml_file(path: Path, what: str) -> Any:
    """Parse one YAML document from `path`; `what` names the file's role in error messages."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} file {path} does not exist", fix="check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {what} file {path}: {exc}", fix="pass a readable UTF-8 YAML file") from None
    return parse_yaml(text, f"{what} file {path}")


def parse_yaml(text: str, source: str) -> Any:
    """Parse one YAML document; `source` names where the text came from."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        place = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{source} is not valid YAML{place}: {problem}", fix="fix the YAML syntax") from None


def field_path(loc: tuple) -> str:
    """Render a pydantic error location as a dotted path with list indices: `a.b[0].c`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out
