"""URL downloads against a scripted loopback server: resume, retries, failures, limits, digests, auth."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tuner.data import download
from tuner.data.fetch import fetch_inputs
from tuner.errors import UserError
from tuner.spec.workspace import DataSource

BODY = b"".join(b'{"prompt": "p%d", "completion": "c"}\n' % i for i in range(20000))  # ~700 kB
DIGEST = hashlib.sha256(BODY).hexdigest()
CUT = 100_000


class Server:
    """Answers each GET with `respond(handler, n)` (n counts requests from 0) and records them."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []
        self.respond: Callable[[BaseHTTPRequestHandler, int], None] = lambda handler, n: send(handler, BODY)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                server.requests.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
                server.respond(self, len(server.requests) - 1)

            def log_message(self, *args) -> None:
                pass

        class Quiet(ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:
                pass  # the client hanging up mid-body is part of several tests

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"


def send(handler: BaseHTTPRequestHandler, body: bytes, status: int = 200, *, length: int | None = None,
         content_type: str = "application/octet-stream", headers: dict[str, str] | None = None) -> None:
    """Answer with `body`; a `length` above len(body) cuts the transfer there."""
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body) if length is None else length))
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)
    handler.wfile.flush()
    if length is not None and length > len(body):
        handler.close_connection = True


def send_range(handler: BaseHTTPRequestHandler, etag: str = '"v1"') -> None:
    """Honour `Range: bytes=N-` (with If-Range) as a 206, else send the whole body."""
    wanted = handler.headers.get("Range", "")
    if_range = handler.headers.get("If-Range")
    if wanted.startswith("bytes=") and if_range in (None, etag):
        start = int(wanted[6:].rstrip("-"))
        send(handler, BODY[start:], 206, headers={"Content-Range": f"bytes {start}-{len(BODY) - 1}/{len(BODY)}",
                                                  "ETag": etag})
    else:
        send(handler, BODY, headers={"ETag": etag})


@pytest.fixture()
def server(monkeypatch) -> Iterator[Server]:
    monkeypatch.setattr(download, "_BACKOFF", 0.0)
    monkeypatch.delenv("TUNER_MAX_DOWNLOAD_BYTES", raising=False)
    monkeypatch.delenv("TUNER_URL_HEADERS_FILE", raising=False)
    scripted = Server()
    thread = threading.Thread(target=scripted.httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield scripted
    finally:
        scripted.httpd.shutdown()
        scripted.httpd.server_close()


def get(url: str, tmp_path) -> list[download.InputFile]:
    return fetch_inputs(DataSource(urls=[url]), tmp_path / "inputs", base_dir=tmp_path, allow_private_urls=True)


def test_a_cut_transfer_resumes_with_a_range_request(server, tmp_path):
    server.respond = lambda h, n: send(h, BODY[:CUT], length=len(BODY), headers={"ETag": '"v1"'}) if n == 0 \
        else send_range(h)
    [file] = get(f"{server.url}/train.jsonl", tmp_path)
    assert [r.get("range") for r in server.requests] == [None, f"bytes={CUT}-"]
    assert server.requests[1]["if-range"] == '"v1"'
    assert file.sha256 == DIGEST == hashlib.sha256(file.path.read_bytes()).hexdigest()
    assert file.size == len(BODY)


def test_a_server_ignoring_range_is_read_again_from_the_start(server, tmp_path):
    server.respond = lambda h, n: send(h, BODY[:CUT], length=len(BODY)) if n == 0 else send(h, BODY)
    [file] = get(f"{server.url}/train.jsonl", tmp_path)
    assert server.requests[1]["range"] == f"bytes={CUT}-"
    assert file.sha256 == DIGEST and file.path.read_bytes() == BODY


def test_a_read_timeout_mid_body_resumes(server, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNER_DOWNLOAD_READ_TIMEOUT_SECONDS", "0.2")

    def stall(handler: BaseHTTPRequestHandler, n: int) -> None:
        if n == 0:
            send(handler, BODY[:CUT], length=len(BODY))
            time.sleep(0.5)
        else:
            send_range(handler)

    server.respond = stall
    [file] = get(f"{server.url}/train.jsonl", tmp_path)
    assert server.requests[1]["range"] == f"bytes={CUT}-" and file.sha256 == DIGEST


def test_a_part_left_by_a_killed_run_resumes_and_a_finished_file_is_not_fetched_again(server, tmp_path, monkeypatch):
    monkeypatch.setattr(download, "_RESUMES", 0)
    server.respond = lambda h, n: send(h, BODY[:CUT], length=len(BODY), headers={"ETag": '"v1"'}) if n == 0 \
        else send_range(h)
    url = f"{server.url}/train.jsonl#sha256={DIGEST}"
    with pytest.raises(UserError, match=r"cannot download .*train.jsonl.*re-run resumes"):
        get(url, tmp_path)
    assert (tmp_path / "inputs" / "000-train.jsonl.part").stat().st_size == CUT
    [file] = get(url, tmp_path)
    assert server.requests[1]["range"] == f"bytes={CUT}-" and server.requests[1]["if-range"] == '"v1"'
    assert file.sha256 == DIGEST and not (tmp_path / "inputs" / "000-train.jsonl.part").exists()
    assert get(url, tmp_path) == [file]
    assert len(server.requests) == 2


def test_a_complete_part_answered_416_is_fetched_again(server, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "000-train.jsonl.part").write_bytes(BODY)
    url = f"{server.url}/train.jsonl"
    (inputs / ".000-train.jsonl.fetch.json").write_text(json.dumps(
        {"url": hashlib.sha256(url.encode()).hexdigest(), "state": "partial", "validator": None}))
    server.respond = lambda h, n: send(h, b"", 416) if "Range" in h.headers else send(h, BODY)
    [file] = get(url, tmp_path)
    assert [r.get("range") for r in server.requests] == [f"bytes={len(BODY)}-", None]
    assert file.sha256 == DIGEST


def test_a_5xx_is_retried(server, tmp_path):
    server.respond = lambda h, n: send(h, b"busy", 500) if n == 0 else send(h, BODY)
    [file] = get(f"{server.url}/train.jsonl", tmp_path)
    assert len(server.requests) == 2 and file.sha256 == DIGEST


@pytest.mark.parametrize("status", [404, 403])
def test_a_4xx_fails_at_once_with_the_status_and_no_secrets(server, tmp_path, status):
    server.respond = lambda h, n: send(h, b"no", status)
    url = server.url.replace("http://", "http://user:hunter2@") + "/train.jsonl?sig=SECRET&x=1"
    with pytest.raises(UserError, match=rf"train.jsonl\?… answered HTTP {status}") as caught:
        get(url, tmp_path)
    assert len(server.requests) == 1
    assert "SECRET" not in str(caught.value) and "hunter2" not in str(caught.value)


@pytest.mark.parametrize("content_type", ["text/html; charset=utf-8", "application/octet-stream"])
def test_an_html_page_fails_at_once(server, tmp_path, content_type):
    server.respond = lambda h, n: send(h, b"<!DOCTYPE html><html><body>Sign in</body></html>",
                                       content_type=content_type)
    with pytest.raises(UserError, match="returned an HTML page"):
        get(f"{server.url}/train.jsonl", tmp_path)
    assert len(server.requests) == 1
    assert not [p for p in (tmp_path / "inputs").iterdir()]


def test_a_content_length_over_the_limit_fails_before_writing(server, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNER_MAX_DOWNLOAD_BYTES", "1000")
    with pytest.raises(UserError, match=r"train.jsonl\?… is larger than the download limit of 1,000 bytes") as caught:
        get(f"{server.url}/train.jsonl?token=SECRET", tmp_path)
    assert "SECRET" not in str(caught.value)
    assert not [p for p in (tmp_path / "inputs").iterdir()]


def test_a_body_growing_past_the_limit_fails(server, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNER_MAX_DOWNLOAD_BYTES", "1000")

    def chunked(handler: BaseHTTPRequestHandler, n: int) -> None:  # no Content-Length to check first
        handler.send_response(200)
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        handler.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY))

    server.respond = chunked
    with pytest.raises(UserError, match="larger than the download limit"):
        get(f"{server.url}/train.jsonl", tmp_path)
    assert not [p for p in (tmp_path / "inputs").iterdir()]


def test_the_sha256_fragment_is_checked_and_not_sent(server, tmp_path):
    [file] = get(f"{server.url}/train.jsonl#sha256={DIGEST.upper()}", tmp_path)
    assert file.sha256 == DIGEST and server.requests[0]["path"] == "/train.jsonl"
    wrong = "0" * 64
    with pytest.raises(UserError, match=f"other.jsonl has sha256 {DIGEST}, not the {wrong}"):
        get(f"{server.url}/other.jsonl#sha256={wrong}", tmp_path)
    assert not (tmp_path / "inputs" / "000-other.jsonl").exists()


def test_a_bad_sha256_fragment_is_a_spec_error(tmp_path):
    with pytest.raises(UserError, match=r"urls\[0\].*not #sha256=<64 hex digits>"):
        get("http://127.0.0.1:9/train.jsonl#sha256=abc", tmp_path)


def test_host_headers_reach_their_host_only_and_stay_out_of_errors(server, tmp_path, monkeypatch):
    headers_file = tmp_path / "headers.json"
    headers_file.write_text(json.dumps({"127.0.0.1": {"Authorization": "Bearer TOPSECRET"},
                                        "localhost": {"X-Other": "nope"}}))
    monkeypatch.setenv("TUNER_URL_HEADERS_FILE", str(headers_file))
    server.respond = lambda h, n: send(h, BODY) if n == 0 else send(h, b"no", 403)
    get(f"{server.url}/train.jsonl", tmp_path)
    assert server.requests[0]["authorization"] == "Bearer TOPSECRET" and "x-other" not in server.requests[0]
    with pytest.raises(UserError, match="HTTP 403") as caught:
        get(f"{server.url}/private.jsonl", tmp_path / "again")
    assert "TOPSECRET" not in str(caught.value)


def test_host_headers_are_not_sent_on_a_redirect_to_another_host(server, tmp_path, monkeypatch):
    port = server.httpd.server_address[1]
    headers_file = tmp_path / "headers.json"
    headers_file.write_text(json.dumps({f"localhost:{port}": {"Authorization": "Bearer TOPSECRET"}}))
    monkeypatch.setenv("TUNER_URL_HEADERS_FILE", str(headers_file))

    def redirect(handler: BaseHTTPRequestHandler, n: int) -> None:
        if n == 0:
            send(handler, b"", 302, headers={"Location": f"{server.url}/train.jsonl"})
        else:
            send(handler, BODY)

    server.respond = redirect
    [file] = get(f"http://localhost:{port}/start", tmp_path)
    assert server.requests[0]["authorization"] == "Bearer TOPSECRET"
    assert "authorization" not in server.requests[1] and file.sha256 == DIGEST
