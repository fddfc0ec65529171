"""Data preparation: exact ids and loss masks per format, row and length policies, every file, split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from conftest import SHARED, SHARED_DATASETS
from tuner.data import formats
from tuner.data.chat_render import ChatRenderer
from tuner.data.encode import Encoder
from tuner.data.prepare import prepare
from tuner.errors import UserError
from tuner.spec.config_sections import DatasetSection

DATA = SHARED / "data"

# One small row per format, and what the real Phi-3 tokenizer must turn it into: the exact ids and
# the loss mask (1 = the token carries loss). Phi-3's <|end|> swallows the newline after it.
EXACT = {
    "messages": ({"messages": [{"role": "system", "content": "Be short."}, {"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": "Hello!"}]},
                 [32006, 3629, 3273, 29889, 32007, 32010, 18567, 32007, 32001, 10994, 29991, 32007, 32000],
                 [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]),
    "prompt-completion": ({"prompt": "2+2?", "completion": "4"},
                          [32010, 29906, 29974, 29906, 29973, 32007, 32001, 29946, 32007, 32000],
                          [0, 0, 0, 0, 0, 0, 0, 1, 1, 1]),
    "dolly": ({"instruction": "Name it.", "context": "A cat.", "response": "Cat", "category": "qa"},
              [32010, 1170, 372, 29889, 13, 13, 29909, 6635, 29889, 32007, 32001, 9694, 32007, 32000],
              [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1]),
    "alpaca": ({"instruction": "Add", "input": "1 1", "output": "2"},
               [32010, 2528, 13, 13, 29896, 29871, 29896, 32007, 32001, 29906, 32007, 32000],
               [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1]),
    "sharegpt": ({"conversations": [{"from": "human", "value": "Yo"}, {"from": "gpt", "value": "Hey"}]},
                 [32010, 29979, 29877, 32007, 32001, 29950, 1032, 32007, 32000],
                 [0, 0, 0, 0, 0, 1, 1, 1, 1]),
    "text": ({"text": "Plain words."}, [349, 7420, 3838, 29889, 32000], [1, 1, 1, 1, 1]),
}
MULTI_TURN = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "hi there"},
    {"role": "assistant", "content": "hello\nfriend."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "four"},
]


@pytest.fixture(scope="module")
def phi3():
    return AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "phi-3-mini-4k-instruct")


@pytest.fixture(scope="module")
def smol(smollm2_dir: Path):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def encode_one(tokenizer, sample, max_length: int = 256):
    chunk = Encoder(tokenizer, max_length, "truncate").encode([(1, sample)])
    return chunk.ids.tolist(), chunk.mask.tolist()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("name", list(EXACT))
def test_each_format_gives_exact_ids_and_loss_mask(phi3, name):
    row, ids, mask = EXACT[name]
    fmt = formats.detect_format(list(row))
    assert fmt.name == name
    assert encode_one(phi3, formats.to_sample(row, fmt)) == (ids, mask)


def test_multi_turn_smollm2_labels_exactly_the_assistant_turns(smol):
    ids, mask = encode_one(smol, MULTI_TURN)
    labelled = np.array(ids)[np.array(mask) == 1]
    assert smol.decode(labelled) == "hello\nfriend.<|im_end|>\nfour<|im_end|>\n"
    for token, carries in zip(ids, mask, strict=True):  # no header, system or user token carries loss
        if smol.convert_ids_to_tokens(token) == "<|im_start|>":
            assert carries == 0


def test_multi_turn_phi3_labels_exactly_the_assistant_turns(phi3):
    ids, mask = encode_one(phi3, MULTI_TURN)
    assert phi3.decode(np.array(ids)[np.array(mask) == 1]) == "hello\nfriend.<|end|>four<|end|><|endoftext|>"
    headers = {phi3.convert_tokens_to_ids(t) for t in ("<|system|>", "<|user|>", "<|assistant|>")}
    assert all(carries == 0 for token, carries in zip(ids, mask, strict=True) if token in headers)


@pytest.mark.parametrize("tokenizer_name", ["phi3", "smol"])
def test_fast_skeleton_rendering_equals_the_template_on_real_data(request, tokenizer_name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    rows = pq.read_table(DATA / "dolly" / "chitchat-dolly.parquet").to_pylist()[:200]
    fmt = formats.detect_format(list(rows[0]))
    samples = [formats.to_sample(row, fmt) for row in rows]
    renderer = ChatRenderer(tokenizer)
    assert [renderer.render(s) for s in samples] == [renderer.render_slow(s) for s in samples]
    assert renderer._skeletons  # the fast path was really taken


def test_a_turn_the_template_leaves_out_drops_the_row_with_the_role(phi3, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "weather?"}, {"role": "tool", "content": "sunny, 21C"},
                          {"role": "assistant", "content": "Sunny."}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    stats = prepare([write_jsonl(tmp_path / "t.jsonl", rows)], phi3, max_length=64, out_dir=tmp_path / "out").stats
    assert stats.rows_kept == 1
    assert stats.dropped["the chat template leaves out tool turns"].rows == ["t.jsonl row 1"]


def test_bad_rows_are_counted_with_their_row_numbers(smol, tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
        {"messages": [{"role": "wizard", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "a"}]},
    ]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with path.open("ab") as handle:
        handle.write(b'{"messages": "\xff\xfe broken"}\n')
    stats = prepare([path], smol, max_length=64, out_dir=tmp_path / "out").stats
    assert (stats.rows_read, stats.rows_kept) == (6, 1)
    named = {reason: d.rows for reason, d in stats.dropped.items()}
    assert named == {
        formats.NO_ASSISTANT: ["rows.jsonl row 2"], formats.EMPTY_CONTENT: ["rows.jsonl row 3"],
        formats.UNKNOWN_ROLE: ["rows.jsonl row 4"], formats.NON_STRING: ["rows.jsonl row 5"],
        "invalid UTF-8": ["rows.jsonl row 6"],
    }


def test_strict_bad_row_policy_stops_at_the_first_bad_row(smol, tmp_path):
    rows = [{"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": ""}]
    with pytest.raises(UserError, match=r"rows.jsonl: row 2: empty content.*bad_rows: drop"):
        prepare([write_jsonl(tmp_path / "rows.jsonl", rows)], smol, max_length=64, out_dir=tmp_path / "o", dataset=DatasetSection(bad_rows="error"))


def long_rows(tmp_path: Path) -> Path:
    rows = [{"prompt": "short?", "completion": "yes"},
            {"prompt": "word " * 200, "completion": "the end"},
            {"prompt": "tell me", "completion": "word " * 200}]
    return write_jsonl(tmp_path / "long.jsonl", rows)


def test_truncate_policy_cuts_and_counts(smol, tmp_path):
    prepared = prepare([long_rows(tmp_path)], smol, max_length=64, out_dir=tmp_path / "o", dataset=DatasetSection(shuffle_dataset=False))
    stats = prepared.stats
    assert stats.long_rows == 2 and stats.truncated_rows == 1
    assert stats.dropped["no tokens with loss after truncation"].rows == ["long.jsonl row 2"]
    assert stats.truncated_tokens == stats.length_max - 64
    assert prepared.train.lengths.tolist()[1] == 64


def test_drop_policy_drops_long_rows(smol, tmp_path):
    stats = prepare([long_rows(tmp_path)], smol, max_length=64, out_dir=tmp_path / "o", dataset=DatasetSection(long_rows="drop")).stats
    assert stats.rows_kept == 1 and stats.dropped["longer than max_length"].count == 2
    assert stats.truncated_tokens == 0


def test_error_policy_names_the_row_and_its_length(smol, tmp_path):
    with pytest.raises(UserError, match=r"long.jsonl: row 2 has [\d,]+ tokens, more than max_length 64"):
        prepare([long_rows(tmp_path)], smol, max_length=64, out_dir=tmp_path / "o", dataset=DatasetSection(long_rows="error"))


def test_every_file_is_used_and_reported(smol, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "completion": "x"} for i in range(3)])
    pq.write_table(pa.Table.from_pylist([{"prompt": f"b{i}", "completion": "y"} for i in range(4)]), tmp_path / "b.parquet")
    stats = prepare([a, tmp_path / "b.parquet"], smol, max_length=64, out_dir=tmp_path / "o").stats
    assert [(Path(f.path).name, f.rows) for f in stats.files] == [("a.jsonl", 3), ("b.parquet", 4)]
    assert stats.rows_kept == 7


def test_files_of_different_formats_are_refused_naming_both(smol, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "completion": "c"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "t"}])
    with pytest.raises(UserError, match=r"b.jsonl is in text format but a.jsonl is in prompt-completion format"):
        prepare([a, b], smol, max_length=64, out_dir=tmp_path / "o")


def test_split_is_seeded_and_sized(smol, tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(20)])

    def split(seed: int, out: str):
        p = prepare([path], smol, max_length=64, out_dir=tmp_path / out, dataset=DatasetSection(shuffle_seed=seed, train_test_split=0.8))
        return [p.train[i][0] for i in range(len(p.train))], [p.eval[i][0] for i in range(len(p.eval))]

    first, again, other = split(1, "a"), split(1, "b"), split(2, "c")
    assert (len(first[0]), len(first[1])) == (16, 4)
    assert first == again and first != other
    assert sorted(map(tuple, first[0] + first[1])) == sorted(map(tuple, other[0] + other[1]))


@pytest.mark.parametrize("name", list(SHARED_DATASETS))
def test_every_shared_dataset_prepares(smol, tmp_path, name):
    stats = prepare([DATA / SHARED_DATASETS[name]], smol, max_length=512, out_dir=tmp_path / "o").stats
    assert stats.files[0].format == name
    assert stats.rows_kept > 0.9 * stats.rows_read
    assert stats.log_lines()[0].startswith(f"format: {name} (")


@pytest.mark.parametrize("tokenizer_name", ["phi3", "smol"])
def test_direct_template_rendering_equals_apply_chat_template(request, tokenizer_name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    renderer = ChatRenderer(tokenizer)
    assert renderer._compiled is not None  # the fast, direct path is in use for these templates
    rows = pq.read_table(DATA / "messages" / "chitchat-messages.parquet").to_pylist()[:40]
    for row in rows:
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]][:9]
        for generation_prompt in (False, True):
            assert renderer._apply(messages, generation_prompt) == tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt)
