"""`tuner check-data FILES`: the pre-flight check of dataset files, with the tokenizer and the
DatasetConfig a run would use, prepared into a scratch folder that never outlives the command."""

from __future__ import annotations

from pathlib import Path

from tuner.data.prepare import DataStats, prepare
from tuner.spec.config_values import check_value
from tuner.spec.hub_models import resolve_preset
from tuner.spec.plan import effective_max_length
from tuner.spec.training_config import build_config, load_config_file
from tuner.workdir import scratch_dir


def check_data(files: list[Path], *, preset_name: str, tokenizer_dir: Path | None = None,
               config_path: Path | None = None, max_length: int | None = None) -> DataStats:
    """Prepare the files as `tuner run` would and return what preparation did to them."""
    from tuner.train import base_model

    if max_length is not None:  # the same rule as TrainingArguments.max_length
        check_value("TrainingArguments", "max_length", max_length, "--max-length")
    config = build_config("lora", load_config_file(config_path) if config_path else None)
    preset = resolve_preset(preset_name, config.model)
    tokenizer = base_model.load_tokenizer(tokenizer_dir or base_model.resolve_base_model(preset), config.model)
    length = max_length or effective_max_length(config, preset)
    with scratch_dir("tuner-check-") as scratch:
        return prepare(files, tokenizer, max_length=length, out_dir=scratch, dataset=config.dataset).stats
