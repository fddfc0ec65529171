"""tuner.kube.sku_precision: on GPUs without bf16 the rendered config trains in float16."""

from __future__ import annotations

from tuner.kube.gpus import lookup
from tuner.kube.sku_precision import for_sku
from tuner.spec.training_config import build_config


def test_v100_turns_kaitos_bf16_defaults_into_fp16():
    config, notes = for_sku(build_config("qlora"), lookup("Standard_NC6s_v3"))
    assert config.model.torch_dtype == "float16"
    assert config.quantization.bnb_4bit_compute_dtype == "float16"
    assert config.training_arguments.fp16 is True and "bf16" not in config.training_arguments.values()
    assert len(notes) == 3 and all("Standard_NC6s_v3 (V100) has no bf16" in note for note in notes)


def test_an_explicit_bf16_flag_becomes_fp16_on_a_t4():
    config, notes = for_sku(build_config("lora", {"TrainingArguments": {"bf16": True}}), lookup("g4dn.xlarge"))
    assert config.training_arguments.fp16 is True and "bf16" not in config.training_arguments.values()
    assert "TrainingArguments.bf16 true -> fp16 true" in notes[-1]


def test_a_bf16_gpu_keeps_the_config_unchanged():
    config = build_config("qlora")
    assert for_sku(config, lookup("Standard_NC24ads_A100_v4")) == (config, [])


def test_float32_training_on_a_v100_gets_no_fp16_flag():
    config, notes = for_sku(build_config("lora", {"ModelConfig": {"torch_dtype": "float32"}}), lookup("p3.2xlarge"))
    assert config.model.torch_dtype == "float32" and "fp16" not in config.training_arguments.values()
    assert notes == []


def test_for_sku_leaves_the_input_config_alone():
    config = build_config("qlora")
    for_sku(config, lookup("Standard_NC6s_v3"))
    assert config.model.torch_dtype == "bfloat16" and "fp16" not in config.training_arguments.values()
