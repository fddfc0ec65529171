"""tuner.spec.hub_models: any Hugging Face model id as a preset, its facts from its config.json."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tuner.errors import UserError
from tuner.spec.config_sections import ModelSection
from tuner.spec.hub_models import is_hub_id, resolve_preset


def test_kaitos_org_model_ids_are_hub_ids_and_preset_names_are_not():
    assert is_hub_id("microsoft/phi-4") and is_hub_id("Qwen/Qwen2.5-Coder-7B-Instruct")
    assert not is_hub_id("phi-4") and not is_hub_id("a/b/c") and not is_hub_id("org/../x")


def test_a_local_folder_gives_the_facts_and_a_count_equal_to_the_real_model(tiny_model_dir):
    preset = resolve_preset("tuner-tests/tiny", ModelSection(pretrained_model_name_or_path=str(tiny_model_dir)))
    config = AutoConfig.from_pretrained(tiny_model_dir)
    with torch.device("meta"):
        real = AutoModelForCausalLM.from_config(config)
    arch = preset.architecture
    assert (arch.model_type, arch.num_hidden_layers, arch.hidden_size, arch.num_key_value_heads) == (
        "llama", 2, config.hidden_size, config.num_key_value_heads)
    assert arch.parameters == sum(p.numel() for p in real.parameters())
    assert preset.lora_targets == "all-linear" and preset.context_length == config.max_position_embeddings


def test_the_hugging_face_cache_gives_the_facts_and_the_commit_offline(tiny_model_dir, tmp_path, monkeypatch):
    """Once the weights are there, config.json is read from the cache: no network, the revision pinned."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tuner-tests--cached"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    shutil.copy(tiny_model_dir / "config.json", repo / "snapshots" / commit / "config.json")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    preset = resolve_preset("tuner-tests/cached", ModelSection(cache_dir=str(tmp_path / "hub")))
    assert preset.source.revision == commit and preset.architecture.num_hidden_layers == 2


def test_an_unreachable_model_is_one_line_naming_the_field(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as exc:
        resolve_preset("tuner-tests/nowhere", ModelSection(cache_dir=str(tmp_path)))
    assert str(exc.value).startswith("tuning.preset.name: cannot read the config.json of Hugging Face model "
                                     "'tuner-tests/nowhere'") and "\n" not in str(exc.value)


def test_a_config_without_decoder_facts_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert-ish", "hidden_size": 8}))
    with pytest.raises(UserError, match="lacks the decoder fact 'num_attention_heads'"):
        resolve_preset("tuner-tests/encoder", ModelSection(pretrained_model_name_or_path=str(tmp_path)))


def test_an_unknown_name_lists_the_catalog_and_the_hub_form():
    with pytest.raises(UserError, match=r"unknown preset 'llama-9'.*phi-4.*or a Hugging Face model id, ORG/MODEL"):
        resolve_preset("llama-9", ModelSection())
