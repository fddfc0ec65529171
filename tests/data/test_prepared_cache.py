"""Reusing WORK/prepared: the same inputs, tokenizer and DatasetConfig reuse it; any change, or a
preparation cut short, prepares again."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from conftest import SHARED
from tuner.data import prepared_cache
from tuner.data.prepare import STORE_FILE, prepare
from tuner.spec.config_sections import DatasetSection

PHI3 = SHARED / "tokenizers" / "phi-3-mini-4k-instruct"
ROWS = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]}
        for i in range(10)]
FILES = [("000-rows.jsonl", "a" * 64)]
DATASET = {"shuffle_dataset": True, "train_test_split": 0.8}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(PHI3)


@pytest.fixture()
def prepared_dir(tmp_path, tokenizer) -> Path:
    """A folder prepared from ten rows and saved under the key of (FILES, tokenizer, DATASET, 64)."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "prepared"
    data = prepare([rows], tokenizer, max_length=64, out_dir=out, dataset=DatasetSection(train_test_split=0.8))
    prepared_cache.save(out, prepared_cache.cache_key(FILES, tokenizer, DATASET, 64), data)
    return out


def key(tokenizer, files=FILES, dataset=DATASET, max_length=64) -> str:
    return prepared_cache.cache_key(files, tokenizer, dataset, max_length)


def test_the_same_inputs_reload_the_same_examples_split_and_report(prepared_dir, tokenizer):
    reused = prepared_cache.load(prepared_dir, key(tokenizer))
    assert reused is not None
    assert (len(reused.train), len(reused.eval)) == (8, 2)
    assert reused.stats.rows_kept == 10 and reused.stats.train_rows == 8
    assert reused.stats.files[0].format == "messages"
    ids, labels = reused.train[0]
    assert len(ids) == len(labels) and any(label != -100 for label in labels)
    rows = sorted(reused.train.indices.tolist() + reused.eval.indices.tolist())
    assert rows == list(range(10))


@pytest.mark.parametrize("change", ["file sha256", "file name", "dataset config", "max_length"])
def test_a_changed_input_or_setting_is_not_reused(prepared_dir, tokenizer, change):
    changed = {
        "file sha256": lambda: key(tokenizer, files=[("000-rows.jsonl", "b" * 64)]),
        "file name": lambda: key(tokenizer, files=[("000-rows.parquet", "a" * 64)]),
        "dataset config": lambda: key(tokenizer, dataset=DATASET | {"shuffle_seed": 7}),
        "max_length": lambda: key(tokenizer, max_length=128),
    }[change]()
    assert prepared_cache.load(prepared_dir, changed) is None


def test_a_changed_chat_template_changes_the_key(tokenizer):
    other = copy.deepcopy(tokenizer)
    other.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert key(other) != key(tokenizer)
    assert key(copy.deepcopy(tokenizer)) == key(tokenizer)


def test_a_changed_vocabulary_changes_the_key(tokenizer):
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<|tuner-new-token|>"])
    assert key(other) != key(tokenizer)


def test_a_preparation_cut_short_is_not_reused(prepared_dir, tokenizer):
    prepared_cache.forget(prepared_dir)  # what a new preparation does first
    assert prepared_cache.load(prepared_dir, key(tokenizer)) is None


def test_a_store_changed_after_its_record_is_not_reused(prepared_dir, tokenizer):
    store = prepared_dir / STORE_FILE
    store.write_bytes(store.read_bytes()[:-100])
    assert prepared_cache.load(prepared_dir, key(tokenizer)) is None


def test_the_split_is_kept_exactly(prepared_dir, tokenizer):
    with np.load(prepared_dir / prepared_cache.SPLIT_FILE) as split:
        train = split["train"].tolist()
    assert prepared_cache.load(prepared_dir).train.indices.tolist() == train
