"""Dataset files -> tokenized training examples whose labels carry loss only on assistant turns.

Each file is read into an Arrow table, its format detected from its columns (OpenAI `messages`, or
`prompt`/`completion`), every row turned into a chat, rendered with the tokenizer's own chat
template and tokenized. Assistant spans are found by rendering prefixes of the conversation, so
templates need no `{% generation %}` markers. Rows that cannot be used are dropped and counted.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet
from jinja2 import TemplateError

from tuner.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MESSAGES = "messages"
PROMPT_COMPLETION = "prompt-completion"
IGNORE = -100

MALFORMED = "malformed messages"
NO_ASSISTANT = "no assistant turn"
EMPTY_CONTENT = "empty content"
NOT_PREFIX_STABLE = "chat template not prefix-stable"
TEMPLATE_ERROR = "chat template error"
NO_LABELS = "no label tokens after truncation"


@dataclass(frozen=True)
class ColumnMapping:
    """Explicit column choice from Kaito's DatasetConfig; None fields fall back to detection/defaults."""

    messages_column: str | None = None
    prompt_column: str | None = None  # Kaito's context_column
    completion_column: str | None = None  # Kaito's response_column


@dataclass
class Example:
    """One tokenized conversation; `labels` is -100 wherever no loss is taken."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class FileReport:
    path: str
    format: str
    rows: int


@dataclass
class DataStats:
    files: list[FileReport]
    rows_read: int
    rows_kept: int
    rows_dropped: dict[str, int]
    tokens: int
    label_tokens: int
    truncated_rows: int
    truncated_tokens: int
    train_rows: int
    eval_rows: int

    def log_lines(self) -> list[str]:
        """Human summary lines for the job log."""
        lines = [f"data: {_count(len(self.files), 'file')}, {self.rows_read:,} rows read, {self.rows_kept:,} kept, "
                 f"{sum(self.rows_dropped.values()):,} dropped; {self.train_rows:,} train / {self.eval_rows:,} eval"]
        lines += [f"format: {f.format} ({Path(f.path).name}, {_count(f.rows, 'row')})" for f in self.files]
        if self.rows_dropped:
            reasons = sorted(self.rows_dropped.items(), key=lambda kv: (-kv[1], kv[0]))
            lines.append("dropped: " + ", ".join(f"{n:,} {reason}" for reason, n in reasons))
        lines.append(f"tokens: {self.tokens:,} ({self.label_tokens:,} with loss)")
        lines.append(f"truncated: {_count(self.truncated_rows, 'row')} longer than max_length, "
                     f"{self.truncated_tokens:,} tokens cut" if self.truncated_rows else "truncated: none")
        return lines


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


@dataclass
class PreparedData:
    train: list[Example]
    eval: list[Example]
    stats: DataStats


class RowDropped(ValueError):
    """A row that cannot become a training example; `reason` is the key it is counted under."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------- reading

def _from_records(records: Any) -> pa.Table:
    if isinstance(records, dict):
        records = [records]
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError("expected a JSON array of objects, or one JSON object per line")
    names = dict.fromkeys(key for record in records for key in record)  # union of keys, first-seen order
    return pa.table({name: [record.get(name) for record in records] for name in names})


def _json_lines(text: str) -> list[Any]:
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"line {number}: {e}") from None
    return records


def _read_jsonl(path: Path) -> pa.Table:
    return _from_records(_json_lines(path.read_text(encoding="utf-8")))


def _read_json(path: Path) -> pa.Table:
    text = path.read_text(encoding="utf-8")
    try:
        return _from_records(json.loads(text))
    except json.JSONDecodeError:  # not one JSON document: JSON lines
        return _from_records(_json_lines(text))


def _read_csv(path: Path) -> pa.Table:
    table = pyarrow.csv.read_csv(path)
    return table.cast(pa.schema([pa.field(name, pa.string()) for name in table.column_names]))  # text, not numbers


_READERS: dict[str, Callable[[Path], pa.Table]] = {
    ".parquet": pyarrow.parquet.read_table,
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
}


def read_table(path: Path) -> pa.Table:
    """Read a .parquet, .jsonl, .json (array of objects or JSON lines) or .csv file into a table."""
    path = Path(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise UserError(f"unsupported dataset file type {path.suffix or '(no extension)'!r}", where=str(path),
                        fix="use .parquet, .jsonl, .json or .csv")
    if not path.is_file():
        raise UserError("dataset file not found", where=str(path))
    try:
        return reader(path)
    except (OSError, ValueError, pa.ArrowException) as e:
        raise UserError(f"cannot read dataset file: {e}", where=str(path)) from None


# ------------------------------------------------------------------------------- format detection

def _columns(fmt: str, mapping: ColumnMapping | None) -> list[str]:
    """The columns a format reads, after the mapping's overrides."""
    m = mapping or ColumnMapping()
    if fmt == MESSAGES:
        return [m.messages_column or "messages"]
    return [m.prompt_column or "prompt", m.completion_column or "completion"]


def detect_format(columns: list[str], mapping: ColumnMapping | None = None) -> str:
    """Return "messages" or "prompt-completion" for a table with these columns."""
    seen = ", ".join(columns) or "(none)"
    if mapping and (mapping.messages_column or mapping.prompt_column or mapping.completion_column):
        fmt = MESSAGES if mapping.messages_column else PROMPT_COMPLETION
        missing = [c for c in _columns(fmt, mapping) if c not in columns]
        if missing:
            raise UserError(f"dataset config names column(s) {', '.join(missing)} but the file has {seen}",
                            fix="fix messages_column / context_column / response_column in DatasetConfig")
        return fmt
    for fmt in (MESSAGES, PROMPT_COMPLETION):
        if all(c in columns for c in _columns(fmt, None)):
            return fmt
    raise UserError(f"unrecognised dataset columns: {seen}",
                    fix="expected a 'messages' column (OpenAI chat format) or 'prompt' and 'completion' columns, "
                        "or name the columns in DatasetConfig (messages_column, or context_column and "
                        "response_column)")


# ------------------------------------------------------------------------------------ rows to chats

def _checked(messages: Any) -> list[dict]:
    """Validate a list of {role, content} messages and keep only those two keys."""
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise RowDropped(MALFORMED)
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _turns(value: Any, role: str) -> list[dict]:
    """A prompt or completion cell: text becomes one `role` message; a list of messages is kept."""
    if isinstance(value, list):
        return _checked(value)
    if value is None or isinstance(value, str):
        return [{"role": role, "content": value or ""}]
    raise RowDropped(MALFORMED)


def row_to_messages(row: dict, fmt: str, mapping: ColumnMapping | None) -> list[dict]:
    """Turn one table row into chat messages; raise RowDropped with the reason it cannot be used."""
    columns = _columns(fmt, mapping)
    if fmt == MESSAGES:
        messages = _checked(row[columns[0]])
    else:
        messages = _turns(row[columns[0]], "user") + _turns(row[columns[1]], "assistant")
    assistant = [m for m in messages if m["role"] == "assistant"]
    if not assistant:
        raise RowDropped(NO_ASSISTANT)
    if any(not m["content"].strip() for m in assistant):
        raise RowDropped(EMPTY_CONTENT)
    return messages


# ------------------------------------------------------------------------------------ tokenization

def _common_prefix_len(a: str, b: str) -> int:
    """Length of the longest common prefix (binary search over C-speed comparisons)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        mid = (low + high + 1) // 2
        if b.startswith(a[:mid]):
            low = mid
        else:
            high = mid - 1
    return low


def _assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict], full: str,
                     limit: int) -> list[tuple[int, int]]:
    """Character spans of `full` that assistant turns produce, found by rendering prefixes.

    Start: the end of the prefix rendered with a generation prompt (so the role header is outside).
    End: the common prefix of the conversation rendered up to this turn and the full text, which
    takes in the end-of-turn marker (and, for the last turn, anything the template appends).
    Turns starting at or after character `limit` (cut by truncation) are not rendered.
    """
    def render(msgs: list[dict], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(messages[:i], True)
        if not full.startswith(prefix):
            raise RowDropped(NOT_PREFIX_STABLE)
        if len(prefix) >= limit:
            break
        end = len(full) if i == len(messages) - 1 else _common_prefix_len(render(messages[: i + 1], False), full)
        spans.append((len(prefix), end))
    return spans


def tokenize_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict],
                          max_length: int) -> tuple[Example, int]:
    """Tokenize a chat with its template; label assistant turns; cut to max_length.

    A token carries a label when it starts inside an assistant span and does not run past its end.
    Returns the example and how many tokens were cut. Raises RowDropped if the template rejects
    the conversation or renders it in a way that is not prefix-stable.
    """
    try:
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids: list[int] = encoding["input_ids"][:max_length]
        offsets = encoding["offset_mapping"][:max_length]
        limit = encoding["offset_mapping"][max_length][0] if len(encoding["input_ids"]) > max_length else len(full)
        spans = _assistant_spans(tokenizer, messages, full, limit)
    except TemplateError:
        raise RowDropped(TEMPLATE_ERROR) from None
    labels = []
    k = 0
    for token, (start, end) in zip(ids, offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        inside = k < len(spans) and spans[k][0] <= start and end <= spans[k][1]
        labels.append(token if inside else IGNORE)
    return Example(ids, labels), len(encoding["input_ids"]) - len(ids)


# ---------------------------------------------------------------------------------------- prepare

def _train_count(n: int, train_fraction: float) -> int:
    """Rows for training: all when the fraction is 1, else rounded and leaving at least one each side."""
    if train_fraction >= 1 or n < 2:
        return n
    return min(n - 1, max(1, round(n * train_fraction)))


def prepare(files: list[Path], tokenizer: PreTrainedTokenizerBase, *, max_length: int,
            mapping: ColumnMapping | None = None, shuffle: bool = True, seed: int = 42,
            train_test_split: float = 1.0) -> PreparedData:
    """Read every file, tokenize every usable row, shuffle (seeded) and split train/eval.

    `train_test_split` is the train fraction (Kaito: 1 = everything trains, 0.8 = 80/20). Rows that
    cannot be used are counted in `stats.rows_dropped`; if none are left, `train` is empty.
    """
    if not files:
        raise UserError("no dataset files to read", where="tuning.input")
    if not 0 < train_test_split <= 1:
        raise UserError(f"train_test_split must be in (0, 1], got {train_test_split}", where="DatasetConfig",
                        fix="use the fraction of rows that train, e.g. 0.9 (1 keeps no eval split)")
    if max_length < 1:
        raise UserError(f"max_length must be at least 1, got {max_length}")
    reports: list[FileReport] = []
    examples: list[Example] = []
    dropped: Counter[str] = Counter()
    truncated_rows = truncated_tokens = 0
    for path in map(Path, files):
        table = read_table(path)
        try:
            fmt = detect_format(table.column_names, mapping)
        except UserError as e:
            raise UserError(str(e), where=str(path)) from None
        if reports and fmt != reports[0].format:
            raise UserError(f"{path} is in {fmt} format but {reports[0].path} is in {reports[0].format} format",
                            fix="give all dataset files of one workspace the same format")
        reports.append(FileReport(str(path), fmt, table.num_rows))
        for row in table.select(_columns(fmt, mapping)).to_pylist():
            try:
                example, cut = tokenize_conversation(tokenizer, row_to_messages(row, fmt, mapping), max_length)
            except RowDropped as e:
                dropped[e.reason] += 1
                continue
            if all(label == IGNORE for label in example.labels):
                dropped[NO_LABELS] += 1
                continue
            truncated_rows += int(cut > 0)
            truncated_tokens += cut
            examples.append(example)

    if shuffle:
        examples = [examples[i] for i in np.random.default_rng(seed).permutation(len(examples))]
    n_train = _train_count(len(examples), train_test_split)
    train, evaluation = examples[:n_train], examples[n_train:]
    stats = DataStats(
        files=reports, rows_read=sum(r.rows for r in reports), rows_kept=len(examples), rows_dropped=dict(dropped),
        tokens=sum(len(e.input_ids) for e in examples),
        label_tokens=sum(label != IGNORE for e in examples for label in e.labels),
        truncated_rows=truncated_rows, truncated_tokens=truncated_tokens,
        train_rows=len(train), eval_rows=len(evaluation))
    return PreparedData(train=train, eval=evaluation, stats=stats)
