"""tuner.data: reading files, format detection, label masks, truncation, drops and the split."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from tuner.data import (
    ColumnMapping, detect_format, prepare, read_table, row_to_messages, tokenize_conversation,
)
from tuner.errors import UserError

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = SHARED / "data"

CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "hi there"},
    {"role": "assistant", "content": "hello\nfriend."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "four"},
]
# What the labelled tokens of CHAT decode to, turn by turn: content + end-of-turn marker(s).
LABELLED = {
    "phi3": ["hello\nfriend.<|end|>", "four<|end|><|endoftext|>"],
    "smollm2": ["hello\nfriend.<|im_end|>\n", "four<|im_end|>\n"],
}
HEADERS = {
    "phi3": ["<|system|>", "<|user|>", "<|assistant|>"],
    "smollm2": ["<|im_start|>"],
}
END_OF_TURN = {"phi3": "<|end|>", "smollm2": "<|im_end|>"}


@pytest.fixture(scope="module")
def tokenizers(smollm2_dir: Path) -> dict:
    return {
        "phi3": AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "phi-3-mini-4k-instruct"),
        "smollm2": AutoTokenizer.from_pretrained(smollm2_dir),
    }


@pytest.fixture(scope="module")
def smol(tokenizers: dict):
    return tokenizers["smollm2"]


def pc_rows(n: int) -> list[dict]:
    return [{"prompt": f"question {i}?", "completion": f"answer number {i}."} for i in range(n)]


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def labelled_runs(tokenizer, input_ids: list[int], labels: list[int]) -> list[str]:
    """Decode each maximal run of consecutive labelled tokens."""
    runs: list[list[int]] = []
    previous = -100
    for token, label in zip(input_ids, labels):
        if label != -100:
            assert label == token
            if previous == -100:
                runs.append([])
            runs[-1].append(token)
        previous = label
    return [tokenizer.decode(run) for run in runs]


# ---------------------------------------------------------------------------------------- detection

def test_detects_messages_and_prompt_completion():
    assert detect_format(["messages"]) == "messages"
    assert detect_format(["id", "prompt", "completion"]) == "prompt-completion"
    assert detect_format(["messages", "prompt", "completion"]) == "messages"


def test_mapping_overrides_detection():
    kaito = ColumnMapping(prompt_column="instruction", completion_column="response")
    assert detect_format(["instruction", "response"], kaito) == "prompt-completion"
    assert detect_format(["chat", "prompt", "completion"], ColumnMapping(messages_column="chat")) == "messages"
    with pytest.raises(UserError, match=r"column\(s\) answer but the file has question, response"):
        detect_format(["question", "response"], ColumnMapping(prompt_column="question", completion_column="answer"))
    with pytest.raises(UserError, match=r"column\(s\) chat but the file has messages"):
        detect_format(["messages"], ColumnMapping(messages_column="chat"))


def test_unknown_columns_error_lists_columns_and_formats(tokenizers):
    with pytest.raises(UserError) as caught:
        prepare([DATA / "dolly" / "chitchat-dolly.parquet"], tokenizers["smollm2"], max_length=64)
    message = str(caught.value)
    assert "chitchat-dolly.parquet" in message
    assert "instruction, context, response, category" in message
    assert "'messages'" in message and "'prompt' and 'completion'" in message


# ------------------------------------------------------------------------------------ label masks

@pytest.mark.parametrize("name", ["phi3", "smollm2"])
def test_labels_cover_exactly_assistant_turns_and_end_of_turn(tokenizers, name):
    tokenizer = tokenizers[name]
    example, cut = tokenize_conversation(tokenizer, CHAT, max_length=4096)
    assert cut == 0
    assert example.input_ids == tokenizer(tokenizer.apply_chat_template(CHAT, tokenize=False),
                                          add_special_tokens=False)["input_ids"]
    assert labelled_runs(tokenizer, example.input_ids, example.labels) == LABELLED[name]
    tokens = tokenizer.convert_ids_to_tokens(example.input_ids)
    labelled_tokens = [t for t, label in zip(tokens, example.labels) if label != -100]
    assert labelled_tokens.count(END_OF_TURN[name]) == 2  # one per assistant turn
    for header in HEADERS[name]:
        assert header in tokens and header not in labelled_tokens
    for text in ("You answer briefly.", "hi there", "2+2?", "system", "user", "assistant"):
        assert text not in "".join(labelled_runs(tokenizer, example.input_ids, example.labels))


def test_real_messages_rows_label_only_assistant_text(smol):
    rows = pq.read_table(DATA / "messages" / "chitchat-messages.parquet").slice(0, 20).to_pylist()
    for row in rows:
        messages = row_to_messages(row, "messages", None)
        example, _ = tokenize_conversation(smol, messages, max_length=100_000)
        expected = [m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant"]
        assert labelled_runs(smol, example.input_ids, example.labels) == expected


# ------------------------------------------------------------------------------------- row handling

def test_prompt_completion_becomes_user_and_assistant_turns():
    assert row_to_messages({"prompt": "Why?", "completion": "Because."}, "prompt-completion", None) == [
        {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}]
    mapping = ColumnMapping(prompt_column="context", completion_column="response")
    assert row_to_messages({"context": "a", "response": "b"}, "prompt-completion", mapping) == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    conversational = {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                      "completion": [{"role": "assistant", "content": "c"}]}
    assert [m["role"] for m in row_to_messages(conversational, "prompt-completion", None)] == [
        "system", "user", "assistant"]


def test_unusable_rows_are_dropped_with_counted_reasons(smol, tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},
        {"messages": []},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = prepare([path], smol, max_length=64).stats
    assert (stats.rows_read, stats.rows_kept) == (5, 1)
    assert stats.rows_dropped == {"no assistant turn": 1, "empty content": 1, "malformed messages": 2}
    assert "dropped: 2 malformed messages, 1 empty content, 1 no assistant turn" in stats.log_lines()


def test_templates_that_are_not_prefix_stable_or_reject_a_row_drop_it(smollm2_dir, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": "fine"}) + "\n" for p in ("ok", "bad")))
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.chat_template = (  # a header that counts the messages changes as the conversation grows
        "{{ messages|length }}\n{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}")
    assert prepare([path], tokenizer, max_length=64).stats.rows_dropped == {"chat template not prefix-stable": 2}
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m.content == 'bad' %}{{ raise_exception('no bad rows') }}{% endif %}"
        "{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    stats = prepare([path], tokenizer, max_length=64).stats
    assert (stats.rows_kept, stats.rows_dropped) == (1, {"chat template error": 1})


# ------------------------------------------------------------------------------------------- files

def test_every_file_is_used(smol, tmp_path):
    extra = write_parquet(tmp_path / "extra.parquet", [{"prompt": "What is tuner?", "completion": "zebra-quartz"}])
    real = DATA / "prompt-completion" / "chatterbot-prompt-completion.parquet"
    data = prepare([real, extra], smol, max_length=256, shuffle=False)
    stats = data.stats
    assert [(Path(f.path).name, f.format, f.rows) for f in stats.files] == [
        ("chatterbot-prompt-completion.parquet", "prompt-completion", 700), ("extra.parquet", "prompt-completion", 1)]
    assert stats.rows_read == stats.rows_kept == stats.train_rows == len(data.train) == 701
    assert "zebra-quartz<|im_end|>" in smol.decode(data.train[-1].input_ids)
    assert stats.log_lines()[:3] == [
        "data: 2 files, 701 rows read, 701 kept, 0 dropped; 701 train / 0 eval",
        "format: prompt-completion (chatterbot-prompt-completion.parquet, 700 rows)",
        "format: prompt-completion (extra.parquet, 1 row)",
    ]
    assert stats.label_tokens == sum(label != -100 for e in data.train for label in e.labels) > 0


def test_files_of_different_formats_are_rejected_naming_both(smol, tmp_path):
    first = write_parquet(tmp_path / "a.parquet", pc_rows(2))
    second = write_parquet(tmp_path / "b.parquet", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(UserError, match=r"b\.parquet is in messages format but .*a\.parquet is in prompt-completion"):
        prepare([first, second], smol, max_length=64)


def test_real_messages_file_prepares(smol):
    data = prepare([DATA / "messages" / "chitchat-messages.parquet"], smol, max_length=256, train_test_split=0.9)
    stats = data.stats
    dropped = stats.rows_dropped.get("no label tokens after truncation", 0)  # first user turn > 256 tokens
    assert set(stats.rows_dropped) <= {"no label tokens after truncation"} and dropped < 20
    assert stats.rows_read == 2000 and stats.rows_kept == 2000 - dropped
    assert (stats.train_rows, stats.eval_rows) == (len(data.train), len(data.eval)) == (
        round(0.9 * stats.rows_kept), stats.rows_kept - round(0.9 * stats.rows_kept))
    assert max(len(e.input_ids) for e in data.train + data.eval) == 256
    assert stats.tokens == sum(len(e.input_ids) for e in data.train + data.eval)
    assert stats.truncated_rows > 1000 and stats.truncated_tokens > stats.tokens
    assert stats.log_lines()[0] == (f"data: 1 file, 2,000 rows read, {stats.rows_kept:,} kept, {dropped} dropped; "
                                    f"{stats.train_rows:,} train / {stats.eval_rows} eval")


@pytest.mark.parametrize("name", ["rows.parquet", "rows.jsonl", "rows.json", "lines.json", "rows.csv"])
def test_reads_parquet_jsonl_json_and_csv(tmp_path, name):
    rows = [{"prompt": "a, \"quoted\" prompt", "completion": "42"}, {"prompt": "second", "completion": "b\nc"}]
    path = tmp_path / name
    if name.endswith(".parquet"):
        write_parquet(path, rows)
    elif name == "rows.json":
        path.write_text(json.dumps(rows))
    elif name.endswith("json") or name.endswith("jsonl"):
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        path.write_text('prompt,completion\n"a, ""quoted"" prompt",42\nsecond,"b\nc"\n')
    assert read_table(path).to_pylist() == rows


@pytest.mark.parametrize("name, problem", [("missing.parquet", "not found"), ("data.txt", "unsupported"),
                                           ("broken.json", "cannot read")])
def test_bad_file_gives_user_error_naming_it(tmp_path, name, problem):
    path = tmp_path / name
    if name != "missing.parquet":
        path.write_text("{not json")
    with pytest.raises(UserError, match=problem) as caught:
        read_table(path)
    assert str(path) in str(caught.value)


# -------------------------------------------------------------------------------------- truncation

def test_truncation_is_counted_and_fully_cut_rows_are_dropped(smol, tmp_path):
    long_answer = " ".join(["word"] * 50)
    rows = [{"prompt": "short", "completion": long_answer},
            {"prompt": " ".join(["long"] * 50), "completion": "unreachable"},
            {"prompt": "hi", "completion": "ok"}]
    path = write_parquet(tmp_path / "t.parquet", rows)
    full = [tokenize_conversation(smol, row_to_messages(r, "prompt-completion", None), 10_000)[0] for r in rows]
    data = prepare([path], smol, max_length=40, shuffle=False)
    stats = data.stats
    assert stats.rows_dropped == {"no label tokens after truncation": 1}
    assert [len(e.input_ids) for e in data.train] == [40, len(full[2].input_ids)]
    assert (stats.truncated_rows, stats.truncated_tokens) == (1, len(full[0].input_ids) - 40)
    assert data.train[0].input_ids == full[0].input_ids[:40] and data.train[0].labels == full[0].labels[:40]
    assert stats.tokens == 40 + len(full[2].input_ids)
    assert f"truncated: 1 row longer than max_length, {len(full[0].input_ids) - 40} tokens cut" in stats.log_lines()


# ------------------------------------------------------------------------------------------- split

def test_split_sizes_and_seeded_shuffle(smol, tmp_path):
    path = write_parquet(tmp_path / "s.parquet", pc_rows(10))

    def order(**kwargs) -> list[str]:
        data = prepare([path], smol, max_length=64, **kwargs)
        return [smol.decode(e.input_ids) for e in data.train + data.eval]

    data = prepare([path], smol, max_length=64, train_test_split=0.8, seed=7)
    assert (len(data.train), len(data.eval), data.stats.train_rows, data.stats.eval_rows) == (8, 2, 8, 2)
    assert order(seed=7) == order(seed=7)
    assert order(seed=7) != order(seed=8)
    assert sorted(order(seed=7)) == sorted(order(shuffle=False))
    unshuffled = order(shuffle=False)
    assert all(f"question {i}?" in text for i, text in enumerate(unshuffled))
    everything = prepare([path], smol, max_length=64, train_test_split=1)
    assert (len(everything.train), len(everything.eval)) == (10, 0)
    with pytest.raises(UserError, match="train_test_split"):
        prepare([path], smol, max_length=64, train_test_split=0)
