"""Kaito's training ConfigMap (`training_config.yaml`): parsing, method defaults and checks.

A section given by the user overlays the method's default section key by key, so a config that
only sets `TrainingArguments.num_train_epochs` still trains with Kaito's LoRA defaults. Keys are
checked against the libraries that consume them (peft's LoraConfig, transformers'
BitsAndBytesConfig, TRL's SFTConfig), so an unknown key is refused by name before any GPU time.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import inspect
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from tuner.errors import UserError
from tuner.yamlio import load_yaml_file, parse_yaml

CONFIG_KEY = "training_config.yaml"

# Kaito's lora-params / qlora-params templates (save_strategy "no": tuner keeps its own checkpoints).
_COMMON_DEFAULTS: dict[str, dict[str, Any]] = {
    "ModelConfig": {"torch_dtype": "bfloat16", "local_files_only": True, "device_map": "auto"},
    "QuantizationConfig": {"load_in_4bit": False},
    "LoraConfig": {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0},
    "TrainingArguments": {
        "output_dir": "/mnt/results",
        "ddp_find_unused_parameters": False,
        "save_strategy": "no",
        "per_device_train_batch_size": 1,
    },
    "DataCollator": {"mlm": True},
    "DatasetConfig": {"shuffle_dataset": True, "train_test_split": 1},
}
_QLORA_QUANTIZATION = {
    "load_in_4bit": True,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_compute_dtype": "bfloat16",
    "bnb_4bit_use_double_quant": True,
}

# Keys of Kaito's own dataclasses (presets/workspace/tuning/text-generation/cli.py).
_MODEL_KEYS = {
    "pretrained_model_name_or_path", "state_dict", "cache_dir", "from_tf", "force_download",
    "resume_download", "proxies", "output_loading_info", "local_files_only", "revision",
    "trust_remote_code", "load_in_4bit", "load_in_8bit", "torch_dtype", "device_map",
    "chat_template", "attn_implementation",
}
_DATASET_KEYS = {
    "dataset_path", "dataset_extension", "shuffle_dataset", "shuffle_seed", "context_column",
    "response_column", "messages_column", "train_test_split",
    # tuner's own: explicit format and columns, and what to do with bad and long rows
    "format", "columns", "bad_rows", "long_rows",
}
_COLLATOR_KEYS = {"mlm", "mlm_probability", "pad_to_multiple_of", "return_tensors"}
_TOKENIZER_KEYS = {"padding", "truncation", "max_length"}
# SFTConfig keys that are not TrainingArguments keys and that tuner applies itself.
_SFT_KEYS_APPLIED = {"max_length", "packing"}
_SFT_ALIASES = {"max_seq_length": "max_length"}
_DTYPES = {"bfloat16", "float16", "float32", "auto"}


@dataclass(frozen=True)
class TrainingConfig:
    """The effective configuration after defaults: one plain dict per Kaito section."""

    method: str
    model: dict[str, Any]
    quantization: dict[str, Any]
    lora: dict[str, Any]
    training_arguments: dict[str, Any]
    dataset: dict[str, Any]
    data_collator: dict[str, Any]

    def as_sections(self) -> dict[str, dict[str, Any]]:
        """The config in Kaito's section layout (what `training_config.yaml` would hold)."""
        return {
            "ModelConfig": self.model, "QuantizationConfig": self.quantization, "LoraConfig": self.lora,
            "TrainingArguments": self.training_arguments, "DatasetConfig": self.dataset,
            "DataCollator": self.data_collator,
        }

    def digest(self) -> str:
        """sha256 of the canonical JSON of the effective config."""
        canonical = json.dumps(self.as_sections(), sort_keys=True, separators=(",", ":"), default=str)
        return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def quantized(self) -> bool:
        return bool(self.quantization.get("load_in_4bit") or self.quantization.get("load_in_8bit"))


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a ConfigMap manifest or a bare `training_config.yaml`; return the section mapping."""
    document = load_yaml_file(path, "training config")
    source = f"training config file {path}"
    if isinstance(document, dict) and document.get("kind") == "ConfigMap":
        data = document.get("data") or {}
        if CONFIG_KEY not in data:
            raise UserError(f"ConfigMap has no data key {CONFIG_KEY!r}", where=source,
                            fix=f"put the training config under data.{CONFIG_KEY}")
        document = parse_yaml(data[CONFIG_KEY], f"{source} (data.{CONFIG_KEY})")
    if not isinstance(document, dict) or not isinstance(document.get("training_config"), dict):
        raise UserError("expected a top-level 'training_config:' mapping", where=source,
                        fix="see Kaito's qlora-params template: training_config: {ModelConfig: ..., ...}")
    return document["training_config"]


def build_config(method: str, user: dict[str, Any] | None = None) -> TrainingConfig:
    """Overlay the user's sections on the method's defaults and run Kaito's checks."""
    user = user or {}
    unknown = set(user) - set(_COMMON_DEFAULTS) - {"TokenizerParams"}
    if unknown:
        name = sorted(unknown)[0]
        raise UserError(f"unknown section {name!r}", where=f"training_config.{name}",
                        fix=f"use only {', '.join(_COMMON_DEFAULTS)}" + _suggest(name, _COMMON_DEFAULTS))
    sections = copy.deepcopy(_COMMON_DEFAULTS)
    if method == "qlora":
        sections["QuantizationConfig"] = dict(_QLORA_QUANTIZATION)
    for name, values in user.items():
        if values is None:
            continue
        if not isinstance(values, dict):
            raise UserError("must be a mapping of keys to values", where=f"training_config.{name}",
                            fix="write it as `key: value` lines under the section name")
        if name == "TokenizerParams":  # older Kaito templates; max_length is the only one that matters
            _check_keys(name, values, _TOKENIZER_KEYS)
            if "max_length" in values:
                sections["TrainingArguments"]["max_length"] = values["max_length"]
            continue
        if name == "QuantizationConfig" and ("load_in_4bit" in values or "load_in_8bit" in values):
            sections[name] = {}  # the user chose the quantisation mode: inherit no load_in_* default
        sections[name].update(values)

    training_args = {_SFT_ALIASES.get(k, k): v for k, v in sections["TrainingArguments"].items()}
    _check_keys("ModelConfig", sections["ModelConfig"], _MODEL_KEYS)
    _check_keys("QuantizationConfig", sections["QuantizationConfig"], _bnb_keys())
    _check_keys("LoraConfig", sections["LoraConfig"], _lora_keys())
    _check_keys("TrainingArguments", training_args, _training_argument_keys() | _sft_only_keys())
    _check_keys("DatasetConfig", sections["DatasetConfig"], _DATASET_KEYS)
    _check_keys("DataCollator", sections["DataCollator"], _COLLATOR_KEYS)
    unapplied = sorted(set(training_args) & _sft_only_keys() - _SFT_KEYS_APPLIED)
    if unapplied:
        raise UserError("is an SFTConfig option that tuner does not apply (tuner tokenizes, masks and "
                        "batches the data itself)", where=f"training_config.TrainingArguments.{unapplied[0]}",
                        fix="remove it")

    config = TrainingConfig(
        method=method, model=sections["ModelConfig"], quantization=sections["QuantizationConfig"],
        lora=sections["LoraConfig"], training_arguments=training_args,
        dataset=sections["DatasetConfig"], data_collator=sections["DataCollator"],
    )
    _check_method(config)
    _check_values(config)
    return config


def _check_method(config: TrainingConfig) -> None:
    q = config.quantization
    where = "training_config.QuantizationConfig"
    if q.get("load_in_4bit") and q.get("load_in_8bit"):
        raise UserError("load_in_4bit and load_in_8bit are both true", where=where, fix="choose one")
    if config.method == "qlora" and not config.quantized:
        raise UserError("method qlora needs load_in_4bit or load_in_8bit", where=where,
                        fix="set load_in_4bit: true, or use method lora")
    if config.method == "lora" and config.quantized:
        raise UserError("method lora trains unquantised weights, but load_in_4bit/load_in_8bit is set",
                        where=where, fix="remove the load_in_* keys, or use method qlora")
    if config.model.get("load_in_4bit") or config.model.get("load_in_8bit"):
        raise UserError("quantisation belongs in QuantizationConfig", where="training_config.ModelConfig",
                        fix="move load_in_4bit/load_in_8bit to QuantizationConfig")


def _check_values(config: TrainingConfig) -> None:
    dtype = config.model.get("torch_dtype")
    if dtype is not None and dtype not in _DTYPES:
        raise UserError(f"{dtype!r} is not a dtype", where="training_config.ModelConfig.torch_dtype",
                        fix=f"use one of {', '.join(sorted(_DTYPES))}")
    compute = config.quantization.get("bnb_4bit_compute_dtype")
    if compute is not None and compute not in _DTYPES - {"auto"}:
        raise UserError(f"{compute!r} is not a dtype",
                        where="training_config.QuantizationConfig.bnb_4bit_compute_dtype",
                        fix="use bfloat16, float16 or float32")
    split = config.dataset.get("train_test_split")
    if not isinstance(split, (int, float)) or not 0 < split <= 1:
        raise UserError(f"{split!r} must be a number in (0, 1] (the fraction that trains)",
                        where="training_config.DatasetConfig.train_test_split", fix="e.g. 0.9 for a 90/10 split")
    max_length = config.training_arguments.get("max_length")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 16):
        raise UserError(f"{max_length!r} must be an integer >= 16",
                        where="training_config.TrainingArguments.max_length")
    rank = config.lora.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise UserError(f"{rank!r} must be a positive integer", where="training_config.LoraConfig.r",
                        fix="use a LoRA rank such as 8, 16 or 64")


def _check_keys(section: str, values: dict[str, Any], known: set[str]) -> None:
    for key in values:
        if key not in known:
            raise UserError("unknown key", where=f"training_config.{section}.{key}",
                            fix="remove it or fix its spelling" + _suggest(key, known))


def _suggest(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@cache
def _lora_keys() -> set[str]:
    from peft import LoraConfig

    return {f.name for f in dataclasses.fields(LoraConfig)}


@cache
def _bnb_keys() -> set[str]:
    from transformers import BitsAndBytesConfig

    params = set(inspect.signature(BitsAndBytesConfig.__init__).parameters) - {"self", "kwargs"}
    return params | {"quant_method"}


@cache
def _training_argument_keys() -> set[str]:
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments) if f.init}


@cache
def _sft_only_keys() -> set[str]:
    from trl import SFTConfig

    return {f.name for f in dataclasses.fields(SFTConfig) if f.init} - _training_argument_keys()
