"""Presets: each one's architecture facts and LoRA targets match the real network."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tuner.errors import UserError
from tuner.spec.presets import all_presets, get_preset

PRESETS = sorted(all_presets())


def meta_model(name: str):
    """The preset's architecture built on the meta device: real shapes, no memory."""
    arch = get_preset(name).architecture.model_dump(exclude={"parameters", "rope_type"})
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


# Kaito's tunable presets (kaito-project/kaito presets/workspace/models/transformer_runtime_tuning_parameters.go,
# at 056b8280) and tuner's offline default.
KAITO_TUNABLE = {"phi-3-mini-4k-instruct", "phi-3-mini-128k-instruct", "phi-3-medium-4k-instruct",
                 "phi-3-medium-128k-instruct", "phi-3.5-mini-instruct", "phi-4", "phi-4-mini-instruct",
                 "mistral-7b-v0.3", "qwen2.5-coder-7b-instruct", "qwen2.5-coder-32b-instruct"}


def test_the_catalog_is_kaitos_tunable_presets_and_the_default():
    assert set(PRESETS) == KAITO_TUNABLE | {"smollm2-135m-instruct"}


@pytest.mark.parametrize("name", PRESETS)
def test_the_counted_parameters_match_the_declared_count_within_one_percent(name):
    architecture = get_preset(name).architecture
    assert architecture.counted_parameters() == pytest.approx(architecture.parameters, rel=0.01)


@pytest.mark.parametrize("name", PRESETS)
def test_parameter_count_matches_the_architecture(name):
    model = meta_model(name)
    assert sum(p.numel() for p in model.parameters()) == get_preset(name).architecture.parameters


@pytest.mark.parametrize("name", PRESETS)
def test_lora_targets_exist_in_the_architecture(name):
    leaf_names = {module_name.rsplit(".", 1)[-1] for module_name, _ in meta_model(name).named_modules()}
    assert set(get_preset(name).lora_target_modules) <= leaf_names


@pytest.mark.parametrize("name", sorted(KAITO_TUNABLE))
def test_hub_presets_pin_a_full_commit(name):
    revision = get_preset(name).source.revision
    assert len(revision) == 40 and int(revision, 16) >= 0


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(UserError, match="tuning.preset.name: unknown preset 'llama-9'.*phi-3-mini-4k-instruct"):
        get_preset("llama-9")
