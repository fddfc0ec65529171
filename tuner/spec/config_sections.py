"""The sections of `training_config.yaml` as typed records, each key with its one default.

A default is Kaito's where Kaito's LoRA template sets one (r 8, batch size 1, save_strategy "no"),
else tuner's where tuner decides (about 50 progress lines per run), else the consuming library's
own (a test compares those with the pinned releases). Kaito's own sections (ModelConfig,
QuantizationConfig, DatasetConfig, DataCollator, TokenizerParams) have every key as a field, and
the field types are the ones tuner.spec.config_values checks. The library sections (LoraConfig,
TrainingArguments) type the keys tuner reads; every other key, already checked against the library
that takes it, rides along as an extra and reaches that library unchanged.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from tuner.spec import trackers
from tuner.spec.columns import FORMATS, ColumnMapping

Dtype = Literal["bfloat16", "float16", "float32", "auto"]
ComputeDtype = Literal["bfloat16", "float16", "float32"]
DatasetFormat = Literal[FORMATS]  # type: ignore[valid-type]  # Literal of the tuple's members
BadRows = Literal["drop", "error"]
LongRows = Literal["truncate", "drop", "error"]


class Section(BaseModel):
    """One training_config section. None means "not set": the library's own default applies."""

    model_config = ConfigDict(extra="allow", frozen=True, protected_namespaces=())

    def values(self) -> dict[str, Any]:
        """The keys that are set (by a default or by the user), as the consuming library takes them."""
        return self.model_dump(exclude_none=True)


class ModelSection(Section):
    """Kaito's ModelConfig (presets/workspace/tuning/text-generation/cli.py)."""

    pretrained_model_name_or_path: str | None = None
    state_dict: dict | None = None
    cache_dir: str | None = None
    from_tf: bool | None = None
    force_download: bool | None = None
    resume_download: bool | None = None
    proxies: dict[str, str] | None = None
    output_loading_info: bool | None = None
    local_files_only: bool | None = None
    revision: str | None = None
    trust_remote_code: bool | None = None
    load_in_4bit: bool | None = None
    load_in_8bit: bool | None = None
    torch_dtype: Dtype | None = "bfloat16"
    device_map: str | dict | None = None
    chat_template: str | None = None
    attn_implementation: str | None = None
    weights_image: str | None = None  # tuner's own: an image whose /data holds the model folder (air-gapped mirrors)


class QuantizationSection(Section):
    """Kaito's QuantizationConfig: transformers' BitsAndBytesConfig keys (which carry no annotations).
    Method lora's defaults; tuner.spec.training_config holds QLoRA's overlay (Kaito's qlora template)."""

    quant_method: str | None = None
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    llm_int8_threshold: float | None = None
    llm_int8_skip_modules: list[str] | None = None
    llm_int8_enable_fp32_cpu_offload: bool | None = None
    llm_int8_has_fp16_weight: bool | None = None
    bnb_4bit_compute_dtype: ComputeDtype | None = None
    bnb_4bit_quant_type: Literal["nf4", "fp4"] | None = None
    bnb_4bit_use_double_quant: bool | None = None
    bnb_4bit_quant_storage: Literal["bfloat16", "float16", "float32", "uint8", "int8"] | None = None

    @property
    def quantized(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit


class LoraSection(Section):
    """peft's LoraConfig. `target_modules` None: the preset's."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    rank_pattern: dict[str, int] | None = None
    use_dora: bool = False
    task_type: str = "CAUSAL_LM"


class TrainingSection(Section):
    """transformers' TrainingArguments, plus TRL SFTConfig's `max_length` and `packing`, which tuner
    applies itself (the data is tokenized, masked and packed by tuner.data)."""

    output_dir: str = "/mnt/results"
    ddp_find_unused_parameters: bool = False
    save_strategy: str = "no"  # Kaito's "no" means tuner's checkpoint plan (tuner.train.checkpoints)
    save_steps: float | None = None  # with save_strategy "no": tuner.train.checkpoints' plan
    save_total_limit: int | None = 2  # the newest complete checkpoint survives a crash while saving the next
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 3.0
    max_steps: int = -1  # -1: num_train_epochs decides
    logging_steps: float = 0.02  # a ratio of the total: about 50 progress lines per run
    logging_first_step: bool = True
    optim: str = "adamw_torch_fused"
    seed: int = 42  # also seeds the LoRA initialisation, so one config gives one starting adapter on any launch
    ddp_timeout: int = 1800
    eval_strategy: str | None = None  # with an eval split: tuner's few evaluations per run (tuner.train.trainer)
    eval_steps: float | None = None
    gradient_checkpointing: bool | None = None  # transformers' deprecated name of activation_checkpointing
    activation_checkpointing: bool | None = None
    bf16: bool | None = None
    fp16: bool | None = None
    fsdp: str | None = None  # "full_shard": shard the base model over the ranks (tuner.train.sharding)
    fsdp_config: dict[str, Any] | str | None = None
    max_length: int | None = None  # None: TRL's 1024, capped by the preset's context (tuner.spec.plan)
    packing: bool | None = None  # None: tuner packs when it saves padding (tuner.data.packing)
    report_to: str | list[str] = "none"  # transformers' integrations (tuner.spec.trackers)

    @property
    def sharded(self) -> bool:
        """FSDP asked for: any of transformers' option strings ("full_shard", "full_shard auto_wrap")."""
        return bool(self.fsdp) and self.fsdp.strip() != "no"

    @property
    def trackers(self) -> tuple[str, ...]:
        """The integrations `report_to` names ("all": every installed one), as transformers reads it."""
        return trackers.report_to(self.report_to)

    @property
    def checkpointing(self) -> bool:
        """Whether activations are recomputed: the new name wins over the old, as in TrainingArguments."""
        chosen = self.gradient_checkpointing if self.activation_checkpointing is None else self.activation_checkpointing
        return bool(chosen)


class DatasetSection(Section):
    """Kaito's DatasetConfig, plus tuner's explicit format/columns and its bad- and long-row policies."""

    dataset_path: str | None = None
    dataset_extension: str | None = None
    shuffle_dataset: bool = True
    shuffle_seed: int = 42
    context_column: str | None = None
    response_column: str | None = None
    messages_column: str | None = None
    train_test_split: float = 1.0  # the fraction that trains: 1 = every row trains, none is held out
    format: DatasetFormat | None = None
    columns: dict[str, str] | None = None
    bad_rows: BadRows = "drop"
    long_rows: LongRows = "truncate"

    def mapping(self) -> ColumnMapping | None:
        """The explicit format and columns (UserError for a contradictory choice); None: detect."""
        return ColumnMapping.from_dataset_config(self.values())


class CollatorSection(Section):
    """Kaito's DataCollator."""

    mlm: bool | None = None
    mlm_probability: float | None = None
    pad_to_multiple_of: int | None = None
    return_tensors: str | None = None


class TokenizerSection(Section):
    """Older Kaito templates' TokenizerParams; its max_length becomes TrainingArguments.max_length."""

    padding: bool | str | None = None
    truncation: bool | str | None = None
    max_length: int | None = None


SECTIONS: dict[str, type[Section]] = {
    "ModelConfig": ModelSection, "QuantizationConfig": QuantizationSection, "LoraConfig": LoraSection,
    "TrainingArguments": TrainingSection, "DatasetConfig": DatasetSection, "DataCollator": CollatorSection,
}
# Sections whose every key is a field (Kaito's dataclasses): their keys and types are these fields'.
KAITO_SECTIONS: dict[str, type[Section]] = {
    "ModelConfig": ModelSection, "QuantizationConfig": QuantizationSection, "DatasetConfig": DatasetSection,
    "DataCollator": CollatorSection, "TokenizerParams": TokenizerSection,
}


def kaito_keys(section: str) -> set[str]:
    return set(KAITO_SECTIONS[section].model_fields)


@cache
def kaito_types(section: str) -> dict[str, Any]:
    return {name: info.annotation for name, info in KAITO_SECTIONS[section].model_fields.items()}
