"""The training_config keys (and their types) that transformers, peft, trl and bitsandbytes accept,
read from `library_keys.json` instead of importing those libraries: `tuner validate`, `render` and
`submit` check a config without importing torch (importing transformers, peft and trl took ~5 s of
a 6 s `tuner validate` here).

The file is generated from the pinned libraries (`python -m tuner.library_keys > tuner/library_keys.json`),
and a test regenerates it and compares, so a version bump cannot leave it stale. Types are kept in
a small JSON form: "int", "float", "bool", "str", "none", "any", {"literal": [...]},
{"union": [...]}, {"list": T}, {"dict": [K, V]}; an enum is its values or a string.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any, Literal

KEYS_FILE = Path(__file__).with_name("library_keys.json")
_SCALARS = {"int": int, "float": float, "bool": bool, "str": str, "none": type(None), "any": Any}


@cache
def _document() -> dict[str, Any]:
    return json.loads(KEYS_FILE.read_text())


def keys(section: str) -> set[str]:
    """The keys a section's library takes: LoraConfig, TrainingArguments, SFTConfig (its own beyond
    TrainingArguments'), BitsAndBytesConfig."""
    return set(_document()[section])


def annotations(section: str) -> dict[str, Any]:
    """Key -> Python annotation (builtins and Literal only), for pydantic's strict checks."""
    return {key: _annotation(spec) for key, spec in _document()[section].items()}


def _annotation(spec: Any) -> Any:
    if isinstance(spec, str):
        return _SCALARS[spec]
    (kind, value), = spec.items()
    if kind == "literal":
        return Literal[tuple(value)]
    if kind == "union":
        return typing.Union[tuple(_annotation(v) for v in value)]
    if kind == "list":
        return list[_annotation(value)]
    return dict[_annotation(value[0]), _annotation(value[1])]


# ------------------------------------------------------------------------------ generation

def generate() -> dict[str, Any]:
    """The document, from the installed libraries (imports them: for the generator and its test only)."""
    import bitsandbytes
    import peft
    import transformers
    import trl
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig, TrainingArguments
    from trl import SFTConfig

    training = {f.name: _spec(t) for f, t in _fields(TrainingArguments)}
    return {
        "generated_from": {"transformers": transformers.__version__, "peft": peft.__version__,
                           "trl": trl.__version__, "bitsandbytes": bitsandbytes.__version__},
        "LoraConfig": {f.name: _spec(t) for f, t in _fields(LoraConfig)},
        "TrainingArguments": training,
        "SFTConfig": {f.name: _spec(t) for f, t in _fields(SFTConfig) if f.name not in training},
        "BitsAndBytesConfig": {name: "any" for name in inspect.signature(BitsAndBytesConfig.__init__).parameters
                               if name not in ("self", "kwargs")} | {"quant_method": "str"},
    }


def _fields(cls) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return sorted(((f, hints.get(f.name, Any)) for f in dataclasses.fields(cls) if f.init), key=lambda x: x[0].name)


def _spec(annotation: Any) -> Any:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    for python, name in ((bool, "bool"), (int, "int"), (float, "float"), (str, "str"), (type(None), "none")):
        if annotation is python:
            return name
    if origin is Literal:
        return {"literal": [a.value if isinstance(a, enum.Enum) else a for a in args]}
    if origin in (typing.Union, types.UnionType):
        return {"union": _unique([_spec(a) for a in args])}
    if origin is list or annotation is list:
        return {"list": _spec(args[0]) if args else "any"}
    if origin is dict or annotation is dict:
        return {"dict": [_spec(args[0]), _spec(args[1])] if len(args) == 2 else ["any", "any"]}
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return {"literal": [member.value for member in annotation]}
    return "any"


def _unique(specs: list[Any]) -> list[Any]:
    """A union's members once each, in a fixed order: typing caches unions by equality, so
    `Union[list[int], int]` can come back as an earlier `Union[int, list[int]]` (members in the other
    order) depending on what was imported before."""
    return [json.loads(key) for key in sorted({json.dumps(spec, sort_keys=True) for spec in specs})]


if __name__ == "__main__":
    print(json.dumps(generate(), indent=1, sort_keys=True))
