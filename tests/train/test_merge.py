"""Merged export: the base model with a trained adapter merged loads with plain transformers and
answers as base + adapter under peft does; the folder appears whole or not at all."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tuner.errors import UserError
from tuner.train import merge as merging
from tuner.train.merge import MERGE_MARKER, find_base_model, merge

PROMPTS = ["Question 3?", "Answer 5.", "The capital of France is"]


def logits_of(model, tokenizer) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**tokenizer(prompt, return_tensors="pt")).logits[0].float() for prompt in PROMPTS]


def peft_logits(base_dir: Path, adapter_dir: Path, dtype=torch.float32) -> list[torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype), adapter_dir)
    return logits_of(model.eval(), AutoTokenizer.from_pretrained(adapter_dir))


def base_logits(base_dir: Path) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return logits_of(model.eval(), AutoTokenizer.from_pretrained(base_dir))


def largest_gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


# Loads the merged folder in a fresh interpreter in which `import peft` fails, and saves its logits.
PLAIN_LOAD = """
import sys, torch
sys.modules["peft"] = None  # any import of peft raises ImportError
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, prompts, out = sys.argv[1], sys.argv[2:-1], sys.argv[-1]
model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
with torch.no_grad():
    torch.save([model(**tokenizer(p, return_tensors="pt")).logits[0].float() for p in prompts], out)
print(type(model).__name__, model.dtype)
"""


def test_lora_merged_loads_without_peft_and_equals_base_plus_adapter(lora_work_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "merged"
    merged = merge(lora_work_dir, out)
    assert (merged.folder, merged.dtype, merged.base_model, merged.reused) == (out, "float32", tiny_model_dir, False)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            MERGE_MARKER} <= {p.name for p in out.iterdir()}
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as weights:
        assert not [key for key in weights.keys() if "lora" in key]
    ran = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(out), *PROMPTS, str(tmp_path / "logits.pt")],
                         capture_output=True, text=True, check=True)
    assert ran.stdout.split()[-2:] == ["LlamaForCausalLM", "torch.float32"]
    plain = torch.load(tmp_path / "logits.pt")
    assert largest_gap(plain, peft_logits(tiny_model_dir, lora_work_dir / "adapter")) < 1e-3
    assert largest_gap(plain, base_logits(tiny_model_dir)) > 1.0  # the adapter changed the answers


def test_qlora_merges_into_the_unquantised_base_and_says_so(qlora_work_dir, tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    merge(qlora_work_dir, out)
    assert "merged into the float32 base weights, not the 4-bit ones" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    merged = logits_of(model, AutoTokenizer.from_pretrained(out))
    assert largest_gap(merged, peft_logits(tiny_model_dir, qlora_work_dir / "adapter")) < 1e-3
    assert largest_gap(merged, base_logits(tiny_model_dir)) > 1.0


def test_bf16_merge_holds_the_float32_merge_rounded_to_bfloat16(lora_work_dir, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    merge(lora_work_dir, tmp_path / "fp32", dtype="fp32")
    merge(lora_work_dir, tmp_path / "bf16", dtype="bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    full, half = load_file(tmp_path / "fp32" / "model.safetensors"), load_file(tmp_path / "bf16" / "model.safetensors")
    assert full.keys() == half.keys() and {t.dtype for t in half.values()} == {torch.bfloat16}
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    changed = 0
    for name, weight in full.items():
        delta = weight - base[name]
        changed += bool(delta.abs().max() > 0)
        # bf16 rounds the delta and the sum once each, by at most 2**-8 of each (its unit roundoff)
        bound = 2 ** -8 * (delta.abs() + weight.abs()) * 1.001
        assert ((half[name].float() - weight).abs() <= bound).all(), name
    assert changed == 2 * 7  # the preset's 7 LoRA targets in each of the 2 layers


def test_a_finished_merge_is_reused_and_another_one_refused(lora_work_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    merge(lora_work_dir, out)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    again = merge(lora_work_dir, out)
    assert again.reused and (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert f"merge: skipped: {out} already holds this adapter merged in float32" in capsys.readouterr().out
    with pytest.raises(UserError, match="is not empty .*name a new or empty folder"):
        merge(lora_work_dir, out, dtype="bf16")
    replaced = merge(lora_work_dir, out, dtype="bf16", replace=True)  # the job's own WORK/merged
    assert not replaced.reused and json.loads((out / MERGE_MARKER).read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), SystemExit(143)])
def test_a_failed_merge_leaves_no_folder_at_out(lora_work_dir, tmp_path, monkeypatch, failure):
    def half_written(base, adapter_dir, out, dtype, trust_remote_code):
        (out / "model-00001-of-00002.safetensors").write_bytes(b"partial")
        raise failure

    monkeypatch.setattr(merging, "_merge_into", half_written)
    with pytest.raises(type(failure)):
        merge(lora_work_dir, tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []  # neither OUT nor the scratch folder beside it


def test_out_in_the_adapter_folder_is_refused(lora_work_dir):
    with pytest.raises(UserError, match="inside the adapter folder"):
        merge(lora_work_dir, lora_work_dir / "adapter" / "merged")


def test_the_base_model_is_found_from_the_summary_when_the_recorded_folder_is_gone(lora_work_dir, tiny_model_dir,
                                                                                   tmp_path):
    adapter = shutil.copytree(lora_work_dir / "adapter", tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "/gone/model"}))
    from tuner.observe.summary import JobSummary

    summary = JobSummary.read(adapter / "training_summary.json")
    assert find_base_model(adapter, summary) == tiny_model_dir  # ModelConfig.pretrained_model_name_or_path
    with pytest.raises(UserError, match="/gone/model.* is neither a model folder here nor a model id.*--base-model"):
        find_base_model(adapter, None)


def test_an_adapter_without_tuners_summary_finds_a_presets_model_by_its_hub_id(lora_work_dir, smollm2_dir, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = json.loads((lora_work_dir / "adapter" / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(
        config | {"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    assert find_base_model(adapter, None) == smollm2_dir  # the preset's weights, from the GGUF it ships


def test_an_adapter_that_does_not_fit_the_base_model_is_a_user_error(lora_work_dir, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    other = tmp_path / "other"
    AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2,
                                                 vocab_size=49152)).save_pretrained(other)
    with pytest.raises(UserError, match=f"cannot merge the adapter into the base model {other} .*size mismatch.*--base-model"):
        merge(lora_work_dir, tmp_path / "merged", base_model=other)
    assert not (tmp_path / "merged").exists()
