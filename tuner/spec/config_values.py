"""Every training_config value checked for its type and range before any work (`tuner validate`).

The types are the consuming libraries' own: the dataclass annotations of transformers'
TrainingArguments (plus TRL's SFTConfig `max_length`/`packing`) and peft's LoraConfig, as
tuner.library_keys recorded them; Kaito's
dataclasses (presets/workspace/tuning) for ModelConfig, QuantizationConfig, DatasetConfig,
DataCollator and TokenizerParams, which carry no usable annotations in the libraries. They are
checked strictly (pydantic strict mode: `true` is not an integer, `"four"` is not a number), with
one allowance: a string that spells a number is taken as that number where a number is expected,
as PyYAML reads `2e-4` (no dot) as a string. NaN and infinities are refused everywhere. Ranges
cover the keys whose wrong values pass the libraries and fail or mislead later in the pod.
"""

from __future__ import annotations

import math
import re
import types
import typing
from functools import cache
from typing import Any, Literal

from pydantic import ConfigDict, TypeAdapter, ValidationError

from tuner.errors import UserError, quote
from tuner.spec import config_sections, library_keys

# (low, high, low is exclusive) per key; None: unbounded on that side.
_RANGES: dict[str, dict[str, tuple[float | None, float | None, bool]]] = {
    "TrainingArguments": {
        "learning_rate": (0, None, True), "num_train_epochs": (0, None, True),
        "per_device_train_batch_size": (1, None, False), "per_device_eval_batch_size": (1, None, False),
        "gradient_accumulation_steps": (1, None, False), "eval_accumulation_steps": (1, None, False),
        "warmup_ratio": (0, 1, False), "warmup_steps": (0, None, False), "weight_decay": (0, None, False),
        "max_grad_norm": (0, None, False), "adam_beta1": (0, 1, False), "adam_beta2": (0, 1, False),
        "adam_epsilon": (0, None, True), "logging_steps": (0, None, True), "save_steps": (0, None, True),
        "eval_steps": (0, None, True), "save_total_limit": (1, None, False), "seed": (0, 2**32 - 1, False),
        "data_seed": (0, 2**32 - 1, False), "dataloader_num_workers": (0, None, False),
        "ddp_timeout": (1, None, False),
        # tuner's floor (a chat template alone takes more) and a ceiling no context window reaches
        "max_length": (16, 1 << 20, False),
    },
    # rank: up to the widest hidden size of any current model (16,384); alpha: a positive scale
    "LoraConfig": {"r": (1, 16384, False), "lora_alpha": (0, None, True), "lora_dropout": (0, 1, False)},
    "QuantizationConfig": {"llm_int8_threshold": (0, None, False)},
    "DatasetConfig": {"train_test_split": (0, 1, True), "shuffle_seed": (0, 2**32 - 1, False)},
    "DataCollator": {"pad_to_multiple_of": (1, None, False), "mlm_probability": (0, 1, False)},
    "TokenizerParams": {"max_length": (16, 1 << 20, False)},
}


def check_values(sections: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], list[UserError]]:
    """(the sections with number-strings read as numbers, one UserError per bad value)."""
    checked: dict[str, dict[str, Any]] = {}
    errors: list[UserError] = []
    for section, values in sections.items():
        checked[section] = {}
        for key, value in values.items():
            try:
                value = check_value(section, key, value, f"training_config.{section}.{key}")
            except UserError as exc:
                errors.append(exc)
            checked[section][key] = value
    return checked, errors


def check_value(section: str, key: str, value: Any, where: str) -> Any:
    """One value's type, range and special rules; the value (a number-string as its number), or UserError."""
    annotation = section_types(section).get(key)
    value = _typed(value, annotation, where) if annotation is not None else value
    _in_range(value, _RANGES.get(section, {}).get(key), where)
    _special(section, key, value, where)
    return value


def section_types(section: str) -> dict[str, Any]:
    if section in config_sections.KAITO_SECTIONS:
        return config_sections.kaito_types(section)
    if section == "LoraConfig":
        return _lora_types()
    if section == "TrainingArguments":
        return _training_argument_types()
    return {}


@cache
def _lora_types() -> dict[str, Any]:
    # peft annotates these `int` and `dict` but computes with any number (e.g. alpha 16.0 or 0.5 x r)
    return library_keys.annotations("LoraConfig") | {"lora_alpha": float, "rank_pattern": dict[str, int] | None,
                                                     "alpha_pattern": dict[str, float] | None}


@cache
def _training_argument_types() -> dict[str, Any]:
    return library_keys.annotations("TrainingArguments") | {"max_length": int | None, "packing": bool | None}


@cache
def _adapter(annotation: Any) -> TypeAdapter:
    return TypeAdapter(annotation, config=ConfigDict(strict=True, arbitrary_types_allowed=True))


def _typed(value: Any, annotation: Any, where: str) -> Any:
    """`value` if it is of `annotation`; a number-string as its number where a number fits; else UserError."""
    adapter = _adapter(annotation)
    try:
        adapter.validate_python(value)
        return _finite(value, where)
    except ValidationError:
        pass
    number = _number(value)
    if number is not None:
        try:
            adapter.validate_python(number)
            return _finite(number, where)
        except ValidationError:
            pass
    raise UserError(f"must be {describe(annotation)}, not {quote(value)}", where=where,
                    fix="change it, or remove the key for tuner's default")


def _number(value: Any) -> int | float | None:
    """A string that spells a number, as that number (an integral one as an int too)."""
    if not isinstance(value, str):
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return int(number) if number.is_integer() and re.fullmatch(r"[+-]?\d+(\.0*)?([eE][+]?\d+)?", value.strip()) \
        else number


def _finite(value: Any, where: str) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{value!r} is not a finite number", where=where, fix="give a finite number")
    return value


def _in_range(value: Any, bounds: tuple[float | None, float | None, bool] | None, where: str) -> None:
    if bounds is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    low, high, exclusive = bounds
    too_low = low is not None and (value <= low if exclusive else value < low)
    if too_low or (high is not None and value > high):
        parts = ([f"> {_bound(low)}" if exclusive else f">= {_bound(low)}"] if low is not None else []) + (
            [f"<= {_bound(high)}"] if high is not None else [])
        raise UserError(f"{quote(value)} is out of range: it must be {' and '.join(parts)}", where=where,
                        fix="change it, or remove the key for tuner's default")


def _bound(number: float) -> str:
    return f"{number:,}" if float(number).is_integer() else f"{number:g}"


def _special(section: str, key: str, value: Any, where: str) -> None:
    """Rules a type and a range cannot say."""
    if (section, key) == ("TrainingArguments", "max_steps") and isinstance(value, int) and (value == 0 or value < -1):
        raise UserError(f"{quote(value)} trains nothing", where=where,
                        fix="give a positive number of steps, or -1 (train num_train_epochs)")
    if section == "LoraConfig" and key in ("target_modules", "exclude_modules") and isinstance(value, str) \
            and value != "all-linear":
        try:
            re.compile(value)
        except re.error as exc:
            raise UserError(f"{quote(value)} is not a regular expression ({exc})", where=where,
                            fix="give a list of module names, or a valid regular expression") from None
    if section == "LoraConfig" and key in ("rank_pattern", "alpha_pattern") and isinstance(value, dict):
        for pattern, number in value.items():
            _in_range(number, _RANGES["LoraConfig"]["r" if key == "rank_pattern" else "lora_alpha"],
                      f"{where}[{pattern!r}]")


def describe(annotation: Any) -> str:
    """An annotation in words: `int | None` -> "an integer or null"."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):  # null (a missing value) goes unsaid
        return " or ".join(dict.fromkeys(describe(a) for a in args if a is not type(None)))
    if origin is list or annotation is list:
        return f"a list of {describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is dict or annotation is dict:
        return "a mapping"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if annotation in names:
        return names[annotation]
    return f"a {getattr(annotation, '__name__', str(annotation))}"
