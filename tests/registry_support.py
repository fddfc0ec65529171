"""Real OCI registry test infrastructure.

- `RegistryServer`: Debian's docker-registry (CNCF distribution 2.8) with htpasswd auth, over TLS
  (throwaway CA) or plain HTTP.
- `FaultProxy`: an HTTP reverse proxy in front of a plain registry that records every request and
  injects failures (error statuses, dropped connections, denied auth).
- `TokenAuthProxy`: the same proxy speaking the bearer-token protocol of Docker Hub/GHCR/ACR.
- `skopeo()` and its auth/TLS argument helpers.
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import re
import secrets
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal, NamedTuple
from urllib.parse import parse_qs, urlsplit

import requests

REGISTRY_BIN = "/usr/bin/docker-registry"
CHUNK = 64 * 1024
# Headers that describe one connection, never forwarded (Content-Length is forwarded as is).
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "transfer-encoding", "upgrade", "expect",
}
ERROR_CODES = {401: "UNAUTHORIZED", 403: "DENIED", 404: "NOT_FOUND", 429: "TOOMANYREQUESTS"}
# /v2/<name>/{manifests,blobs,tags}/...: the repository a request acts on.
REPO_PATH = re.compile(r"^/v2/(?P<name>.+?)/(?:manifests|blobs|tags)/")


def free_port() -> int:
    """A TCP port free on loopback now (the servers the tests start bind it next)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(*cmd: str | Path) -> str:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True).stdout


def _basic(username: str, password: str) -> str:
    return base64.b64encode(f"{username}:{password}".encode()).decode()


class RegistryServer:
    """A docker-registry process on 127.0.0.1 with htpasswd (bcrypt) auth and filesystem storage."""

    def __init__(self, root: Path, *, tls: bool, username: str = "tuner-ci") -> None:
        self.root = root
        self.tls = tls
        self.username = username
        self.password = f"pw-{secrets.token_hex(12)}"
        self.host = f"127.0.0.1:{free_port()}"
        self.url = f"{'https' if tls else 'http'}://{self.host}"
        self.log_path = root / "registry.log"
        # skopeo's --cert-dir reads every *.crt as a CA and wants a *.cert for every *.key: CA only.
        self.cert_dir: Path | None = root / "certs.d" if tls else None
        self.ca_cert: Path | None = self.cert_dir / "ca.crt" if self.cert_dir else None
        self._process: subprocess.Popen[bytes] | None = None

        htpasswd = root / "htpasswd"
        htpasswd.write_text(_run("htpasswd", "-Bbn", username, self.password))
        http_config: dict[str, object] = {"addr": self.host, "secret": secrets.token_hex(16)}
        if tls:
            http_config["tls"] = self._make_certificates()
        config = {
            "version": 0.1,
            "log": {"level": "error", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(root / "data")}, "delete": {"enabled": True}},
            "http": http_config,
            "auth": {"htpasswd": {"realm": "tuner-test", "path": str(htpasswd)}},
        }
        self.config_path = root / "config.yml"
        self.config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML

    def _make_certificates(self) -> dict[str, str]:
        """A throwaway CA and a server certificate it signs for 127.0.0.1 and localhost."""
        assert self.cert_dir is not None and self.ca_cert is not None
        self.cert_dir.mkdir()
        tls_dir = self.root / "tls"
        tls_dir.mkdir()
        ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
        _run("openssl", "req", "-x509", *ec, "-keyout", tls_dir / "ca.key", "-out", self.ca_cert,
             "-days", "2", "-subj", "/CN=tuner-test-ca",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
        _run("openssl", "req", "-new", *ec, "-keyout", tls_dir / "server.key", "-out", tls_dir / "server.csr",
             "-subj", "/CN=localhost")
        extensions = tls_dir / "server.ext"
        extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
        _run("openssl", "x509", "-req", "-in", tls_dir / "server.csr", "-CA", self.ca_cert,
             "-CAkey", tls_dir / "ca.key", "-CAcreateserial", "-out", tls_dir / "server.crt",
             "-days", "2", "-extfile", extensions)
        return {"certificate": str(tls_dir / "server.crt"), "key": str(tls_dir / "server.key")}

    def start(self, timeout: float = 15.0) -> None:
        """Start the registry and wait until `GET /v2/` answers 401."""
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen([REGISTRY_BIN, "serve", str(self.config_path)],
                                             stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            try:
                if requests.get(f"{self.url}/v2/", verify=str(self.ca_cert) if self.ca_cert else False, timeout=1).status_code == 401:
                    return
            except requests.RequestException:  # not listening yet (or someone else is)
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"docker-registry at {self.url} did not answer 401 on /v2/ within {timeout} s; "
                           f"log:\n{self.log_path.read_text(errors='replace')}")

    def stop(self) -> None:
        """Terminate the registry process (kill it if it lingers)."""
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def __enter__(self) -> RegistryServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def docker_config(self, directory: Path, host: str | None = None,
                      style: Literal["auth", "userpass"] = "auth") -> Path:
        """Write `config.json` as Kubernetes mounts a dockerconfigjson secret; return its folder."""
        entry = ({"auth": _basic(self.username, self.password)} if style == "auth"
                 else {"username": self.username, "password": self.password})
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps({"auths": {host or self.host: entry}}))
        return directory


class RequestRecord(NamedTuple):
    """One request a proxy saw; `status` is None when the connection was dropped."""

    method: str
    path: str
    status: int | None
    body_bytes: int


@dataclass
class _Fault:
    kind: Literal["fail", "drop"]
    method: str
    pattern: re.Pattern[str]
    remaining: int
    status: int = 500
    after_bytes: int = 0


def _read_body(handler: BaseHTTPRequestHandler, limit: float = math.inf) -> Iterator[bytes]:
    """Yield the request body (Content-Length or chunked) in pieces, stopping after `limit` bytes."""
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        total = 0
        while True:
            size = int(handler.rfile.readline().split(b";")[0], 16)
            if size == 0:
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return
            while size:
                data = handler.rfile.read(min(size, CHUNK, limit - total))
                if not data:
                    return
                size -= len(data)
                total += len(data)
                yield data
                if total >= limit:
                    return
            handler.rfile.readline()
    remaining = min(int(handler.headers.get("Content-Length") or 0), limit)
    while remaining:
        data = handler.rfile.read(min(remaining, CHUNK))
        if not data:
            return
        remaining -= len(data)
        yield data


def _error_body(status: int, message: str) -> bytes:
    code = ERROR_CODES.get(status, "UNKNOWN")
    return json.dumps({"errors": [{"code": code, "message": message, "detail": None}]}).encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _handle(self) -> None:
        try:
            self.server.proxy._handle(self)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle


class FaultProxy:
    """A threaded HTTP reverse proxy to a plain `RegistryServer` that records and injects faults.

    Faults match a method and a path regex (searched in the path without query) and apply to the
    next `times` matching requests. The client's Host header is forwarded, so the registry's
    `Location` headers point at the proxy.
    """

    def __init__(self, upstream: RegistryServer) -> None:
        assert not upstream.tls, "FaultProxy forwards over plain HTTP: use a plain RegistryServer"
        self.upstream = upstream
        self.requests: list[RequestRecord] = []
        self._faults: list[_Fault] = []
        self._deny_status: int | None = None
        self._lock = threading.Lock()
        self._server = _Server(self)
        self.host = f"127.0.0.1:{self._server.server_address[1]}"
        self.url = f"http://{self.host}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fail(self, method: str, path_regex: str, status: int = 500, times: int = 1) -> None:
        """Answer the next `times` matching requests with `status` and an OCI error body."""
        self._add(_Fault("fail", method, re.compile(path_regex), times, status=status))

    def drop(self, method: str, path_regex: str, times: int = 1, after_bytes: int = 65536) -> None:
        """Read `after_bytes` of the next matching requests' bodies, then reset the connection."""
        self._add(_Fault("drop", method, re.compile(path_regex), times, after_bytes=after_bytes))

    def deny(self, status: int = 401) -> None:
        """Answer every request with `status` (401 with a Basic challenge, or 403) until `clear()`."""
        with self._lock:
            self._deny_status = status

    def clear(self) -> None:
        """Remove every fault and the denial."""
        with self._lock:
            self._faults.clear()
            self._deny_status = None

    def reset_log(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self.requests.clear()

    def _add(self, fault: _Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def _record(self, handler: BaseHTTPRequestHandler, status: int | None, body_bytes: int) -> None:
        with self._lock:
            self.requests.append(RequestRecord(handler.command, urlsplit(handler.path).path, status, body_bytes))

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.remaining > 0 and fault.method == method and fault.pattern.search(path):
                    fault.remaining -= 1
                    return fault
        return None

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        path = urlsplit(handler.path).path
        deny_status = self._deny_status
        if deny_status is not None:
            challenge = {"WWW-Authenticate": 'Basic realm="tuner-fault-proxy"'} if deny_status == 401 else {}
            self._answer(handler, deny_status, _error_body(deny_status, "denied by FaultProxy"), challenge)
            return
        fault = self._take_fault(handler.command, path)
        if fault is not None and fault.kind == "drop":
            self._record(handler, None, sum(map(len, _read_body(handler, fault.after_bytes))))
            handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            handler.connection.close()  # RST: the client sees a connection error, no response
            handler.close_connection = True
        elif fault is not None:
            self._answer(handler, fault.status, _error_body(fault.status, "injected by FaultProxy"))
        else:
            self._serve(handler, path)

    def _serve(self, handler: BaseHTTPRequestHandler, path: str) -> None:
        """Handle a request no fault applies to: forward it with the client's own credentials."""
        self._forward(handler, handler.headers.get("Authorization"))

    def _answer(self, handler: BaseHTTPRequestHandler, status: int, body: bytes,
                headers: dict[str, str] | None = None, body_bytes: int | None = None) -> None:
        """Answer with a JSON body, first draining the request body unless it was read (`body_bytes`)."""
        if body_bytes is None:
            body_bytes = sum(map(len, _read_body(handler)))
        self._record(handler, status, body_bytes)
        handler.send_response_only(status)
        for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(body)

    def _forward(self, handler: BaseHTTPRequestHandler, authorization: str | None) -> None:
        """Stream the request to the upstream registry and its response back to the client."""
        chunked = handler.headers.get("Transfer-Encoding", "").lower() == "chunked"
        conn = http.client.HTTPConnection(self.upstream.host, timeout=60)
        body = _read_body(handler)
        sent = 0
        try:
            conn.putrequest(handler.command, handler.path, skip_host=True, skip_accept_encoding=True)
            for name, value in handler.headers.items():
                if name.lower() not in HOP_BY_HOP | {"authorization", "host"}:
                    conn.putheader(name, value)
            conn.putheader("Host", handler.headers.get("Host", self.host))
            if authorization:
                conn.putheader("Authorization", authorization)
            if chunked:
                conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            try:
                for data in body:
                    sent += len(data)
                    conn.send(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                if chunked:
                    conn.send(b"0\r\n\r\n")
            except OSError:  # upstream answered early and closed; its answer may still be readable
                pass
            sent += sum(map(len, body))  # drain what upstream did not take
            response = conn.getresponse()
        except OSError as exc:
            sent += sum(map(len, body))
            conn.close()
            self._answer(handler, 502, _error_body(502, f"upstream: {exc}"), body_bytes=sent)
            return
        try:
            self._record(handler, response.status, sent)
            self._relay(handler, response)
        finally:
            conn.close()

    @staticmethod
    def _relay(handler: BaseHTTPRequestHandler, response: http.client.HTTPResponse) -> None:
        handler.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in HOP_BY_HOP:
                handler.send_header(name, value)
        has_body = handler.command != "HEAD" and response.status not in (204, 304)
        rechunk = has_body and response.getheader("Content-Length") is None
        if rechunk:
            handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        while has_body and (data := response.read(CHUNK)):
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if rechunk else data)
        if rechunk:
            handler.wfile.write(b"0\r\n\r\n")


class TokenAuthProxy(FaultProxy):
    """A `FaultProxy` that demands bearer tokens, as Docker Hub, GHCR and ACR do.

    `/v2/` API requests need `Authorization: Bearer T`, T granting pull (GET/HEAD) or pull,push
    (other methods) on the repository. `/token` issues tokens: GET with the upstream's Basic
    credentials, or POST `grant_type=refresh_token` with `identity_token`. Valid requests go
    upstream with the upstream's Basic credentials.
    """

    def __init__(self, upstream: RegistryServer, service: str = "tuner-test") -> None:
        super().__init__(upstream)
        self.service = service
        self.realm = f"{self.url}/token"
        self.identity_token = f"idt-{secrets.token_hex(12)}"
        self.tokens: dict[str, dict[str, set[str]]] = {}  # token -> repository -> granted actions
        self._upstream_basic = f"Basic {_basic(upstream.username, upstream.password)}"

    def _serve(self, handler: BaseHTTPRequestHandler, path: str) -> None:
        if path == "/token":
            self._token(handler)
            return
        match = REPO_PATH.match(path)
        repo = match["name"] if match else None
        needed = {"pull"} if handler.command in ("GET", "HEAD") else {"pull", "push"}
        auth = handler.headers.get("Authorization", "")
        grants = self.tokens.get(auth.removeprefix("Bearer ")) if auth.startswith("Bearer ") else None
        if grants is not None and (repo is None or needed <= grants.get(repo, set())):
            self._forward(handler, self._upstream_basic)
            return
        challenge = f'Bearer realm="{self.realm}",service="{self.service}"'
        if repo is not None:
            challenge += f',scope="repository:{repo}:{",".join(sorted(needed))}"'
        self._answer(handler, 401, _error_body(401, "authentication required"), {"WWW-Authenticate": challenge})

    def _token(self, handler: BaseHTTPRequestHandler) -> None:
        body = b"".join(_read_body(handler))
        post = handler.command == "POST"
        params = parse_qs(body.decode() if post else urlsplit(handler.path).query)
        first = {key: values[0] for key, values in params.items()}
        if post:
            authorized = first.get("grant_type") == "refresh_token" and first.get("refresh_token") == self.identity_token
        else:
            authorized = handler.headers.get("Authorization") == self._upstream_basic
        if not authorized or first.get("service") != self.service:
            self._answer(handler, 401, _error_body(401, "invalid credentials or service"), body_bytes=len(body))
            return
        token = f"tok-{secrets.token_hex(16)}"
        grants: dict[str, set[str]] = {}
        for scope in " ".join(params.get("scope", [])).split():
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind == "repository":
                grants.setdefault(name, set()).update(actions.split(","))
        self.tokens[token] = grants
        answer = {"access_token": token} if post else {"token": token, "access_token": token}
        self._answer(handler, 200, json.dumps(answer).encode(), body_bytes=len(body))


def skopeo(*args: str | Path, timeout: float = 120) -> str:
    """Run `skopeo --insecure-policy ARGS`; return stdout, raise AssertionError with stderr on failure."""
    binary = shutil.which("skopeo")
    assert binary is not None, "skopeo is not installed (scripts/test.sh installs it)"
    result = subprocess.run([binary, "--insecure-policy", *map(str, args)], capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"skopeo {args[0] if args else ''} failed ({result.returncode}):\n{result.stderr}")
    return result.stdout


def skopeo_tls_args(target: RegistryServer | FaultProxy, side: Literal["", "src", "dest"] = "") -> list[str]:
    """`--cert-dir` (the CA) for a TLS registry, `--tls-verify=false` for plain HTTP ones."""
    prefix = f"--{side}-" if side else "--"
    if isinstance(target, RegistryServer) and target.cert_dir is not None:
        return [f"{prefix}cert-dir={target.cert_dir}"]
    return [f"{prefix}tls-verify=false"]


def skopeo_auth_args(target: RegistryServer | FaultProxy, side: Literal["", "src", "dest"] = "") -> list[str]:
    """`--creds user:pass` (the upstream's, for a proxy) plus the TLS arguments; `side` is src/dest for copy."""
    server = target.upstream if isinstance(target, FaultProxy) else target
    prefix = f"--{side}-" if side else "--"
    return [f"{prefix}creds={server.username}:{server.password}", *skopeo_tls_args(target, side)]
