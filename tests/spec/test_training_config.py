"""Kaito's training ConfigMap: defaults per method, overlay, and checks that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tuner.errors import UserError
from tuner.spec.training_config import build_config, load_config_file


def test_lora_defaults_are_kaitos_template():
    config = build_config("lora")
    assert config.model.torch_dtype == "bfloat16"
    assert (config.lora.r, config.lora.lora_alpha, config.lora.lora_dropout) == (8, 8, 0.0)
    assert config.training_arguments.per_device_train_batch_size == 1
    assert config.training_arguments.save_strategy == "no"
    assert (config.dataset.shuffle_dataset, config.dataset.train_test_split) == (True, 1)
    assert not config.quantized


def test_the_effective_config_names_every_default_once():
    """What the ConfigMap carries and the digest covers: the defaults are written out, unset keys are not."""
    sections = build_config("lora").as_sections()
    assert sections["LoraConfig"] == {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "use_dora": False,
                                      "task_type": "CAUSAL_LM"}
    assert sections["DatasetConfig"] == {"shuffle_dataset": True, "shuffle_seed": 42, "train_test_split": 1,
                                         "bad_rows": "drop", "long_rows": "truncate"}
    assert sections["TrainingArguments"]["per_device_train_batch_size"] == 1
    assert "max_length" not in sections["TrainingArguments"] and sections["DataCollator"] == {}


@pytest.mark.parametrize("section,library", [("LoraConfig", "peft:LoraConfig"),
                                             ("TrainingArguments", "transformers:TrainingArguments")])
def test_defaults_tuner_does_not_choose_are_the_pinned_librarys_own(section, library):
    """A typed key's default is Kaito's, tuner's (named here with the reason) or the library's: a new
    library release that changes its default shows up here, not as a silent difference in training."""
    import dataclasses
    import importlib

    from tuner.spec.config_sections import SECTIONS

    module, name = library.split(":")
    fields = {f.name: f for f in dataclasses.fields(getattr(importlib.import_module(module), name))}
    chosen = {  # Kaito's lora-params template, then tuner's own
        "LoraConfig": {"r", "lora_alpha", "lora_dropout", "task_type"},
        "TrainingArguments": {"output_dir", "ddp_find_unused_parameters", "save_strategy", "per_device_train_batch_size",
                              "save_total_limit", "logging_steps", "logging_first_step"},
    }[section]
    for key, info in SECTIONS[section].model_fields.items():
        if key in chosen or key not in fields or info.default is None:
            continue  # max_length and packing are TRL's; None is never passed, so the library's default holds
        field = fields[key]
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        assert info.default == default, f"{section}.{key}: tuner {info.default!r}, library {default!r}"


def test_qlora_defaults_add_nf4_double_quant_bf16_compute():
    config = build_config("qlora")
    assert config.quantization.values() == {
        "load_in_4bit": True, "load_in_8bit": False, "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_use_double_quant": True,
    }
    assert config.quantized


def test_user_section_overlays_defaults_key_by_key():
    config = build_config("lora", {"LoraConfig": {"r": 32}, "TrainingArguments": {"num_train_epochs": 2}})
    assert config.lora.r == 32 and config.lora.lora_alpha == 8
    assert config.training_arguments.values()["num_train_epochs"] == 2
    assert config.training_arguments.per_device_train_batch_size == 1


def test_qlora_with_8bit_does_not_inherit_4bit():
    config = build_config("qlora", {"QuantizationConfig": {"load_in_8bit": True}})
    assert config.quantization.values() == {"load_in_8bit": True, "load_in_4bit": False}


def test_qlora_without_quantisation_is_refused():
    with pytest.raises(UserError, match="QuantizationConfig: method qlora needs load_in_4bit or load_in_8bit"):
        build_config("qlora", {"QuantizationConfig": {"load_in_4bit": False}})


def test_lora_with_quantisation_is_refused():
    with pytest.raises(UserError, match="QuantizationConfig: method lora trains unquantised"):
        build_config("lora", {"QuantizationConfig": {"load_in_4bit": True}})


def test_4bit_and_8bit_together_are_refused():
    with pytest.raises(UserError, match="both true"):
        build_config("qlora", {"QuantizationConfig": {"load_in_4bit": True, "load_in_8bit": True}})


def test_unknown_section_is_named():
    with pytest.raises(UserError, match=r"training_config\.Trainingargs: unknown section"):
        build_config("lora", {"Trainingargs": {}})


@pytest.mark.parametrize("section,key", [
    ("LoraConfig", "rank"),
    ("TrainingArguments", "num_epochs"),
    ("QuantizationConfig", "load_in_3bit"),
    ("ModelConfig", "dtype_name"),
    ("DatasetConfig", "split"),
    ("DataCollator", "mask"),
])
def test_unknown_key_is_named_with_its_section(section, key):
    with pytest.raises(UserError, match=rf"training_config\.{section}\.{key}: unknown key"):
        build_config("lora", {section: {key: 1}})


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(UserError, match="did you mean 'learning_rate'"):
        build_config("lora", {"TrainingArguments": {"learning_rat": 1e-4}})


def test_sft_keys_are_accepted_and_max_seq_length_is_an_alias():
    config = build_config("lora", {"TrainingArguments": {"max_seq_length": 512}})
    assert config.training_arguments.max_length == 512


def test_train_test_split_out_of_range_is_refused():
    with pytest.raises(UserError, match=r"DatasetConfig\.train_test_split"):
        build_config("lora", {"DatasetConfig": {"train_test_split": 1.5}})


def test_digest_changes_with_the_config():
    assert build_config("lora").digest() == build_config("lora").digest()
    assert build_config("lora").digest() != build_config("lora", {"LoraConfig": {"r": 4}}).digest()


def test_configmap_manifest_and_bare_file_read_the_same(tmp_path: Path):
    body = {"training_config": {"LoraConfig": {"r": 4}}}
    bare = tmp_path / "training_config.yaml"
    bare.write_text(yaml.safe_dump(body))
    manifest = tmp_path / "cm.yaml"
    manifest.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"},
        "data": {"training_config.yaml": yaml.safe_dump(body)},
    }))
    assert load_config_file(bare) == load_config_file(manifest) == {"LoraConfig": {"r": 4}}


def test_configmap_without_the_key_is_refused(tmp_path: Path):
    manifest = tmp_path / "cm.yaml"
    manifest.write_text(yaml.safe_dump({"kind": "ConfigMap", "data": {"other.yaml": "x: 1"}}))
    with pytest.raises(UserError, match="no data key 'training_config.yaml'"):
        load_config_file(manifest)


def test_kaito_keys_tuner_does_not_apply_are_accepted_with_one_warning_each():
    config = build_config("lora", {"ModelConfig": {"device_map": "auto", "local_files_only": True},
                                   "DataCollator": {"mlm": True}, "TokenizerParams": {"padding": True}})
    assert config.warnings == (
        "training_config.ModelConfig.device_map is accepted but not applied: each process places the model on its "
        "own device (one GPU per process; DDP/torchrun)",
        "training_config.DataCollator.mlm is accepted but not applied: a causal LM learns the next token; "
        "masked-LM collation does not apply",
        "training_config.TokenizerParams.padding is accepted but not applied: batches are padded to their longest "
        "row (or packed)")
    assert build_config("lora").warnings == ()  # tuner's own defaults carry none of them


def test_a_number_spelled_as_yaml_reads_it_is_taken_as_that_number():
    # PyYAML reads 2e-4 (no dot) as a string, as Kaito users often write it
    config = build_config("lora", load_config_text("TrainingArguments:\n  learning_rate: 2e-4\n  warmup_steps: 1e2\n"))
    assert config.training_arguments.values()["learning_rate"] == 0.0002
    assert config.training_arguments.values()["warmup_steps"] == 100


def load_config_text(sections: str) -> dict:
    return yaml.safe_load("training_config:\n" + "".join(f"  {line}\n" for line in sections.splitlines()))[
        "training_config"]


def test_every_bad_value_is_named_at_once():
    from tuner.errors import UserErrors

    with pytest.raises(UserErrors) as caught:
        build_config("lora", {"LoraConfig": {"r": 0}, "TrainingArguments": {"learning_rate": -1},
                              "DatasetConfig": {"bad_rows": "nonsense", "long_rows": 3, "format": "parquet"}})
    assert [e.where for e in caught.value.errors] == [
        "training_config.LoraConfig.r", "training_config.TrainingArguments.learning_rate",
        "training_config.DatasetConfig.bad_rows", "training_config.DatasetConfig.long_rows",
        "training_config.DatasetConfig.format"]


def test_fsdp_refuses_8bit_weights_and_a_storage_dtype_it_cannot_shard():
    with pytest.raises(UserError, match=r"QuantizationConfig: 8-bit weights cannot be sharded with FSDP"):
        build_config("qlora", {"QuantizationConfig": {"load_in_8bit": True}, "TrainingArguments": {"fsdp": "full_shard"}})
    with pytest.raises(UserError, match=r"bnb_4bit_quant_storage: bnb_4bit_quant_storage uint8 cannot be sharded"):
        build_config("qlora", {"QuantizationConfig": {"bnb_4bit_quant_storage": "uint8"},
                               "TrainingArguments": {"fsdp": "full_shard"}})
    assert build_config("qlora", {"TrainingArguments": {"fsdp": "full_shard"}}).training_arguments.sharded


def test_qlora_under_fsdp_stores_the_4bit_weights_in_the_compute_dtype():
    import torch

    from tuner.train.trainer import quantization_config

    sharded = quantization_config(build_config("qlora", {"TrainingArguments": {"fsdp": "full_shard"},
                                                         "QuantizationConfig": {"bnb_4bit_compute_dtype": "float32"}}))
    assert sharded.bnb_4bit_quant_storage == torch.float32
    assert quantization_config(build_config("qlora")).bnb_4bit_quant_storage == torch.uint8  # bitsandbytes' own
