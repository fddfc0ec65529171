"""The dataset formats a DatasetConfig can name, each format's fields, and the explicit choice of
format and columns (`format`/`columns`, or Kaito's `*_column` keys), checked before any data is read.
How a row of each format becomes a sample is tuner.data.formats."""

from __future__ import annotations

from dataclasses import dataclass, field

from tuner.errors import UserError

FORMATS = ("messages", "prompt-completion", "dolly", "alpaca", "sharegpt", "text")
# Each format's fields in order, True where the field is required (detection needs it).
FIELDS: dict[str, dict[str, bool]] = {
    "messages": {"messages": True},
    "prompt-completion": {"prompt": True, "completion": True},
    "dolly": {"instruction": True, "context": False, "response": True},
    "alpaca": {"instruction": True, "input": False, "output": True, "system": False, "history": False},
    "sharegpt": {"conversations": True, "system": False},
    "text": {"text": True},
}
_LEGACY_KEYS = ("messages_column", "context_column", "response_column")


@dataclass(frozen=True)
class ColumnMapping:
    """An explicit choice of format and/or columns (DatasetConfig), overriding detection.

    `columns` maps a format's field to the file's column, e.g. {"prompt": "question"}. Without a
    format, the mapped fields narrow detection to the formats that have them all.
    """

    format: str | None = None
    columns: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.format is not None and self.format not in FORMATS:
            raise UserError(f"unknown format {self.format!r}", where="DatasetConfig.format",
                            fix=f"use one of {', '.join(FORMATS)}")
        if not isinstance(self.columns, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and v for k, v in self.columns.items()):
            raise UserError("must map field names to column names", where="DatasetConfig.columns",
                            fix="e.g. columns: {prompt: question, completion: answer}")
        known = list(FIELDS[self.format] if self.format else dict.fromkeys(f for fs in FIELDS.values() for f in fs))
        unknown = [k for k in self.columns if k not in known]
        if unknown:
            scope = f" for format {self.format}" if self.format else ""
            raise UserError(f"unknown field(s) {', '.join(unknown)}{scope}", where="DatasetConfig.columns",
                            fix=f"fields are: {', '.join(known)}")

    @classmethod
    def from_dataset_config(cls, dataset: dict) -> ColumnMapping | None:
        """Read `format`/`columns` (tuner's keys) or Kaito's `*_column` keys; None when none is set.

        Kaito's keys: `messages_column` -> messages; `context_column` + `response_column` ->
        prompt-completion; `response_column` alone -> text in that column.
        """
        legacy = {key: dataset[key] for key in _LEGACY_KEYS if dataset.get(key) not in (None, "")}
        for key, value in legacy.items():
            if not isinstance(value, str):
                raise UserError(f"must be a column name, got {value!r}", where=f"DatasetConfig.{key}")
        fmt, columns = dataset.get("format"), dataset.get("columns")
        if legacy and (fmt is not None or columns is not None):
            raise UserError("Kaito's *_column keys cannot be combined with format/columns",
                            where=f"DatasetConfig.{next(iter(legacy))}",
                            fix="name the columns in DatasetConfig.columns instead")
        if "messages_column" in legacy and len(legacy) > 1:
            raise UserError("cannot be combined with context_column/response_column",
                            where="DatasetConfig.messages_column",
                            fix="use messages_column for a chat column, or context_column and response_column "
                                "for prompt and completion columns")
        if "context_column" in legacy and "response_column" not in legacy:
            raise UserError("needs response_column (the completion column) too", where="DatasetConfig.context_column")
        if "messages_column" in legacy:
            return cls("messages", {"messages": legacy["messages_column"]})
        if "context_column" in legacy:
            return cls("prompt-completion",
                       {"prompt": legacy["context_column"], "completion": legacy["response_column"]})
        if "response_column" in legacy:
            return cls("text", {"text": legacy["response_column"]})
        if fmt is None and columns is None:
            return None
        return cls(fmt, {} if columns is None else columns)
