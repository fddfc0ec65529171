"""Hostile data and servers: each case is generated here (nothing committed), run in a child process
under a memory limit and a time bound, and ends in one `error:` line with exit 2, or in counted
drops and exit 0 where good rows survive, never in a native abort, an OOM or a hang."""

from __future__ import annotations

import datetime
import gzip
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
import zstandard

from conftest import serving_with

MEMORY_LIMIT = 4 << 30  # the child's address space: ~2 GiB go to torch and transformers, the rest is headroom
TIME_LIMIT = 120  # seconds per case, imports included (the cases themselves end in a few seconds)
GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
ZEROS = 64 << 20


def tuner(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    done = subprocess.run([sys.executable, "-m", "tuner.cli", *args], capture_output=True, text=True,
                          timeout=TIME_LIMIT, preexec_fn=limit_memory, cwd=cwd,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    assert "Traceback" not in done.stderr and "panicked" not in done.stderr, done.stderr[-3000:]
    return done


def one_error(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    assert len(lines[0]) < 500
    return lines[0]


def check_data(path: Path, tokenizer: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return tuner("check-data", str(path), "--tokenizer", str(tokenizer), env=env)


def zero_bomb(path: Path, members: int, compress) -> Path:
    """`members` copies of a compressed 64 MiB of zeros: 4 GiB inflated from a few MB on disk."""
    member = compress(bytes(ZEROS))
    with path.open("wb") as out:
        for _ in range(members):
            out.write(member)
    return path


# ------------------------------------------------------------------------------ decompression bombs

@pytest.mark.parametrize("name, compress", [
    ("bomb.jsonl.gz", lambda data: gzip.compress(data, 9)),
    ("bomb.json.gz", lambda data: gzip.compress(data, 9)),
    ("bomb.jsonl.zst", lambda data: zstandard.ZstdCompressor(level=19).compress(data)),
    ("bomb.parquet.gz", lambda data: gzip.compress(data, 9)),  # inflated to a temporary file first
])
def test_a_decompression_bomb_is_one_line_naming_the_file(tmp_path, tiny_model_dir, name, compress):
    bomb = zero_bomb(tmp_path / name, 64, compress)
    scratch = tmp_path / "tmp"  # where a compressed Parquet file is inflated before it is read
    scratch.mkdir()
    error = one_error(check_data(bomb, tiny_model_dir, env={"TMPDIR": str(scratch)}))
    assert error.startswith(f"error: {bomb}: decompresses more than 100x (")
    assert "decompression bomb" in error
    assert list(scratch.iterdir()) == []  # the inflated part, and the check's scratch folder, are gone


def test_the_decompressed_size_limit_is_configurable(tmp_path, tiny_model_dir):
    path = tmp_path / "rows.jsonl.gz"
    path.write_bytes(gzip.compress(b"".join(json.dumps(GOOD).encode() + b"\n" for _ in range(2000))))
    done = tuner("check-data", str(path), "--tokenizer", str(tiny_model_dir),
                 env={"TUNER_MAX_DECOMPRESSED_BYTES": "4096"})
    assert one_error(done) == (f"error: {path}: decompresses to more than 4,096 bytes; raise "
                               "TUNER_MAX_DECOMPRESSED_BYTES if the file is genuine, or check it")


# ------------------------------------------------------------------------------ giant rows and values

def report(done: subprocess.CompletedProcess) -> list[str]:
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


def test_a_json_line_of_200_mb_is_dropped_unread(tmp_path, tiny_model_dir):
    path = tmp_path / "giant.jsonl"
    with path.open("w") as out:
        out.write(json.dumps(GOOD) + "\n")
        out.write('{"messages": [{"role": "user", "content": "' + "a" * (200 << 20) + '"}]}\n')
        out.write(json.dumps(GOOD) + "\n")
    lines = report(check_data(path, tiny_model_dir))
    assert "rows: 3 read, 2 kept, 1 dropped; 2 train / 0 eval" in lines
    assert "dropped: 1 row too large (e.g. giant.jsonl row 2)" in lines


def test_a_parquet_cell_of_50_mb_never_reaches_the_tokenizer(tmp_path, tiny_model_dir):
    path = tmp_path / "giant.parquet"
    prompts = ["Hi", "x" * (50 << 20), "Hey"]
    pq.write_table(pa.table({"prompt": prompts, "completion": ["Hello", "y", "Yo"]}), path, row_group_size=1)
    lines = report(check_data(path, tiny_model_dir))
    assert "rows: 3 read, 2 kept, 1 dropped; 2 train / 0 eval" in lines
    assert "dropped: 1 row too large (e.g. giant.parquet row 2)" in lines


def test_json_nested_100000_levels(tmp_path, tiny_model_dir):
    deep = "[" * 100_000 + "]" * 100_000
    document = tmp_path / "deep.json"
    document.write_text(deep)
    assert one_error(check_data(document, tiny_model_dir)) == (
        f"error: {document}: the JSON is nested too deeply to parse; a dataset row nests a few levels; check the file")
    lines_file = tmp_path / "deep.jsonl"
    lines_file.write_text(json.dumps(GOOD) + "\n" + '{"messages": ' + deep + "}\n")
    lines = report(check_data(lines_file, tiny_model_dir))
    assert "dropped: 1 JSON nested too deeply (e.g. deep.jsonl row 2)" in lines


@pytest.mark.parametrize("turns, reason", [(100_000, "row too large"), (5_000, "too many turns")])
def test_a_conversation_of_thousands_of_turns_is_dropped_before_rendering(tmp_path, tiny_model_dir, turns, reason):
    """100,000 turns are 3.6 MB of JSON, past the row limit; 5,000 are under it, but past max_length / 2."""
    path = tmp_path / "turns.jsonl"
    chat = [{"role": "user" if i % 2 == 0 else "assistant", "content": "ok"} for i in range(turns)]
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({"messages": chat}) + "\n")
    lines = report(check_data(path, tiny_model_dir))
    assert f"dropped: 1 {reason} (e.g. turns.jsonl row 2)" in lines


def test_arrow_timestamps_out_of_range_drop_their_rows(tmp_path, tiny_model_dir):
    path = tmp_path / "dated.parquet"
    seconds = [0, 400_000_000_000, 0]  # the middle one is past year 9999: Python's datetime cannot hold it
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "completion": ["x", "y", "z"],
                             "created": pa.array(seconds, type=pa.timestamp("s"))}), path)
    assert datetime.MAXYEAR == 9999
    lines = report(check_data(path, tiny_model_dir))
    assert "dropped: 1 value Python cannot represent (e.g. dated.parquet row 2)" in lines


# ------------------------------------------------------------------------------ hostile servers

class Hostile(BaseHTTPRequestHandler):
    """/trickle: a byte now and then; /endless: bytes forever; /silent: never a header;
    /liar: a Content-Length twice the body; /ok.jsonl: a good file."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        try:
            if path.startswith("/silent"):
                time.sleep(30)
                return
            if path.startswith("/liar"):
                body = (json.dumps(GOOD) + "\n").encode() * 20
                self._headers(len(body) * 2)
                self.wfile.write(body)
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if path.startswith("/trickle"):
                self._headers(10 << 20)
                for _ in range(300):
                    self.wfile.write(b"{")
                    self.wfile.flush()
                    time.sleep(0.1)
                return
            if path.startswith("/endless"):
                self._headers(None)
                chunk = b'{"text": "' + b"a" * (1 << 20) + b'"}\n'
                while True:
                    self.wfile.write(chunk)
            body = (json.dumps(GOOD) + "\n").encode()
            self._headers(len(body))
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass

    def _headers(self, length: int | None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()


@pytest.fixture(scope="module")
def hostile_server() -> Iterator[str]:
    with serving_with(Hostile) as host:
        yield f"http://{host}"


LIMITS = {"TUNER_DOWNLOAD_DEADLINE_SECONDS": "12", "TUNER_DOWNLOAD_READ_TIMEOUT_SECONDS": "1",
          "TUNER_DOWNLOAD_MIN_BYTES_PER_SECOND": "1000", "TUNER_DOWNLOAD_RATE_WINDOW_SECONDS": "3",
          "TUNER_MAX_DOWNLOAD_BYTES": str(32 << 20)}


def fetch(tmp_path: Path, url: str) -> subprocess.CompletedProcess:
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text(yaml.safe_dump({
        "apiVersion": "kaito.sh/v1beta1", "kind": "Workspace", "metadata": {"name": "hostile"},
        "tuning": {"preset": {"name": "smollm2-135m-instruct"}, "method": "lora", "input": {"urls": [url]},
                   "output": {"volumeSource": {"hostPath": {"path": "out"}}}}}))
    return tuner("fetch", str(workspace), "--work-dir", str(tmp_path / "work"), "--allow-private-urls",
                 env=LIMITS, cwd=tmp_path)


@pytest.mark.parametrize("path, expected", [
    ("/trickle.jsonl", "bytes/s, less than 1,000 over"),
    ("/endless.jsonl", "is larger than the download limit of 33,554,432 bytes"),
    ("/silent.jsonl", "sent no byte in"),
    ("/liar.jsonl", "stops sending at byte 1,860 every time (3 tries; its Content-Length promised more)"),
])
def test_a_hostile_server_ends_the_fetch_with_one_line_in_bounded_time(tmp_path, hostile_server, path, expected):
    started = time.monotonic()
    error = one_error(fetch(tmp_path, hostile_server + path + "?token=secret"))
    assert time.monotonic() - started < 60
    assert f"{hostile_server}{path}?…" in error and "secret" not in error  # named, redacted
    assert expected in error or "took more than 12s" in error, error


@pytest.mark.parametrize("name", ["%00evil.jsonl", "a" * 300 + ".jsonl", "..%2F..%2Fescape.jsonl"])
def test_odd_file_names_from_urls_become_safe_local_names(tmp_path, hostile_server, name):
    done = fetch(tmp_path, f"{hostile_server}/ok/{name}")
    assert done.returncode == 0, done.stderr[-2000:]
    [fetched] = [p for p in (tmp_path / "work" / "inputs").iterdir() if not p.name.startswith(".")]
    assert fetched.suffix == ".jsonl" and len(fetched.name) <= 130 and "\x00" not in fetched.name
    assert fetched.parent == tmp_path / "work" / "inputs"
