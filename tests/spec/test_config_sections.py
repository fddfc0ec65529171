"""tuner.spec.config_sections: the typed sections read their keys as the consuming libraries do."""

from __future__ import annotations

import pytest
from transformers import TrainingArguments

from tuner.spec.config_sections import DatasetSection, LoraSection, TrainingSection
from tuner.spec.training_config import build_config


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")  # the old name, on purpose
@pytest.mark.parametrize("given", [{}, {"gradient_checkpointing": True}, {"activation_checkpointing": True},
                                   {"gradient_checkpointing": True, "activation_checkpointing": False},
                                   {"gradient_checkpointing": False, "activation_checkpointing": True}])
def test_checkpointing_is_resolved_as_training_arguments_resolve_it(given, tmp_path):
    """Memory estimate, k-bit preparation and the Trainer all read one answer: the library's."""
    library = TrainingArguments(output_dir=str(tmp_path), **given)
    assert build_config("qlora", {"TrainingArguments": given}).training_arguments.checkpointing is \
        library.activation_checkpointing


def test_unset_keys_never_reach_the_library():
    assert "max_length" not in TrainingSection().values() and "target_modules" not in LoraSection().values()
    assert TrainingSection(bf16=None, fp16=True).values()["fp16"] is True
    assert "bf16" not in TrainingSection(bf16=None, fp16=True).values()


def test_a_library_key_tuner_does_not_type_rides_along_unchanged():
    training = build_config("lora", {"TrainingArguments": {"warmup_steps": 7, "lr_scheduler_type": "cosine"}})
    assert training.training_arguments.values()["warmup_steps"] == 7
    assert training.training_arguments.values()["lr_scheduler_type"] == "cosine"


def test_the_dataset_mapping_reads_kaitos_column_keys():
    mapping = DatasetSection(context_column="question", response_column="answer").mapping()
    assert (mapping.format, mapping.columns) == ("prompt-completion", {"prompt": "question", "completion": "answer"})
    assert DatasetSection().mapping() is None
