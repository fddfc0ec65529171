"""tuner.formats: format detection, DatasetConfig mappings, row -> sample conversion, drop reasons."""

from __future__ import annotations

from collections import Counter

import pytest

from conftest import SHARED
from tuner.data.formats import (
    EMPTY_CONTENT,
    MALFORMED,
    NO_ASSISTANT,
    NON_STRING,
    UNKNOWN_ROLE,
    ColumnMapping,
    Format,
    RowDropped,
    detect_format,
    to_sample,
)
from tuner.data.readers import file_columns, iter_chunks
from tuner.errors import UserError

DATA = SHARED / "data"


def sample(row: dict, columns: list[str] | None = None, mapping: ColumnMapping | None = None):
    return to_sample(row, detect_format(columns or list(row), mapping))


def reason(row: dict, columns: list[str] | None = None) -> str:
    with pytest.raises(RowDropped) as caught:
        sample(row, columns)
    return caught.value.reason


# ---------------------------------------------------------------------------------------- detection

@pytest.mark.parametrize("columns, name, used, description", [
    (["messages"], "messages", {"messages": "messages"}, "messages (messages)"),
    (["id", "prompt", "completion"], "prompt-completion", {"prompt": "prompt", "completion": "completion"},
     "prompt-completion (prompt, completion)"),
    (["instruction", "context", "response", "category"], "dolly",
     {"instruction": "instruction", "context": "context", "response": "response"},
     "dolly (instruction, context, response)"),
    (["instruction", "response"], "dolly", {"instruction": "instruction", "response": "response"},
     "dolly (instruction, response)"),
    (["instruction", "input", "output"], "alpaca", {"instruction": "instruction", "input": "input", "output": "output"},
     "alpaca (instruction, input, output)"),
    (["conversations", "tools"], "sharegpt", {"conversations": "conversations"}, "sharegpt (conversations)"),
    (["text", "meta"], "text", {"text": "text"}, "text (text)"),
])
def test_detects_each_format_and_the_columns_it_uses(columns, name, used, description):
    assert detect_format(columns) == Format(name, used, description)


@pytest.mark.parametrize("columns, name, used, ignored", [
    # Stanford alpaca's four columns: the structure wins over the pre-rendered text
    (["instruction", "input", "output", "text"], "alpaca", ("instruction", "input", "output"), ("text",)),
    (["instruction", "context", "response", "category", "text"], "dolly", ("instruction", "context", "response"),
     ("text",)),
    (["text", "messages"], "messages", ("messages",), ("text",)),
])
def test_a_structured_format_wins_over_a_text_column_and_says_it_ignored_it(columns, name, used, ignored):
    fmt = detect_format(columns, where="data.json")
    assert (fmt.name, tuple(fmt.columns.values()), fmt.ignored) == (name, used, ignored)


def test_a_tie_between_structured_formats_names_them_and_the_key():
    with pytest.raises(UserError, match=r"^data.parquet: dataset columns prompt, completion, messages, text fit "
                                        r"several formats: messages \(messages\), prompt-completion \(prompt, "
                                        r"completion\); choose one with DatasetConfig.format "
                                        r"\(e.g. format: messages\)$"):
        detect_format(["prompt", "completion", "messages", "text"], where="data.parquet")


def test_ambiguous_dolly_and_alpaca_columns():
    with pytest.raises(UserError, match=r"fit several formats: dolly \(instruction, context, response\), "
                                        r"alpaca \(instruction, input, output\)"):
        detect_format(["instruction", "input", "output", "context", "response"])


def test_unknown_schema_lists_columns_seen_and_formats_expected():
    with pytest.raises(UserError) as caught:
        detect_format(["question", "answer"], where="qa.csv")
    message = str(caught.value)
    assert message.startswith("qa.csv: unrecognised dataset columns: question, answer; expected one of: ")
    assert "messages (messages)" in message
    assert "prompt-completion (prompt, completion)" in message
    assert "dolly (instruction, response; optional context)" in message
    assert "alpaca (instruction, output; optional input, system, history)" in message
    assert "sharegpt (conversations; optional system)" in message
    assert "text (text)" in message
    assert message.endswith("DatasetConfig (format, columns)")


def test_explicit_format_resolves_an_ambiguous_schema():
    fmt = detect_format(["messages", "text"], ColumnMapping(format="text"))
    assert fmt == Format("text", {"text": "text"}, "text (text)")


def test_explicit_columns_rename_fields():
    mapping = ColumnMapping("prompt-completion", {"prompt": "question", "completion": "answer"})
    fmt = detect_format(["question", "answer"], mapping)
    assert fmt.columns == {"prompt": "question", "completion": "answer"}
    assert fmt.description == "prompt-completion (question as prompt, answer as completion)"
    assert to_sample({"question": "2+2?", "answer": "4"}, fmt) == [
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


def test_columns_without_format_narrow_detection_to_formats_with_those_fields():
    fmt = detect_format(["body", "messages"], ColumnMapping(columns={"text": "body"}))
    assert fmt == Format("text", {"text": "body"}, "text (body as text)")


def test_mapped_column_missing_from_the_file_is_named():
    with pytest.raises(UserError, match=r"^f.json: the dataset config names column\(s\) chat \(as messages\) "
                                        r"but the file has messages, id;"):
        detect_format(["messages", "id"], ColumnMapping("messages", {"messages": "chat"}), where="f.json")


def test_explicit_format_whose_fields_are_missing_lists_what_it_needs():
    with pytest.raises(UserError, match=r"columns prompt, completion do not fit DatasetConfig.format dolly: "
                                        r"expected dolly \(instruction, response; optional context\)"):
        detect_format(["prompt", "completion"], ColumnMapping("dolly"))


# ------------------------------------------------------------------------------ DatasetConfig keys

@pytest.mark.parametrize("dataset, expected", [
    ({"format": "dolly"}, ColumnMapping("dolly")),
    ({"format": "alpaca", "columns": {"output": "answer"}}, ColumnMapping("alpaca", {"output": "answer"})),
    ({"columns": {"text": "body"}}, ColumnMapping(None, {"text": "body"})),
    ({"messages_column": "chat"}, ColumnMapping("messages", {"messages": "chat"})),
    ({"context_column": "q", "response_column": "a"},
     ColumnMapping("prompt-completion", {"prompt": "q", "completion": "a"})),
    ({"response_column": "body", "shuffle_dataset": True}, ColumnMapping("text", {"text": "body"})),
])
def test_mapping_from_dataset_config(dataset, expected):
    assert ColumnMapping.from_dataset_config(dataset) == expected


def test_no_mapping_when_no_key_is_set():
    assert ColumnMapping.from_dataset_config({"shuffle_dataset": True, "messages_column": None}) is None


@pytest.mark.parametrize("dataset, message", [
    ({"messages_column": "chat", "response_column": "a"},
     r"^DatasetConfig.messages_column: cannot be combined with context_column/response_column;"),
    ({"context_column": "q"}, r"^DatasetConfig.context_column: needs response_column"),
    ({"response_column": "a", "format": "text"},
     r"^DatasetConfig.response_column: Kaito's \*_column keys cannot be combined with format/columns;"),
    ({"messages_column": ["chat"]}, r"^DatasetConfig.messages_column: must be a column name, got \['chat'\]$"),
    ({"format": "chatml"}, r"^DatasetConfig.format: unknown format 'chatml'; use one of messages, prompt-completion, "
                           r"dolly, alpaca, sharegpt, text$"),
    ({"format": "text", "columns": {"prompt": "q"}},
     r"^DatasetConfig.columns: unknown field\(s\) prompt for format text; fields are: text$"),
    ({"columns": {"question": "q"}}, r"^DatasetConfig.columns: unknown field\(s\) question; fields are: messages, "
                                     r"prompt, completion, instruction, context, response, input, output, system, "
                                     r"history, conversations, text$"),
    ({"columns": ["text"]}, r"^DatasetConfig.columns: must map field names to column names;"),
])
def test_bad_dataset_config_names_the_key(dataset, message):
    with pytest.raises(UserError, match=message):
        ColumnMapping.from_dataset_config(dataset)


# ------------------------------------------------------------------------------------- conversion

def test_messages_keep_only_role_and_content():
    row = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi", "name": "ann"},
        {"role": "assistant", "content": "hello", "weight": 1},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]}
    assert sample(row) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]


def test_messages_given_as_json_text_are_parsed():
    row = {"messages": '[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]'}
    assert sample(row) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]


def test_blank_system_turn_is_left_out():
    row = {"messages": [{"role": "system", "content": " "}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hey"}]}
    assert sample(row) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]


def test_prompt_completion_strings():
    assert sample({"prompt": "Capital of France?", "completion": " Paris."}) == [
        {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": " Paris."}]


def test_prompt_completion_conversational():
    row = {"prompt": [{"role": "system", "content": "Terse."}, {"role": "user", "content": "Sky colour?"}],
           "completion": [{"role": "assistant", "content": "Blue."}]}
    assert sample(row) == [{"role": "system", "content": "Terse."}, {"role": "user", "content": "Sky colour?"},
                           {"role": "assistant", "content": "Blue."}]


def test_dolly_puts_context_after_the_instruction():
    row = {"instruction": "Who wrote it?", "context": "Hamlet is a play by Shakespeare.",
           "response": "Shakespeare.", "category": "closed_qa"}
    assert sample(row) == [{"role": "user", "content": "Who wrote it?\n\nHamlet is a play by Shakespeare."},
                           {"role": "assistant", "content": "Shakespeare."}]


def test_dolly_without_context_is_the_instruction_alone():
    row = {"instruction": "Name a colour.", "context": "", "response": "Red.", "category": "open_qa"}
    assert sample(row) == [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}]


def test_alpaca_uses_input_system_and_history():
    row = {"instruction": "Translate.", "input": "chat", "output": "cat", "system": "You translate French.",
           "history": [["Translate: chien", "dog"]]}
    assert sample(row) == [
        {"role": "system", "content": "You translate French."},
        {"role": "user", "content": "Translate: chien"}, {"role": "assistant", "content": "dog"},
        {"role": "user", "content": "Translate.\n\nchat"}, {"role": "assistant", "content": "cat"},
    ]


def test_sharegpt_maps_roles_including_function_call_and_observation():
    row = {"conversations": [
        {"from": "human", "value": "Weather in Oslo?"},
        {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Oslo"}}'},
        {"from": "observation", "value": '{"temp": 3}'},
        {"from": "gpt", "value": "It is 3 degrees."},
    ], "system": "You can call tools.", "tools": '[{"name": "weather"}]'}
    assert sample(row) == [
        {"role": "system", "content": "You can call tools."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": '{"name": "weather", "arguments": {"city": "Oslo"}}'},
        {"role": "tool", "content": '{"temp": 3}'},
        {"role": "assistant", "content": "It is 3 degrees."},
    ]


def test_text_is_returned_unchanged():
    assert sample({"text": "  Once upon a time.\n"}) == "  Once upon a time.\n"


# ---------------------------------------------------------------------------------------- bad rows

def test_blank_assistant_turn_is_empty_content():
    assert reason({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}) == \
        EMPTY_CONTENT


def test_blank_user_turn_is_empty_content():
    assert reason({"prompt": "\n", "completion": "an answer"}) == EMPTY_CONTENT


def test_missing_completion_is_empty_content():
    assert reason({"prompt": "question"}, ["prompt", "completion"]) == EMPTY_CONTENT


def test_blank_alpaca_output_is_empty_content():
    assert reason({"instruction": "Say hi.", "input": "", "output": ""}) == EMPTY_CONTENT


def test_blank_text_is_empty_content():
    assert reason({"text": " \n"}) == EMPTY_CONTENT


def test_unmapped_role_is_unknown_role():
    assert reason({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hey"}]}) == UNKNOWN_ROLE


def test_unknown_sharegpt_speaker_is_unknown_role():
    assert reason({"conversations": [{"from": "human", "value": "hi"}, {"from": "bard", "value": "hey"}]}) == \
        UNKNOWN_ROLE


def test_conversation_without_assistant_turn():
    assert reason({"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"}]}) == \
        NO_ASSISTANT


def test_number_as_completion_is_non_string_content():
    assert reason({"prompt": "2+2?", "completion": 4}) == NON_STRING


def test_dict_as_message_content_is_non_string_content():
    assert reason({"messages": [{"role": "user", "content": "hi"},
                                {"role": "assistant", "content": {"text": "hey"}}]}) == NON_STRING


@pytest.mark.parametrize("messages", [
    "not json", [], {"role": "user"}, ["hi", "hello"], [{"role": "user"}], [{"content": "hi"}],
    [{"role": 1, "content": "hi"}],
])
def test_malformed_messages(messages):
    assert reason({"messages": messages}) == MALFORMED


def test_malformed_alpaca_history():
    assert reason({"instruction": "a", "output": "b", "history": [["only one"]]}) == MALFORMED


# ------------------------------------------------------------------------------------- real files

@pytest.mark.parametrize("path, rows, description", [
    ("messages/chitchat-messages.parquet", 2000, "messages (messages)"),
    ("dolly/chitchat-dolly.parquet", 1500, "dolly (instruction, context, response)"),
    ("prompt-completion/chatterbot-prompt-completion.parquet", 700, "prompt-completion (prompt, completion)"),
    ("alpaca/llamafactory-alpaca_en_demo.json", 999, "alpaca (instruction, input, output)"),
    ("sharegpt/llamafactory-glaive_toolcall_en_demo.json", 300, "sharegpt (conversations)"),
    ("text/llamafactory-c4_demo.jsonl", 300, "text (text)"),
])
def test_real_files_are_detected_and_every_row_converts(path, rows, description):
    file = DATA / path
    fmt = detect_format(file_columns(file), where=str(file))
    assert (fmt.name, fmt.description) == (file.parent.name, description)
    converted, dropped = 0, Counter()
    for chunk in iter_chunks(file):
        assert chunk.bad == {}
        for row in chunk.rows:
            try:
                to_sample(row, fmt)
                converted += 1
            except RowDropped as e:
                dropped[e.reason] += 1
    assert (converted, dict(dropped)) == (rows, {})


def test_real_sharegpt_tool_turns():
    file = DATA / "sharegpt" / "llamafactory-glaive_toolcall_en_demo.json"
    fmt = detect_format(file_columns(file))
    roles = Counter(m["role"] for chunk in iter_chunks(file) for row in chunk.rows for m in to_sample(row, fmt))
    assert roles == {"user": 746, "assistant": 957, "tool": 211}
