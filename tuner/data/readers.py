"""Dataset files -> streamed chunks of row dicts, in bounded memory.

Kinds: Parquet, JSON lines, JSON (an array of objects, an object of column lists, or JSON lines),
CSV (every cell read as text) and Arrow IPC (file or stream format, e.g. the shards Hugging Face
`save_to_disk` writes), each optionally compressed as `.gz` or `.zst`. Compressed Parquet and Arrow
files need random access, so they are first decompressed to a temporary file. Only `.json` files
are loaded whole; everything else streams a chunk at a time.

A row that cannot be decoded (a JSON line that is not valid UTF-8 or not valid JSON, nested too
deeply, longer than `max_row_bytes`, or an Arrow value Python cannot hold such as a timestamp out
of range) becomes a bad row of its chunk; a file that cannot be read at all (truncated, corrupt)
raises `UserError`.

Hostile files end in one error line, in bounded memory: decompression stops at
`TUNER_MAX_DECOMPRESSED_BYTES` (default 64 GiB) and at a ratio no real dataset reaches
(MAX_RATIO; measured here: gzip -6 packs JSON lines of chat text 3-5x, zstd -19 up to 8x, an
all-zero bomb over 1000x); a JSON line is read at most `max_row_bytes` at a time, and a `.json`
document (parsed whole) may be at most MAX_JSON_DOCUMENT_BYTES.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.ipc as pa_ipc
import pyarrow.parquet as pq
import zstandard

from tuner.errors import UserError

SUPPORTED_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv", ".arrow")
COMPRESSIONS = (".gz", ".zst")
KINDS = f"{', '.join(SUPPORTED_SUFFIXES)} (each optionally compressed as {' or '.join(COMPRESSIONS)})"

INVALID_UTF8 = "invalid UTF-8"
INVALID_JSON = "invalid JSON"
NOT_AN_OBJECT = "not a JSON object"
TOO_DEEP = "JSON nested too deeply"
TOO_LARGE = "row too large"
UNREADABLE_VALUE = "value Python cannot represent"

MAX_DECOMPRESSED_BYTES = 64 << 30  # per file, unless TUNER_MAX_DECOMPRESSED_BYTES says otherwise
MAX_RATIO = 100  # decompressed / compressed bytes, checked once RATIO_AFTER bytes came out
RATIO_AFTER = 64 << 20
MAX_JSON_DOCUMENT_BYTES = 1 << 30  # a .json file is parsed whole: larger ones belong in JSON lines
DEFAULT_MAX_ROW_BYTES = 64 << 20

# Metadata that Hugging Face `save_to_disk` writes beside its .arrow shards: not rows.
_HF_METADATA = frozenset({"dataset_info.json", "state.json", "dataset_dict.json"})
_CORRUPT = (OSError, EOFError, zlib.error, zstandard.ZstdError, pa.ArrowException)
_CSV_PARSE = pa_csv.ParseOptions(newlines_in_values=True)
_CSV_READ = pa_csv.ReadOptions(block_size=1 << 24, use_threads=False)  # a block holds whole rows

_Item = tuple[dict | None, str | None, int | None]  # row (None if bad), why it is bad, JSON line number


@dataclass
class RowChunk:
    """Consecutive rows of one file.

    Rows are numbered from 1 in file order, counting every record (bad ones too) and nothing else:
    not a CSV header, not the blank lines of JSON lines. `lines` (JSON lines only, else None) gives
    each row's 1-based line number, which differs from the row number after a blank line.
    """

    first_row: int
    rows: list[dict | None]  # None where the row could not be decoded
    bad: dict[int, str] = field(default_factory=dict)  # row number -> reason, e.g. "invalid JSON"
    lines: list[int] | None = None


def _kind(path: Path) -> tuple[str, str] | None:
    """(suffix, compression) of a supported file name, e.g. (".jsonl", ".gz"); None if unsupported."""
    name = path.name.lower()
    compression = next((c for c in COMPRESSIONS if name.endswith(c)), "")
    suffix = Path(name.removesuffix(compression)).suffix if compression else Path(name).suffix
    return (suffix, compression) if suffix in SUPPORTED_SUFFIXES else None


def _checked_kind(path: Path) -> tuple[str, str]:
    kind = _kind(path)
    if kind is None:
        raise UserError("unsupported dataset file kind", where=str(path), fix=f"use {KINDS}")
    if not path.is_file():
        raise UserError("dataset file not found", where=str(path))
    return kind


def dataset_files(paths: Iterable[Path]) -> list[Path]:
    """The dataset files among `paths`, directories expanded recursively in sorted order.

    Inside directories, hidden files and folders, unsupported kinds and Hugging Face metadata
    (`dataset_info.json`, `state.json`, `dataset_dict.json`) are skipped; a file given by name must
    be of a supported kind.
    """
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p) and p.name not in _HF_METADATA
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise UserError("no dataset files in this directory", where=str(path), fix=f"add {KINDS} files")
            files += found
        elif path.exists():
            _checked_kind(path)
            files.append(path)
        else:
            raise UserError("dataset path not found", where=str(path),
                            fix="create it, or correct the path (relative paths start at the Workspace file)")
    return files


@contextmanager
def _corrupt_is_user_error(path: Path, suffix: str) -> Iterator[None]:
    try:
        yield
    except PermissionError as e:
        raise UserError(f"cannot read the file ({e.strerror})", where=str(path),
                        fix="make it readable by the user tuner runs as") from None
    except _CORRUPT as e:
        raise UserError(f"the {suffix.lstrip('.')} file is truncated or corrupt ({str(e).splitlines()[0][:160]})",
                        where=str(path), fix=f"re-create or re-upload it as a complete {KINDS} file") from None


@contextmanager
def _open(path: Path, compression: str) -> Iterator[IO[bytes]]:
    """The file's bytes, decompressed as they are read (within the decompression limits)."""
    with open(path, "rb") as raw:
        if compression == ".gz":
            # gzip's own read buffer size (128 KiB): a bigger one shows up in the flat-memory test
            with gzip.GzipFile(fileobj=raw) as inflating, \
                    io.BufferedReader(_Bounded(inflating, raw, path), 1 << 17) as stream:
                yield stream
        elif compression == ".zst":
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            with io.BufferedReader(_Bounded(reader, raw, path), 1 << 20) as stream:  # type: ignore[arg-type]
                yield stream
        else:
            yield raw


def max_decompressed_bytes() -> int:
    value = os.environ.get("TUNER_MAX_DECOMPRESSED_BYTES", "").strip()
    if not value:
        return MAX_DECOMPRESSED_BYTES
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"TUNER_MAX_DECOMPRESSED_BYTES must be a positive number of bytes, not {value[:40]!r}",
                        where="TUNER_MAX_DECOMPRESSED_BYTES")
    return int(value)


class _Bounded(io.RawIOBase):
    """A decompressing stream that refuses to give more than the limit, or more than MAX_RATIO times
    the compressed bytes read so far: a decompression bomb ends as one error naming the file, after
    at most RATIO_AFTER bytes."""

    def __init__(self, stream: Any, raw: IO[bytes], path: Path):
        self.stream, self.raw, self.path = stream, raw, path
        self.limit = max_decompressed_bytes()
        self.total = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self.stream.readinto(buffer)  # into the caller's buffer: no copy of a megabyte per read
        self.total += count
        if self.total > self.limit:
            raise UserError(f"decompresses to more than {self.limit:,} bytes", where=str(self.path),
                            fix="raise TUNER_MAX_DECOMPRESSED_BYTES if the file is genuine, or check it")
        compressed = max(self.raw.tell(), 1)
        if self.total > RATIO_AFTER and self.total > MAX_RATIO * compressed:
            raise UserError(f"decompresses more than {MAX_RATIO}x ({compressed:,} bytes give over "
                            f"{self.total:,}): no dataset compresses that well, this is a decompression bomb",
                            where=str(self.path), fix="use the real dataset file")
        return count



@contextmanager
def _seekable(path: Path, compression: str) -> Iterator[Any]:
    """A source with random access: the path itself, or the file decompressed to a temporary file."""
    if not compression:
        yield str(path)
        return
    with tempfile.TemporaryFile() as tmp, _open(path, compression) as stream:
        shutil.copyfileobj(stream, tmp, 1 << 20)
        tmp.seek(0)
        yield tmp


def _arrow_rows(batches: Iterable[pa.RecordBatch], chunk_rows: int) -> Iterator[_Item]:
    for batch in batches:
        for start in range(0, batch.num_rows, chunk_rows):  # no more than a chunk as Python objects
            part = batch.slice(start, chunk_rows)
            try:
                rows = part.to_pylist()
            except (ValueError, OverflowError, pa.ArrowException):  # e.g. a timestamp past year 9999
                yield from _rows_one_by_one(part)
                continue
            for row in rows:
                yield row, None, None


def _rows_one_by_one(batch: pa.RecordBatch) -> Iterator[_Item]:
    """A batch with values Python cannot hold: each row alone, the failing ones as bad rows."""
    for index in range(batch.num_rows):
        try:
            [row] = batch.slice(index, 1).to_pylist()
        except (ValueError, OverflowError, pa.ArrowException):
            yield None, UNREADABLE_VALUE, None
            continue
        yield row, None, None


def _parquet(path: Path, compression: str, chunk_rows: int, max_row_bytes: int) -> Iterator[_Item]:
    with _seekable(path, compression) as source:
        # pre_buffer off: read one row group at a time (on, pyarrow buffers the whole file's columns).
        batches = pq.ParquetFile(source, pre_buffer=False).iter_batches(batch_size=chunk_rows, use_threads=False)
        yield from _arrow_rows(batches, chunk_rows)


@contextmanager
def _ipc_batches(path: Path, compression: str) -> Iterator[tuple[pa.Schema, Iterable[pa.RecordBatch]]]:
    """The schema and record batches of an Arrow IPC file, in file or stream format."""
    with _seekable(path, compression) as source:
        with pa.memory_map(source) if isinstance(source, str) else pa.PythonFile(source, mode="r") as f:
            try:
                reader = pa_ipc.open_file(f)
                batches: Iterable[pa.RecordBatch] = (reader.get_batch(i) for i in range(reader.num_record_batches))
            except pa.ArrowInvalid:  # no file footer: the stream format
                f.seek(0)
                reader = batches = pa_ipc.open_stream(f)
            yield reader.schema, batches


def _arrow(path: Path, compression: str, chunk_rows: int, max_row_bytes: int) -> Iterator[_Item]:
    with _ipc_batches(path, compression) as (_, batches):
        yield from _arrow_rows(batches, chunk_rows)


def _csv_reader(stream: IO[bytes], names: list[str] | None = None) -> pa_csv.CSVStreamingReader:
    convert = pa_csv.ConvertOptions(column_types=dict.fromkeys(names, pa.binary())) if names else None
    return pa_csv.open_csv(stream, read_options=_CSV_READ, parse_options=_CSV_PARSE, convert_options=convert)


def _csv(path: Path, compression: str, chunk_rows: int, max_row_bytes: int) -> Iterator[_Item]:
    """CSV rows with every cell as text (bytes decoded here, so bad UTF-8 spoils one row, not the file)."""
    with _open(path, compression) as stream:
        names = _csv_reader(stream).schema.names
    with _open(path, compression) as stream:
        for row, _, _ in _arrow_rows(_csv_reader(stream, names), chunk_rows):
            try:
                yield {k: None if v is None else v.decode() for k, v in row.items()}, None, None
            except UnicodeDecodeError:
                yield None, INVALID_UTF8, None


def _json_lines(stream: IO[bytes], max_row_bytes: int) -> Iterator[_Item]:
    """JSON lines, each read at most `max_row_bytes` at a time: a longer line is skipped unread."""
    number = 0
    while line := stream.readline(max_row_bytes + 1):
        number += 1
        if len(line) > max_row_bytes and not line.endswith(b"\n"):
            while (rest := stream.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass
            yield None, TOO_LARGE, number
            continue
        if not line.strip():
            continue
        try:
            text = line.removeprefix(codecs.BOM_UTF8).decode("utf-8") if number == 1 else line.decode("utf-8")
        except UnicodeDecodeError:
            yield None, INVALID_UTF8, number
            continue
        try:
            row = json.loads(text)
        except RecursionError:
            yield None, TOO_DEEP, number
            continue
        except ValueError:
            yield None, INVALID_JSON, number
            continue
        yield (row, None, number) if isinstance(row, dict) else (None, NOT_AN_OBJECT, number)


def _jsonl(path: Path, compression: str, chunk_rows: int, max_row_bytes: int) -> Iterator[_Item]:
    with _open(path, compression) as stream:
        yield from _json_lines(stream, max_row_bytes)


def _first_line_is_object(data: bytes) -> bool:
    line = next((line for line in io.BytesIO(data) if line.strip()), b"")
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, RecursionError):
        return False


def _json(path: Path, compression: str, chunk_rows: int, max_row_bytes: int) -> Iterator[_Item]:
    """A JSON array of objects, an object of equally long column lists, one object, or JSON lines."""
    data = bytearray()
    with _open(path, compression) as stream:  # a megabyte at a time: read(limit) would allocate it at once
        while (piece := stream.read(1 << 20)) and len(data) <= MAX_JSON_DOCUMENT_BYTES:
            data += piece
    if len(data) > MAX_JSON_DOCUMENT_BYTES:
        raise UserError(f"the JSON document is larger than {MAX_JSON_DOCUMENT_BYTES:,} bytes, and a .json file "
                        "is parsed whole", where=str(path), fix="write it as JSON lines (.jsonl): one row per line")
    try:
        doc = json.loads(data)
    except RecursionError:
        raise UserError("the JSON is nested too deeply to parse", where=str(path),
                        fix="a dataset row nests a few levels; check the file") from None
    except ValueError as e:
        if _first_line_is_object(data):  # several JSON documents: JSON lines
            yield from _json_lines(io.BytesIO(data), max_row_bytes)
            return
        raise UserError(f"invalid JSON ({str(e)[:160]})", where=str(path)) from None
    if isinstance(doc, dict) and doc and all(isinstance(v, list) for v in doc.values()):
        if len({len(v) for v in doc.values()}) > 1:
            raise UserError("the JSON object's column lists differ in length", where=str(path))
        doc = [dict(zip(doc, values, strict=True)) for values in zip(*doc.values(), strict=True)]
    for row in doc if isinstance(doc, list) else [doc]:
        yield (row, None, None) if isinstance(row, dict) else (None, NOT_AN_OBJECT, None)


_READERS = {".parquet": _parquet, ".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".arrow": _arrow}


def iter_chunks(path: Path, chunk_rows: int = 2048, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> Iterator[RowChunk]:
    """The file's rows in chunks of `chunk_rows` (the last one shorter), streamed from disk.

    A JSON line over `max_row_bytes` is a bad row, never read whole (other kinds' rows are checked
    for size after reading, by the caller).
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    path = Path(path)
    suffix, compression = _checked_kind(path)
    rows: list[dict | None] = []
    bad: dict[int, str] = {}
    lines: list[int | None] = []
    first = 1
    with _corrupt_is_user_error(path, suffix):
        for row, reason, line in _READERS[suffix](path, compression, chunk_rows, max_row_bytes):
            if reason:
                bad[first + len(rows)] = reason
            rows.append(row)
            lines.append(line)
            if len(rows) == chunk_rows:
                yield _chunk(first, rows, bad, lines)
                first += chunk_rows
                rows, bad, lines = [], {}, []
    if rows:
        yield _chunk(first, rows, bad, lines)


def _chunk(first: int, rows: list[dict | None], bad: dict[int, str], lines: list[int | None]) -> RowChunk:
    return RowChunk(first, rows, bad, None if lines[0] is None else lines)  # type: ignore[arg-type]


def file_columns(path: Path) -> list[str]:
    """The file's column names: the schema or CSV header; for JSON, the keys of its first chunk's rows."""
    path = Path(path)
    suffix, compression = _checked_kind(path)
    with _corrupt_is_user_error(path, suffix):
        if suffix == ".parquet":
            with _seekable(path, compression) as source:
                return pq.ParquetFile(source).schema_arrow.names
        if suffix == ".arrow":
            with _ipc_batches(path, compression) as (schema, _):
                return schema.names
        if suffix == ".csv":
            with _open(path, compression) as stream:
                return _csv_reader(stream).schema.names
        first = next(iter_chunks(path), RowChunk(1, []))
        return list(dict.fromkeys(key for row in first.rows if row for key in row))
