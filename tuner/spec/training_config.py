"""Kaito's training ConfigMap (`training_config.yaml`): parsing, method defaults and checks.

A section given by the user overlays the method's default section key by key, so a config that
only sets `TrainingArguments.num_train_epochs` still trains with Kaito's LoRA defaults (the typed
sections of tuner.spec.config_sections hold every default). Keys are checked against the libraries
that consume them (peft's LoraConfig, transformers' BitsAndBytesConfig, TRL's SFTConfig, as
tuner.spec.library_keys recorded them from the pinned releases), so an unknown key is refused by
name before any GPU time, and every value's type and range too (tuner.spec.config_values).
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tuner.errors import UserError, UserErrors, quote
from tuner.spec import library_keys, trackers
from tuner.spec.config_sections import (
    SECTIONS,
    CollatorSection,
    DatasetSection,
    LoraSection,
    ModelSection,
    QuantizationSection,
    TrainingSection,
    kaito_keys,
)
from tuner.spec.config_values import check_values
from tuner.spec.yamlio import load_yaml_file, parse_yaml

CONFIG_KEY = "training_config.yaml"

# Kaito's qlora-params template: what method qlora adds to the QuantizationConfig defaults.
_QLORA_QUANTIZATION = {
    "load_in_4bit": True,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_compute_dtype": "bfloat16",
    "bnb_4bit_use_double_quant": True,
}
# Keys Kaito's dataclasses accept that have no effect in tuner: accepted, so a Kaito ConfigMap
# works as it is, and named in one warning each, never dropped in silence.
_NOT_APPLIED = {
    "ModelConfig": {
        "device_map": "each process places the model on its own device (one GPU per process; DDP/torchrun)",
        "state_dict": "the weights come from the base model folder", "from_tf": "the weights are safetensors",
        "resume_download": "downloads always resume", "output_loading_info": "nothing reads it",
    },
    "DataCollator": {
        "mlm": "a causal LM learns the next token; masked-LM collation does not apply",
        "mlm_probability": "a causal LM learns the next token; masked-LM collation does not apply",
        "return_tensors": "tuner's collators return PyTorch tensors",
    },
    "TokenizerParams": {
        "padding": "batches are padded to their longest row (or packed)",
        "truncation": "long rows follow DatasetConfig.long_rows",
    },
}
# SFTConfig keys that are not TrainingArguments keys and that tuner applies itself.
_SFT_KEYS_APPLIED = {"max_length", "packing"}
_SFT_ALIASES = {"max_seq_length": "max_length"}


@dataclass(frozen=True)
class TrainingConfig:
    """The effective configuration: one typed section per Kaito section, defaults filled in."""

    method: str
    model: ModelSection
    quantization: QuantizationSection
    lora: LoraSection
    training_arguments: TrainingSection
    dataset: DatasetSection
    data_collator: CollatorSection
    warnings: tuple[str, ...] = ()  # one per key the user set that tuner accepts but does not apply

    def as_sections(self) -> dict[str, dict[str, Any]]:
        """The config in Kaito's section layout (what `training_config.yaml` would hold), every key set."""
        return {
            "ModelConfig": self.model.values(), "QuantizationConfig": self.quantization.values(),
            "LoraConfig": self.lora.values(), "TrainingArguments": self.training_arguments.values(),
            "DatasetConfig": self.dataset.values(), "DataCollator": self.data_collator.values(),
        }

    def digest(self) -> str:
        """sha256 of the canonical JSON of the effective config."""
        canonical = json.dumps(self.as_sections(), sort_keys=True, separators=(",", ":"), default=str)
        return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def quantized(self) -> bool:
        return self.quantization.quantized


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a ConfigMap manifest or a bare `training_config.yaml`; return the section mapping."""
    document = load_yaml_file(path, "training config")
    source = f"training config file {path}"
    if isinstance(document, dict) and document.get("kind") == "ConfigMap":
        data = document.get("data") or {}
        if not isinstance(data, dict):
            raise UserError(f"the ConfigMap's data is {type(data).__name__}, not a mapping", where=source,
                            fix=f"map data.{CONFIG_KEY} to the training config as YAML text")
        if CONFIG_KEY not in data:
            raise UserError(f"ConfigMap has no data key {CONFIG_KEY!r}", where=source,
                            fix=f"put the training config under data.{CONFIG_KEY}")
        if not isinstance(data[CONFIG_KEY], str):
            raise UserError(f"data.{CONFIG_KEY} is {type(data[CONFIG_KEY]).__name__}, not text", where=source,
                            fix=f"write it as a block of YAML text: {CONFIG_KEY}: |")
        document = parse_yaml(data[CONFIG_KEY], f"{source} (data.{CONFIG_KEY})")
    if not isinstance(document, dict) or not isinstance(document.get("training_config"), dict):
        raise UserError("expected a top-level 'training_config:' mapping", where=source,
                        fix="see Kaito's qlora-params template: training_config: {ModelConfig: ..., ...}")
    return document["training_config"]


def build_config(method: str, user: dict[str, Any] | None = None) -> TrainingConfig:
    """Overlay the user's sections on the method's defaults and run Kaito's checks and tuner's.

    Every problem that needs no data is found here, all at once: a config with three mistakes
    raises UserErrors holding three errors, each naming its field.
    """
    user = user or {}
    errors: list[UserError] = []
    for name in (n for n in user if n not in SECTIONS and n != "TokenizerParams"):
        errors.append(UserError(f"unknown section {quote(str(name))}", where=f"training_config.{name}",
                                fix=f"use only {', '.join(SECTIONS)}" + _suggest(str(name), SECTIONS)))
    given: dict[str, dict[str, Any]] = {name: {} for name in [*SECTIONS, "TokenizerParams"]}
    if method == "qlora":
        given["QuantizationConfig"] = dict(_QLORA_QUANTIZATION)
    for name, values in user.items():
        if values is None or name not in given:
            continue
        if not isinstance(values, dict):
            errors.append(UserError("must be a mapping of keys to values", where=f"training_config.{name}",
                                    fix="write it as `key: value` lines under the section name"))
            continue
        if name == "QuantizationConfig" and ("load_in_4bit" in values or "load_in_8bit" in values):
            given[name] = {}  # the user chose the quantisation mode: inherit no qlora default
        given[name].update(values)
    tokenizer_params = given.pop("TokenizerParams")  # older Kaito templates; only max_length matters
    if "max_length" in tokenizer_params:
        given["TrainingArguments"]["max_length"] = tokenizer_params["max_length"]
    given["TrainingArguments"] = {_SFT_ALIASES.get(k, k): v for k, v in given["TrainingArguments"].items()}

    sft_only = library_keys.keys("SFTConfig")
    known = {"LoraConfig": library_keys.keys("LoraConfig"),
             "TrainingArguments": library_keys.keys("TrainingArguments") | sft_only}
    for name, values in [*given.items(), ("TokenizerParams", tokenizer_params)]:
        errors += _unknown_keys(name, values, known.get(name) or kaito_keys(name))
    unapplied = sorted(k for k in given["TrainingArguments"] if isinstance(k, str) and k in sft_only - _SFT_KEYS_APPLIED)
    errors += [UserError("is an SFTConfig option that tuner does not apply (tuner tokenizes, masks and batches "
                         "the data itself)", where=f"training_config.TrainingArguments.{key}", fix="remove it")
               for key in unapplied]
    checked, value_errors = check_values({**given, "TokenizerParams": tokenizer_params})
    errors += value_errors
    if not errors:
        try:
            DatasetSection.model_validate(checked["DatasetConfig"]).mapping()  # format and columns agree
        except UserError as exc:
            errors.append(exc)
        try:
            trackers.report_to(checked["TrainingArguments"].get("report_to"))  # known and installed
        except UserError as exc:
            errors.append(exc)
    if errors:
        raise errors[0] if len(errors) == 1 else UserErrors(errors)

    warnings = tuple(f"training_config.{section}.{key} is accepted but not applied: {why}"
                     for section, keys in _NOT_APPLIED.items() for key, why in keys.items()
                     if key in (user.get(section) or {}))
    sections = {name: _typed_section(name, values) for name, values in checked.items() if name in SECTIONS}
    config = TrainingConfig(
        method=method, model=sections["ModelConfig"], quantization=sections["QuantizationConfig"],
        lora=sections["LoraConfig"], training_arguments=sections["TrainingArguments"],
        dataset=sections["DatasetConfig"], data_collator=sections["DataCollator"], warnings=warnings,
    )
    _check_method(config)
    return config


def _typed_section(name: str, values: dict[str, Any]) -> Any:
    """The checked values as their typed section. The checks already passed, so a failure here is a
    typed field narrower than its library's type: still the user's value, named like the others."""
    try:
        return SECTIONS[name].model_validate(values)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(part) for part in error["loc"])
        raise UserError(f"{quote(values.get(error['loc'][0]))} is not accepted here: {error['msg']}",
                        where=f"training_config.{name}.{key}", fix="change it, or remove the key for tuner's default"
                        ) from None


def _check_method(config: TrainingConfig) -> None:
    q = config.quantization
    where = "training_config.QuantizationConfig"
    if q.load_in_4bit and q.load_in_8bit:
        raise UserError("load_in_4bit and load_in_8bit are both true", where=where, fix="choose one")
    if config.method == "qlora" and not config.quantized:
        raise UserError("method qlora needs load_in_4bit or load_in_8bit", where=where,
                        fix="set load_in_4bit: true, or use method lora")
    if config.method == "lora" and config.quantized:
        raise UserError("method lora trains unquantised weights, but load_in_4bit/load_in_8bit is set",
                        where=where, fix="remove the load_in_* keys, or use method qlora")
    if config.training_arguments.sharded and q.load_in_8bit:
        raise UserError("8-bit weights cannot be sharded with FSDP (bitsandbytes' int8 layout is not a flat tensor)",
                        where=where, fix="use load_in_4bit (QLoRA shards with FSDP), or remove TrainingArguments.fsdp")
    storage = q.bnb_4bit_quant_storage
    if config.training_arguments.sharded and q.load_in_4bit and storage and storage != (
            q.bnb_4bit_compute_dtype or "bfloat16"):
        raise UserError(f"bnb_4bit_quant_storage {storage} cannot be sharded with FSDP alongside "
                        f"{q.bnb_4bit_compute_dtype or 'bfloat16'} weights: FSDP shards one dtype",
                        where=f"{where}.bnb_4bit_quant_storage",
                        fix="remove it (tuner stores the 4-bit weights in the compute dtype) or set it to the compute "
                            "dtype")
    if config.model.load_in_4bit or config.model.load_in_8bit:
        raise UserError("quantisation belongs in QuantizationConfig", where="training_config.ModelConfig",
                        fix="move load_in_4bit/load_in_8bit to QuantizationConfig")


def _unknown_keys(section: str, values: dict[str, Any], known: set[str]) -> list[UserError]:
    return [UserError("unknown key", where=f"training_config.{section}.{key}",
                      fix="remove it or fix its spelling" + _suggest(str(key), known))
            for key in values if key not in known]


def _suggest(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
