"""tuner.readers: every file kind, compression, directory walking, bad rows, corrupt files, streaming."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as pa_ipc
import pyarrow.parquet as pq
import pytest
import zstandard

from tuner.data import readers
from tuner.data.readers import (
    INVALID_JSON,
    INVALID_UTF8,
    NOT_AN_OBJECT,
    RowChunk,
    dataset_files,
    file_columns,
    iter_chunks,
)
from tuner.errors import UserError

ROWS = [{"prompt": f"question {i}?", "completion": f"answer {i}."} for i in range(5)]


def read(path: Path, chunk_rows: int = 2048) -> list[RowChunk]:
    return list(iter_chunks(path, chunk_rows))


def all_rows(path: Path) -> list[dict | None]:
    return [row for chunk in read(path) for row in chunk.rows]


def jsonl_bytes(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def write_parquet(path: Path, rows: list[dict], **kwargs) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path, **kwargs)
    return path


def write_arrow(path: Path, rows: list[dict], stream: bool) -> Path:
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(path), "wb") as sink:
        writer = pa_ipc.new_stream if stream else pa_ipc.new_file
        with writer(sink, table.schema) as w:
            w.write_table(table, max_chunksize=2)
    return path


# -------------------------------------------------------------------------------------- file kinds

def test_parquet_chunks_number_rows_from_one(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", ROWS, row_group_size=2)
    chunks = read(path, chunk_rows=3)
    assert [(c.first_row, c.rows, c.bad, c.lines) for c in chunks] == [(1, ROWS[:3], {}, None), (4, ROWS[3:], {}, None)]


def test_parquet_nested_messages_come_back_as_lists_of_dicts(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]}]
    assert all_rows(write_parquet(tmp_path / "m.parquet", rows)) == rows


def test_jsonl_rows_carry_their_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\n\n{"text": "b"}\n  \n{"text": "c"}')
    [chunk] = read(path)
    assert (chunk.first_row, chunk.rows, chunk.lines) == (1, [{"text": "a"}, {"text": "b"}, {"text": "c"}], [1, 3, 5])


def test_jsonl_invalid_utf8_and_invalid_json_lines_are_bad_rows(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n{"text": "b"}\n{"text": \n[1, 2]\n{"text": "c"}\n')
    chunks = read(path, chunk_rows=4)
    assert [(c.first_row, c.rows, c.bad) for c in chunks] == [
        (1, [{"text": "a"}, None, {"text": "b"}, None], {2: INVALID_UTF8, 4: INVALID_JSON}),
        (5, [None, {"text": "c"}], {5: NOT_AN_OBJECT}),
    ]


def test_jsonl_byte_order_mark_is_ignored(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n')
    assert all_rows(path) == [{"text": "a"}]


def test_json_array_of_objects(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS, indent=2))
    assert all_rows(path) == ROWS


def test_json_object_of_column_lists(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"prompt": [r["prompt"] for r in ROWS], "completion": [r["completion"] for r in ROWS]}))
    assert all_rows(path) == ROWS


def test_json_file_holding_json_lines_reads_line_by_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(jsonl_bytes(ROWS[:2]) + b"{oops}\n")
    [chunk] = read(path)
    assert (chunk.rows, chunk.bad, chunk.lines) == (ROWS[:2] + [None], {3: INVALID_JSON}, [1, 2, 3])


def test_json_array_item_that_is_not_an_object_is_a_bad_row(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([ROWS[0], "stray", ROWS[1]]))
    [chunk] = read(path)
    assert (chunk.rows, chunk.bad) == ([ROWS[0], None, ROWS[1]], {2: NOT_AN_OBJECT})


def test_invalid_json_document_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"text": "a"},\n {"text": ')
    with pytest.raises(UserError, match=r"broken.json: invalid JSON \(Expecting value: line 2 column 11"):
        read(path)


def test_json_column_lists_of_different_lengths(tmp_path):
    path = tmp_path / "cols.json"
    path.write_text(json.dumps({"prompt": ["a", "b"], "completion": ["c"]}))
    with pytest.raises(UserError, match=r"cols.json: the JSON object's column lists differ in length"):
        read(path)


def test_csv_cells_are_all_text(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion,n\n"Two lines,\nquoted",42,\nplain,"say ""hi""",7\n')
    assert all_rows(path) == [{"prompt": "Two lines,\nquoted", "completion": "42", "n": ""},
                              {"prompt": "plain", "completion": 'say "hi"', "n": "7"}]


def test_csv_invalid_utf8_cell_is_a_bad_row(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"text\nfine\ncaf\xe9\nalso fine\n")
    [chunk] = read(path)
    assert (chunk.rows, chunk.bad) == ([{"text": "fine"}, None, {"text": "also fine"}], {2: INVALID_UTF8})


@pytest.mark.parametrize("stream", [False, True], ids=["file-format", "stream-format"])
def test_arrow_ipc(tmp_path, stream):
    path = write_arrow(tmp_path / "data-00000-of-00001.arrow", ROWS, stream)
    assert [(c.first_row, c.rows) for c in read(path, chunk_rows=3)] == [(1, ROWS[:3]), (4, ROWS[3:])]
    assert file_columns(path) == ["prompt", "completion"]


@pytest.mark.parametrize("suffix, compress", [
    (".gz", gzip.compress), (".zst", lambda data: zstandard.ZstdCompressor().compress(data))])
@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "arrow"])
def test_compressed_files_read_like_plain_ones(tmp_path, kind, suffix, compress):
    plain = tmp_path / f"d.{kind}"
    if kind == "parquet":
        write_parquet(plain, ROWS)
    elif kind == "arrow":
        write_arrow(plain, ROWS, stream=False)
    else:
        plain.write_bytes({"jsonl": jsonl_bytes(ROWS), "json": json.dumps(ROWS).encode(),
                           "csv": b"prompt,completion\n" + b"".join(
                               f"{r['prompt']},{r['completion']}\n".encode() for r in ROWS)}[kind])
    packed = tmp_path / f"d.{kind}{suffix}"
    packed.write_bytes(compress(plain.read_bytes()))
    assert all_rows(packed) == ROWS
    assert file_columns(packed) == ["prompt", "completion"]


def test_multi_frame_zstd_is_read_across_frames(tmp_path):
    path = tmp_path / "d.jsonl.zst"
    zc = zstandard.ZstdCompressor()
    path.write_bytes(zc.compress(jsonl_bytes(ROWS[:2])) + zc.compress(jsonl_bytes(ROWS[2:])))
    assert all_rows(path) == ROWS


# --------------------------------------------------------------------------------------- columns

@pytest.mark.parametrize("name, content", [
    ("d.jsonl", b'{"a": 1}\n{"b": 2, "a": 3}\n'),
    ("d.json", b'[{"a": 1}, {"b": 2}]'),
    ("d.csv", b"a,b\n1,2\n"),
])
def test_file_columns_of_text_kinds(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    assert file_columns(path) == ["a", "b"]


def test_file_columns_of_parquet_reads_the_schema(tmp_path):
    assert file_columns(write_parquet(tmp_path / "d.parquet", ROWS)) == ["prompt", "completion"]


# ---------------------------------------------------------------------------------- corrupt files

def test_truncated_parquet_names_the_file(tmp_path):
    whole = write_parquet(tmp_path / "whole.parquet", ROWS * 100)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    for call in (read, file_columns):
        with pytest.raises(UserError, match=rf"^{cut}: the parquet file is truncated or corrupt \("):
            call(cut)


def test_truncated_gzip_names_the_file(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    data = gzip.compress(jsonl_bytes(ROWS * 200))
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=rf"^{path}: the jsonl file is truncated or corrupt \("):
        read(path)


def test_unreadable_file_says_so_rather_than_corrupt(tmp_path, monkeypatch):
    path = tmp_path / "locked.jsonl"
    path.write_bytes(jsonl_bytes(ROWS))

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(readers, "open", denied, raising=False)
    with pytest.raises(UserError, match=rf"^{path}: cannot read the file \(Permission denied\); make it readable"):
        read(path)


def test_unsupported_kind_lists_supported_ones(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(UserError, match=r"notes.txt: unsupported dataset file kind; use .parquet, .jsonl, .json, "
                                        r".csv, .arrow \(each optionally compressed as .gz or .zst\)$"):
        dataset_files([path])


# ------------------------------------------------------------------------------------ directories

def test_directories_are_walked_recursively_in_sorted_order(tmp_path):
    for name in ("b/2.jsonl.gz", "b/1.csv", "a.parquet", "c/d/e.json", ".hidden.jsonl", ".git/x.jsonl",
                 "README.md", "hf/state.json", "hf/dataset_info.json", "hf/data-00000-of-00001.arrow"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in dataset_files([tmp_path])] == [
        "a.parquet", "b/1.csv", "b/2.jsonl.gz", "c/d/e.json", "hf/data-00000-of-00001.arrow"]


def test_files_and_directories_mix_in_the_order_given(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "x.jsonl").write_bytes(b"")
    (tmp_path / "y.csv").write_bytes(b"")
    assert dataset_files([tmp_path / "y.csv", tmp_path / "dir"]) == [tmp_path / "y.csv", tmp_path / "dir" / "x.jsonl"]


def test_directory_without_dataset_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match=rf"^{tmp_path}: no dataset files in this directory;"):
        dataset_files([tmp_path])


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match=r"nowhere.jsonl: dataset path not found; create it"):
        dataset_files([tmp_path / "nowhere.jsonl"])


# -------------------------------------------------------------------------------------- streaming

def test_large_jsonl_gz_streams_in_fixed_chunks_with_flat_memory(tmp_path):
    n, chunk_rows = 200_000, 2048
    path = tmp_path / "big.jsonl.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:
        for start in range(0, n, 10_000):
            f.write(b"".join(b'{"text": "row %d %s"}\n' % (i, b"x" * 40) for i in range(start, start + 10_000)))
    size = 200_000 * len(b'{"text": "row 100000 ' + b"x" * 40 + b'"}\n')
    tracemalloc.start()
    try:
        sizes, firsts, last = [], [], None
        for chunk in iter_chunks(path, chunk_rows):
            sizes.append(len(chunk.rows))
            firsts.append(chunk.first_row)
            last = chunk.rows[-1]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sizes == [chunk_rows] * (n // chunk_rows) + [n % chunk_rows]
    assert firsts == list(range(1, n + 1, chunk_rows))
    assert last == {"text": f"row {n - 1} " + "x" * 40}
    assert peak < size / 4  # 12.8 MB of JSON (~60 MB as Python rows); two chunks in memory take ~1.6 MB


def test_large_parquet_is_read_a_row_group_at_a_time(tmp_path):
    path = tmp_path / "big.parquet"
    text = pa.array([f"row {i} " + "y" * 200 for i in range(200_000)])
    pq.write_table(pa.table({"text": text}), path, row_group_size=10_000, compression="none")
    script = ("import sys, pyarrow as pa; from tuner.data.readers import iter_chunks; "
              "rows = sum(len(c.rows) for c in iter_chunks(sys.argv[1])); "
              "print(rows, pa.default_memory_pool().max_memory())")
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True)
    rows, arrow_peak = map(int, out.stdout.split())
    assert rows == 200_000
    assert arrow_peak < path.stat().st_size / 4  # 42 MB file; one 10,000-row group is ~2 MB
