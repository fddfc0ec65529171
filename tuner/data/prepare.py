"""Dataset files -> prepared training examples on disk, with a report of everything done to them.

Files are streamed chunk by chunk (tuner.readers), each row turned into a chat or a text
(tuner.formats), rendered and tokenized in batches (tuner.encode) and appended to an Arrow file
(tuner.store). Only per-row lengths stay in memory, so memory is flat as the data grows. Rows
that cannot be used are dropped and counted with the first few row numbers per reason, or, under
`bad_rows: error`, stop the job naming the file and row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tuner.data import formats, readers
from tuner.data.encode import TOO_LONG, Encoder
from tuner.data.store import ExampleStore, StoreWriter
from tuner.errors import UserError
from tuner.observe import events
from tuner.spec.config_sections import DatasetSection

ROWS_NAMED_PER_REASON = 5
STORE_FILE = "examples.arrow"
TOO_MANY_TURNS = "too many turns"
# A row no training example can use is dropped before the tokenizer sees it (the tokenizer's Rust
# core panics, not errs, on a 200 MB string): over ROW_HEADROOM x max_length x the tokenizer's
# longest token in bytes (no text yields fewer tokens than that), and at least MIN_ROW_LIMIT bytes;
# a conversation of more turns than max_length / 2 (a turn costs at least two tokens of template).
ROW_HEADROOM = 4
MIN_ROW_LIMIT = 1 << 20
MIN_TURN_LIMIT = 64


@dataclass
class Dropped:
    """How many rows one reason dropped, and where the first few were."""

    count: int = 0
    rows: list[str] = field(default_factory=list)


@dataclass
class FileReport:
    path: str
    format: str
    description: str
    rows: int
    ignored_columns: list[str] = field(default_factory=list)


@dataclass
class DataStats:
    files: list[FileReport]
    rows_read: int
    rows_kept: int
    dropped: dict[str, Dropped]
    tokens: int
    label_tokens: int
    max_length: int
    long_row_policy: str
    long_rows: int
    truncated_rows: int
    truncated_tokens: int
    length_p50: int
    length_p95: int
    length_max: int
    train_rows: int
    eval_rows: int

    def report(self) -> None:
        """The human report as info lines, then the `data.prepared` event with the numbers."""
        for line in self.log_lines():
            events.info(line)
        events.emit("data.prepared", f"data: {self.train_rows:,} train / {self.eval_rows:,} eval rows, "
                                     f"{self.tokens:,} tokens ({self.label_tokens:,} with loss)",
                    metrics={"rows_read": self.rows_read, "rows_kept": self.rows_kept, "train_rows": self.train_rows,
                             "eval_rows": self.eval_rows, "tokens": self.tokens, "label_tokens": self.label_tokens,
                             "length_p50": self.length_p50, "length_p95": self.length_p95,
                             "length_max": self.length_max},
                    data={"files": [f.path for f in self.files],
                          "dropped": {k: d.count for k, d in self.dropped.items()}})

    def log_lines(self) -> list[str]:
        """The human report: a `format:` line per file first, then rows, drops, lengths."""
        lines = [f"format: {f.description}, {_rows(f.rows)} ({Path(f.path).name})"
                 + (f"; column{'s' if len(f.ignored_columns) > 1 else ''} {', '.join(f.ignored_columns)} ignored"
                    if f.ignored_columns else "") for f in self.files]
        dropped = sum(d.count for d in self.dropped.values())
        lines.append(f"rows: {self.rows_read:,} read, {self.rows_kept:,} kept, {dropped:,} dropped; "
                     f"{self.train_rows:,} train / {self.eval_rows:,} eval")
        for reason, d in sorted(self.dropped.items(), key=lambda item: -item[1].count):
            lines.append(f"dropped: {d.count:,} {reason} (e.g. {', '.join(d.rows)})")
        lines.append(f"tokens: {self.tokens:,} ({self.label_tokens:,} with loss); length p50 {self.length_p50:,}, "
                     f"p95 {self.length_p95:,}, max {self.length_max:,}")
        over = f"{self.long_rows:,} rows longer than max_length {self.max_length:,}"
        if not self.long_rows:
            lines.append(f"length: no row is longer than max_length {self.max_length:,}")
        elif self.long_row_policy == "truncate":
            lines.append(f"length: {over}: {self.truncated_rows:,} truncated, {self.truncated_tokens:,} tokens cut")
        else:
            lines.append(f"length: {over}: dropped")
        return lines


def require_training_rows(stats: DataStats) -> None:
    """Refuse data that leaves no row to train on: the one rule `tuner run` and `tuner check-data` share."""
    if stats.rows_kept:
        return
    names = ", ".join(Path(f.path).name for f in stats.files) or "the inputs"
    if not stats.rows_read:
        raise UserError(f"no training rows: {names} hold{'s' if len(stats.files) == 1 else ''} no rows",
                        fix="give files with at least one row")
    reasons = [f"{d.count:,} {reason} (e.g. {d.rows[0]})"
               for reason, d in sorted(stats.dropped.items(), key=lambda item: -item[1].count)]
    fix = "fix those rows or the dataset's format and roles (the report above names them)"
    if TOO_LONG in stats.dropped:
        fix += f"; raise TrainingArguments.max_length ({stats.max_length:,}) or set DatasetConfig.long_rows: truncate"
    raise UserError(f"no training rows are left: all {stats.rows_read:,} rows of {names} were dropped: "
                    f"{', '.join(reasons)}", fix=fix)


def _rows(n: int) -> str:
    return f"{n:,} row" + ("" if n == 1 else "s")


class IndexedExamples:
    """A train or eval split: `examples[i]` -> (input_ids, labels) through the memory-mapped store."""

    def __init__(self, store: ExampleStore, indices: np.ndarray):
        self.store, self.indices = store, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[list[int], list[int]]:
        return self.store[int(self.indices[i])]

    @property
    def lengths(self) -> np.ndarray:
        return self.store.lengths[self.indices]


@dataclass
class PreparedData:
    train: IndexedExamples
    eval: IndexedExamples
    stats: DataStats


def prepare(files: list[Path], tokenizer, *, max_length: int, out_dir: Path, dataset: DatasetSection | None = None,
            chunk_rows: int = 2048) -> PreparedData:
    """Read every file, encode every usable row into `out_dir`, then shuffle (seeded) and split, as the
    DatasetConfig says (format and columns, shuffle, train_test_split, bad- and long-row policies)."""
    dataset = dataset or DatasetSection()
    mapping, bad_rows, long_rows = dataset.mapping(), dataset.bad_rows, dataset.long_rows
    paths = readers.dataset_files([Path(f) for f in files])
    detected = _detect_formats(paths, mapping)
    row_limit, turn_limit = row_limits(tokenizer, max_length)
    encoder = Encoder(tokenizer, max_length, long_rows)
    writer = StoreWriter(out_dir / STORE_FILE)
    tally = _Tally(bad_rows)
    try:
        for path, fmt in detected:
            rows_in_file = 0
            for chunk in readers.iter_chunks(path, chunk_rows, row_limit):
                samples = []
                for number, row in enumerate(chunk.rows, chunk.first_row):
                    if row is None:
                        tally.drop(path, number, chunk.bad.get(number, "unreadable row"))
                        continue
                    if _larger_than(row, row_limit):
                        tally.drop(path, number, readers.TOO_LARGE)
                        continue
                    try:
                        sample = formats.to_sample(row, fmt)
                    except formats.RowDropped as dropped:
                        tally.drop(path, number, dropped.reason)
                        continue
                    if isinstance(sample, list) and len(sample) > turn_limit:
                        tally.drop(path, number, TOO_MANY_TURNS)
                        continue
                    samples.append((number, sample))
                rows_in_file += len(chunk.rows)
                encoded = encoder.encode(samples)
                for number, reason in encoded.dropped:
                    tally.drop(path, number, reason)
                if long_rows == "error" and encoded.long_rows:
                    number, tokens = encoded.long_rows[0]
                    raise UserError(f"row {number} has {tokens:,} tokens, more than max_length {max_length:,}",
                                    where=str(path), fix="raise TrainingArguments.max_length, or set "
                                                         "DatasetConfig.long_rows to truncate or drop")
                tally.add(encoded)
                writer.write(encoded.ids, encoded.mask, encoded.lengths)
            tally.files.append(FileReport(str(path), fmt.name, fmt.description, rows_in_file, list(fmt.ignored)))
    finally:
        writer.close()
    store = ExampleStore(out_dir / STORE_FILE)
    order = (np.random.default_rng(dataset.shuffle_seed).permutation(len(store)) if dataset.shuffle_dataset
             else np.arange(len(store)))
    n_train = _train_count(len(store), dataset.train_test_split)
    train, evaluation = IndexedExamples(store, order[:n_train]), IndexedExamples(store, order[n_train:])
    return PreparedData(train, evaluation, tally.stats(max_length, long_rows, len(train), len(evaluation)))


def row_limits(tokenizer, max_length: int) -> tuple[int, int]:
    """(bytes, turns) past which a row cannot become a training example of `max_length` tokens."""
    longest = max((len(token.encode("utf-8", "replace")) for token in tokenizer.get_vocab()), default=16)
    return max(MIN_ROW_LIMIT, ROW_HEADROOM * max_length * longest), max(MIN_TURN_LIMIT, max_length // 2)


def _larger_than(row: dict, limit: int) -> bool:
    """Whether the row's text (every string in it, at any depth) adds up to more than `limit` bytes,
    found without walking more of it than that."""
    total, stack = 0, [row]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            total += len(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
            total += len(value)
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
            total += len(value)
        else:
            total += 1
        if total > limit:
            return True
    return False


def _detect_formats(paths: list[Path], mapping) -> list[tuple[Path, formats.Format]]:
    detected = []
    for path in paths:
        columns = readers.file_columns(path)
        if not columns:
            raise UserError("the file holds no rows (or only rows without fields)", where=str(path),
                            fix="give files with at least one row in one of the formats tuner reads")
        fmt = formats.detect_format(columns, mapping, where=str(path))
        if detected and fmt.name != detected[0][1].name:
            first = detected[0]
            raise UserError(f"{path.name} is in {fmt.name} format but {first[0].name} is in {first[1].name} format",
                            where=str(path), fix="give one workspace files of a single format")
        detected.append((path, fmt))
    return detected


def _train_count(n: int, train_fraction: float) -> int:
    """Rows that train: all at 1, else rounded, leaving at least one row on each side."""
    if train_fraction >= 1 or n < 2:
        return n
    return min(n - 1, max(1, round(n * train_fraction)))


class _Tally:
    """Running counts while the files stream through."""

    def __init__(self, bad_rows: str):
        self.bad_rows = bad_rows
        self.files: list[FileReport] = []
        self.dropped: dict[str, Dropped] = {}
        self.lengths: list[np.ndarray] = []
        self.kept = self.tokens = self.label_tokens = 0
        self.long_rows = self.truncated_rows = self.truncated_tokens = 0

    def drop(self, path: Path, number: int, reason: str) -> None:
        if self.bad_rows == "error":
            raise UserError(f"row {number}: {reason}", where=str(path),
                            fix="fix or remove the row, or set DatasetConfig.bad_rows: drop to skip such rows")
        entry = self.dropped.setdefault(reason, Dropped())
        entry.count += 1
        if len(entry.rows) < ROWS_NAMED_PER_REASON:
            entry.rows.append(f"{path.name} row {number}")

    def add(self, encoded) -> None:
        self.kept += len(encoded.lengths)
        self.tokens += int(encoded.lengths.sum())
        self.label_tokens += int(encoded.mask.sum())
        self.lengths.append(np.asarray(encoded.full_lengths, dtype=np.int32))
        self.long_rows += len(encoded.long_rows)
        cut = {number for number, _ in encoded.long_rows} - {number for number, _ in encoded.dropped}
        self.truncated_rows += len(cut) if encoded.truncated_tokens else 0
        self.truncated_tokens += encoded.truncated_tokens

    def stats(self, max_length: int, long_rows: str, train_rows: int, eval_rows: int) -> DataStats:
        lengths = np.concatenate([np.zeros(0, dtype=np.int32), *self.lengths])
        if not lengths.size:  # every row was dropped: the report still prints, the caller refuses the job
            lengths = np.zeros(1, dtype=np.int32)
        return DataStats(
            files=self.files, rows_read=sum(f.rows for f in self.files), rows_kept=self.kept, dropped=self.dropped,
            tokens=self.tokens, label_tokens=self.label_tokens, max_length=max_length, long_row_policy=long_rows,
            long_rows=self.long_rows, truncated_rows=self.truncated_rows, truncated_tokens=self.truncated_tokens,
            length_p50=int(np.percentile(lengths, 50)), length_p95=int(np.percentile(lengths, 95)),
            length_max=int(lengths.max()), train_rows=train_rows, eval_rows=eval_rows)
