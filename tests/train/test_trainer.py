"""Training: LoRA and QLoRA really learn on CPU, save loadable adapters, and pick a sane precision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tuner.data import prepare
from tuner.spec.config_sections import DatasetSection
from tuner.spec.presets import get_preset
from tuner.spec.training_config import build_config
from tuner.train import base_model, trainer
from tuner.train.precision import choose_precision
from tuner.workdir import WorkDir

ROWS = [
    {"messages": [{"role": "user", "content": f"Code word {i}?"},
                  {"role": "assistant", "content": f"The code word {i} is amber falcon."}]}
    for i in range(4)
]
FAST = {"TrainingArguments": {"max_steps": 24, "learning_rate": 0.005, "logging_steps": 4,
                              "per_device_train_batch_size": 2, "max_length": 128},
        "LoraConfig": {"r": 8, "lora_alpha": 16}}


def prepared(tokenizer, tmp_path: Path) -> prepare.PreparedData:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return prepare.prepare([path], tokenizer, max_length=128, out_dir=tmp_path / "prepared")


def run_training(model_dir: Path, method: str, tmp_path: Path) -> tuple[trainer.TrainResult, Path]:
    config = build_config(method, FAST)
    tokenizer = base_model.load_tokenizer(model_dir, config.model)
    work = WorkDir(tmp_path / "work")
    result = trainer.train(model_dir, tokenizer, prepared(tokenizer, tmp_path), config,
                           get_preset("smollm2-135m-instruct"), work, max_length=128)
    return result, work.adapter


def losses(result: trainer.TrainResult) -> list[float]:
    return [entry["loss"] for entry in result.log_history if "loss" in entry]


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_loss_falls_on_a_tiny_overfit_set(tiny_model_dir, tmp_path, method):
    result, _ = run_training(tiny_model_dir, method, tmp_path)
    curve = losses(result)
    assert result.steps == 24 and len(curve) >= 5
    assert curve[-1] < 0.5 * curve[0], curve


def test_adapter_is_saved_and_loads_with_peft(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result, adapter = run_training(tiny_model_dir, "lora", tmp_path)
    assert (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "tokenizer_config.json").is_file()
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["lora_alpha"] == 16
    assert set(saved["target_modules"]) == set(get_preset("smollm2-135m-instruct").lora_target_modules)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)
    lora_a = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_a and any(p.abs().sum() > 0 for p in lora_a)  # B starts at zero: non-zero means trained
    assert result.tokens_seen > 0 and result.trainable_parameters > 0


def test_bf16_request_runs_as_float32_on_cpu_and_says_why():
    precision = choose_precision("bfloat16")
    assert precision.dtype == torch.float32 and precision.device == "cpu"
    assert "no fast bfloat16" in precision.reason


def test_qlora_loads_4bit_nf4_with_float32_compute_on_cpu(tiny_model_dir):
    import bitsandbytes as bnb

    config = build_config("qlora")
    model = trainer.load_base_model(tiny_model_dir, config, choose_precision("bfloat16"))
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    assert layer.weight.quant_state.quant_type == "nf4"
    assert layer.compute_dtype == torch.float32


def test_progress_line_per_logging_step(tiny_model_dir, tmp_path, capsys):
    run_training(tiny_model_dir, "lora", tmp_path)
    lines = [line for line in capsys.readouterr().out.splitlines() if " | loss " in line]
    assert len(lines) >= 6  # the first step, then every 4 of 24
    assert "step 24/24 (100%)" in lines[-1]
    assert all(" tok/s " in line and " | lr " in line for line in lines)


@pytest.mark.parametrize("packing", [True, False])
def test_eval_split_is_evaluated_packed_or_not(tiny_model_dir, tmp_path, packing):
    config = build_config("lora", {"TrainingArguments": {**FAST["TrainingArguments"], "max_steps": 4,
                                                         "packing": packing}})
    tokenizer = base_model.load_tokenizer(tiny_model_dir, config.model)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    data_split = prepare.prepare([path], tokenizer, max_length=128, out_dir=tmp_path / "prepared",
                                 dataset=DatasetSection(train_test_split=0.5))
    assert (len(data_split.train), len(data_split.eval)) == (2, 2)
    result = trainer.train(tiny_model_dir, tokenizer, data_split, config, get_preset("smollm2-135m-instruct"),
                           WorkDir(tmp_path / "work"), max_length=128)
    assert result.eval_loss is not None and 0 < result.eval_loss < 20
