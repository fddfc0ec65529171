"""Dataset files -> streamed chunks of row dicts, in bounded memory.

Kinds: Parquet, JSON lines, JSON (an array of objects, an object of column lists, or JSON lines),
CSV (every cell read as text) and Arrow IPC (file or stream format, e.g. the shards Hugging Face
`save_to_disk` writes), each optionally compressed as `.gz` or `.zst`. Compressed Parquet and Arrow
files need random access, so they are first decompressed to a temporary file. Only `.json` files
are loaded whole; everything else streams a chunk at a time.

A row that cannot be decoded (a JSON line that is not valid UTF-8 or not valid JSON) becomes a
bad row of its chunk; a file that cannot be read at all (truncated, corrupt) raises `UserError`.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
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
    """The file's bytes, decompressed as they are read."""
    with open(path, "rb") as raw:
        if compression == ".gz":
            with gzip.GzipFile(fileobj=raw) as stream:
                yield stream
        elif compression == ".zst":
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            with io.BufferedReader(reader, 1 << 20) as stream:  # type: ignore[arg-type]
                yield stream
        else:
            yield raw


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
            for row in batch.slice(start, chunk_rows).to_pylist():
                yield row, None, None


def _parquet(path: Path, compression: str, chunk_rows: int) -> Iterator[_Item]:
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


def _arrow(path: Path, compression: str, chunk_rows: int) -> Iterator[_Item]:
    with _ipc_batches(path, compression) as (_, batches):
        yield from _arrow_rows(batches, chunk_rows)


def _csv_reader(stream: IO[bytes], names: list[str] | None = None) -> pa_csv.CSVStreamingReader:
    convert = pa_csv.ConvertOptions(column_types=dict.fromkeys(names, pa.binary())) if names else None
    return pa_csv.open_csv(stream, read_options=_CSV_READ, parse_options=_CSV_PARSE, convert_options=convert)


def _csv(path: Path, compression: str, chunk_rows: int) -> Iterator[_Item]:
    """CSV rows with every cell as text (bytes decoded here, so bad UTF-8 spoils one row, not the file)."""
    with _open(path, compression) as stream:
        names = _csv_reader(stream).schema.names
    with _open(path, compression) as stream:
        for row, _, _ in _arrow_rows(_csv_reader(stream, names), chunk_rows):
            try:
                yield {k: None if v is None else v.decode() for k, v in row.items()}, None, None
            except UnicodeDecodeError:
                yield None, INVALID_UTF8, None


def _json_lines(stream: Iterable[bytes]) -> Iterator[_Item]:
    for number, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            text = line.removeprefix(codecs.BOM_UTF8).decode("utf-8") if number == 1 else line.decode("utf-8")
        except UnicodeDecodeError:
            yield None, INVALID_UTF8, number
            continue
        try:
            row = json.loads(text)
        except ValueError:
            yield None, INVALID_JSON, number
            continue
        yield (row, None, number) if isinstance(row, dict) else (None, NOT_AN_OBJECT, number)


def _jsonl(path: Path, compression: str, chunk_rows: int) -> Iterator[_Item]:
    with _open(path, compression) as stream:
        yield from _json_lines(stream)


def _first_line_is_object(data: bytes) -> bool:
    line = next((line for line in io.BytesIO(data) if line.strip()), b"")
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _json(path: Path, compression: str, chunk_rows: int) -> Iterator[_Item]:
    """A JSON array of objects, an object of equally long column lists, one object, or JSON lines."""
    with _open(path, compression) as stream:
        data = stream.read()
    try:
        doc = json.loads(data)
    except ValueError as e:
        if _first_line_is_object(data):  # several JSON documents: JSON lines
            yield from _json_lines(io.BytesIO(data))
            return
        raise UserError(f"invalid JSON ({e})", where=str(path)) from None
    if isinstance(doc, dict) and doc and all(isinstance(v, list) for v in doc.values()):
        if len({len(v) for v in doc.values()}) > 1:
            raise UserError("the JSON object's column lists differ in length", where=str(path))
        doc = [dict(zip(doc, values)) for values in zip(*doc.values())]
    for row in doc if isinstance(doc, list) else [doc]:
        yield (row, None, None) if isinstance(row, dict) else (None, NOT_AN_OBJECT, None)


_READERS = {".parquet": _parquet, ".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".arrow": _arrow}


def iter_chunks(path: Path, chunk_rows: int = 2048) -> Iterator[RowChunk]:
    """The file's rows in chunks of `chunk_rows` (the last one shorter), streamed from disk."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    path = Path(path)
    suffix, compression = _checked_kind(path)
    rows: list[dict | None] = []
    bad: dict[int, str] = {}
    lines: list[int | None] = []
    first = 1
    with _corrupt_is_user_error(path, suffix):
        for row, reason, line in _READERS[suffix](path, compression, chunk_rows):
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
