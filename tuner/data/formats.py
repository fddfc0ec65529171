"""Dataset formats: which one a file's columns are in, and one row -> chat messages or plain text.

- messages: `messages`, a list of {role, content} (OpenAI) -> those messages.
- prompt-completion: `prompt`, `completion`, each text (-> a user and an assistant turn) or a list
  of messages (the conversational variant).
- dolly: `instruction`, [`context`], `response` -> user "{instruction}\\n\\n{context}" (or the
  instruction alone when the context is blank), assistant response; `category` is not used.
- alpaca: `instruction`, [`input`], `output`, [`system`], [`history`] -> system, the history's
  [user, assistant] pairs, user "{instruction}\\n\\n{input}" (or the instruction), assistant.
- sharegpt: `conversations`, a list of {from, value} (or {role, content}), [`system`] -> the turns,
  speakers mapped by `SHAREGPT_ROLES`.
- text: `text` -> the text itself (continued pre-training: loss on every token).

Sharegpt's `function_call` turns become assistant turns (the model learns to emit the call) and
`observation` turns become `tool` turns (the result the model reads); its `tools` column (the
function schemas) is not used: a sample holds only roles and contents. A messages, conversations
or history cell that holds JSON text (as CSV files must) is parsed. Blank system turns are left
out; blank user or assistant turns drop the row. The conversational prompt-completion variant
keeps no boundary between prompt and completion: every assistant turn in either becomes a turn
like any other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from tuner.errors import UserError
from tuner.spec.columns import FIELDS, FORMATS, ColumnMapping

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "function_call": "assistant", "observation": "tool", "tool": "tool"}

EMPTY_CONTENT = "empty content"
UNKNOWN_ROLE = "unknown role"
NO_ASSISTANT = "no assistant turn"
NON_STRING = "non-string content"
MALFORMED = "malformed messages"
REASONS = (EMPTY_CONTENT, UNKNOWN_ROLE, NO_ASSISTANT, NON_STRING, MALFORMED)


class RowDropped(ValueError):
    """A row that cannot become a sample; `reason` (one of REASONS) is the key it is counted under."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Format:
    """A detected format and the file columns it reads."""

    name: str
    columns: dict[str, str]  # field -> file column actually used (optional fields only when present)
    description: str  # e.g. "dolly (instruction, context, response)", "text (body as text)"
    ignored: tuple[str, ...] = ()  # columns another format would have read, left out (alpaca's `text`)


def _resolve(name: str, columns: list[str], mapped: dict[str, str]) -> Format | None:
    """The format `name` on these columns, or None if a required field has no column."""
    used = {}
    for fld, required in FIELDS[name].items():
        column = mapped.get(fld, fld)
        if column in columns:
            used[fld] = column
        elif required:
            return None
    shown = ", ".join(col if col == fld else f"{col} as {fld}" for fld, col in used.items())
    return Format(name, used, f"{name} ({shown})")


def _expected(names: list[str]) -> str:
    def fields(name: str) -> str:
        optional = [f for f, required in FIELDS[name].items() if not required]
        return ", ".join(f for f, required in FIELDS[name].items() if required) + (
            f"; optional {', '.join(optional)}" if optional else "")
    return "; ".join(f"{name} ({fields(name)})" for name in names)


def detect_format(columns: list[str], mapping: ColumnMapping | None = None, *, where: str = "") -> Format:
    """The one format these columns are in, honouring an explicit mapping; UserError otherwise."""
    mapping = mapping or ColumnMapping()
    seen = ", ".join(columns) or "(none)"
    missing = [f"{col} (as {fld})" for fld, col in mapping.columns.items() if col not in columns]
    if missing:
        raise UserError(f"the dataset config names column(s) {', '.join(missing)} but the file has {seen}",
                        where=where or None, fix="name columns the file has in DatasetConfig "
                                                 "(columns, or Kaito's messages_column/context_column/response_column)")
    if mapping.format:
        found = _resolve(mapping.format, columns, mapping.columns)
        if found is None:
            raise UserError(f"columns {seen} do not fit DatasetConfig.format {mapping.format}: expected "
                            f"{_expected([mapping.format])}", where=where or None,
                            fix="map the format's fields to the file's columns in DatasetConfig.columns")
        return found
    names = [n for n in FORMATS if all(fld in FIELDS[n] for fld in mapping.columns)]
    matches = [fmt for fmt in (_resolve(n, columns, mapping.columns) for n in names) if fmt]
    structured = [fmt for fmt in matches if fmt.name != "text"]
    if len(matches) > 1 and len(structured) == 1:
        # Stanford alpaca and its copies, and some dolly copies, carry a pre-rendered `text` beside
        # the structured columns: the structure (and so the loss on the answer only) wins.
        chosen = structured[0]
        ignored = tuple(col for fmt in matches if fmt is not chosen for col in fmt.columns.values()
                        if col not in chosen.columns.values())
        return Format(chosen.name, chosen.columns, chosen.description, ignored)
    if len(matches) > 1:
        raise UserError(f"dataset columns {seen} fit several formats: {', '.join(m.description for m in structured)}",
                        where=where or None,
                        fix=f"choose one with DatasetConfig.format (e.g. format: {structured[0].name})")
    if not matches:
        raise UserError(f"unrecognised dataset columns: {seen}", where=where or None,
                        fix=f"expected one of: {_expected(names)}; or name the format and columns in "
                            "DatasetConfig (format, columns)")
    return matches[0]


# ------------------------------------------------------------------------------------ rows to samples

def _text(value: Any) -> str:
    """A text cell; None (a missing value) counts as empty."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowDropped(NON_STRING)
    return value


def _json_list(value: Any) -> list:
    """A non-empty list cell, parsed first if it holds JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise RowDropped(MALFORMED) from None
    if not isinstance(value, list) or not value:
        raise RowDropped(MALFORMED)
    return value


def _turns(value: Any, roles: dict[str, str]) -> list[dict]:
    """A list of {role, content} (or sharegpt {from, value}) dicts -> messages with mapped roles."""
    messages = []
    for item in _json_list(value):
        keys = ("from", "value") if isinstance(item, dict) and "from" in item else ("role", "content")
        if not isinstance(item, dict) or not isinstance(item.get(keys[0]), str) or keys[1] not in item:
            raise RowDropped(MALFORMED)
        role = roles.get(item[keys[0]])
        if role is None:
            raise RowDropped(UNKNOWN_ROLE)
        messages.append({"role": role, "content": _text(item[keys[1]])})
    return messages


def _chat(messages: list[dict]) -> list[dict]:
    """Leave out blank system turns; drop the row for a blank user/assistant turn or no assistant turn."""
    kept = []
    for message in messages:
        if not message["content"].strip():
            if message["role"] == "system":
                continue
            if message["role"] in ("user", "assistant"):
                raise RowDropped(EMPTY_CONTENT)
        kept.append(message)
    if not any(m["role"] == "assistant" for m in kept):
        raise RowDropped(NO_ASSISTANT)
    return kept


def _joined(first: str, second: str) -> str:
    """The instruction, then its context/input after a blank line when there is one."""
    if not first.strip():
        raise RowDropped(EMPTY_CONTENT)
    return f"{first}\n\n{second}" if second.strip() else first


_OPENAI_ROLES = {role: role for role in ROLES}


def _messages(get: Callable[[str], Any]) -> list[dict]:
    return _chat(_turns(get("messages"), _OPENAI_ROLES))


def _prompt_completion(get: Callable[[str], Any]) -> list[dict]:
    def side(value: Any, role: str) -> list[dict]:
        if isinstance(value, list):
            return _turns(value, _OPENAI_ROLES)
        return [{"role": role, "content": _text(value)}]
    return _chat(side(get("prompt"), "user") + side(get("completion"), "assistant"))


def _dolly(get: Callable[[str], Any]) -> list[dict]:
    return _chat([{"role": "user", "content": _joined(_text(get("instruction")), _text(get("context")))},
                  {"role": "assistant", "content": _text(get("response"))}])


def _alpaca(get: Callable[[str], Any]) -> list[dict]:
    messages = [{"role": "system", "content": _text(get("system"))}]
    if get("history") is not None:
        for pair in _json_list(get("history")):
            if not isinstance(pair, list) or len(pair) != 2:
                raise RowDropped(MALFORMED)
            messages += [{"role": "user", "content": _text(pair[0])}, {"role": "assistant", "content": _text(pair[1])}]
    messages += [{"role": "user", "content": _joined(_text(get("instruction")), _text(get("input")))},
                 {"role": "assistant", "content": _text(get("output"))}]
    return _chat(messages)


def _sharegpt(get: Callable[[str], Any]) -> list[dict]:
    return _chat([{"role": "system", "content": _text(get("system"))}] + _turns(get("conversations"), SHAREGPT_ROLES))


def _plain_text(get: Callable[[str], Any]) -> str:
    text = _text(get("text"))
    if not text.strip():
        raise RowDropped(EMPTY_CONTENT)
    return text


_CONVERTERS: dict[str, Callable[[Callable[[str], Any]], list[dict] | str]] = {
    "messages": _messages, "prompt-completion": _prompt_completion, "dolly": _dolly, "alpaca": _alpaca,
    "sharegpt": _sharegpt, "text": _plain_text,
}


def to_sample(row: dict, fmt: Format) -> list[dict] | str:
    """One row -> chat messages ({"role", "content"} only) or, for text, the string; RowDropped if unusable."""
    def get(fld: str) -> Any:  # a field's cell; None for an optional field the file lacks
        column = fmt.columns.get(fld)
        return None if column is None else row.get(column)
    return _CONVERTERS[fmt.name](get)
