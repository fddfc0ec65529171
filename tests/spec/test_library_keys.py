"""tuner/library_keys.json is what the pinned libraries accept: regenerated here and compared, so a
version bump that adds, drops or retypes a key fails this test until the file is regenerated."""

from __future__ import annotations

import json
from typing import Literal

from tuner.spec import library_keys


def test_the_keys_file_matches_the_installed_libraries():
    recorded = json.loads(library_keys.KEYS_FILE.read_text())
    assert recorded == library_keys.generate(), (
        "regenerate it: python -m tuner.library_keys > tuner/library_keys.json")


def test_recorded_types_become_annotations_pydantic_checks():
    lora = library_keys.annotations("LoraConfig")
    assert lora["r"] is int and lora["use_rslora"] is bool
    assert lora["bias"] == Literal["none", "all", "lora_only"]
    training = library_keys.annotations("TrainingArguments")
    assert training["learning_rate"] is float
    assert training["report_to"] == (str | list[str] | None)
    assert {"max_length", "packing"} <= library_keys.keys("SFTConfig")
    assert "bnb_4bit_quant_type" in library_keys.keys("BitsAndBytesConfig")
