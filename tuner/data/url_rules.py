"""What a dataset URL may reach and what goes with it: the `#sha256=` fragment (checked, never
sent), the headers `TUNER_URL_HEADERS_FILE` gives each host (only to that host), the check that
a host resolves to public addresses, and the redacted form that logs show."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
from pathlib import Path
from urllib.parse import urldefrag, urlsplit

from tuner.errors import UserError


def split_sha256(url: str, where: str) -> tuple[str, str | None]:
    """The URL without its fragment (never sent), and the sha256 a `#sha256=HEX` fragment names."""
    url, fragment = urldefrag(url)
    if not fragment:
        return url, None
    match = re.fullmatch(r"sha256=([0-9a-fA-F]{64})", fragment)
    if not match:
        raise UserError(f"{redact(url)}: the URL's #fragment is not #sha256=<64 hex digits>", where=where,
                        fix="write the expected digest as #sha256=<hex>, or drop the fragment")
    return url, match.group(1).lower()


def host_headers(url: str) -> dict[str, str]:
    """The TUNER_URL_HEADERS_FILE headers for this URL's host (`host:port` first, then `host`)."""
    headers = url_headers()
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.port and f"{host}:{parts.port}" in headers:
        return headers[f"{host}:{parts.port}"]
    return headers.get(host, {})


def url_headers() -> dict[str, dict[str, str]]:
    path = os.environ.get("TUNER_URL_HEADERS_FILE")
    if not path:
        return {}
    fix = 'write JSON like {"data.example.com": {"Authorization": "Bearer ..."}}'
    try:
        loaded = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}", where="TUNER_URL_HEADERS_FILE", fix=fix) from None
    except ValueError:
        raise UserError(f"{path} is not valid JSON", where="TUNER_URL_HEADERS_FILE", fix=fix) from None
    if not (isinstance(loaded, dict) and all(
            isinstance(h, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in h.items())
            for h in loaded.values())):
        raise UserError(f"{path} must map each host to an object of header names and values",
                        where="TUNER_URL_HEADERS_FILE", fix=fix)
    return {host.lower(): headers for host, headers in loaded.items()}


def check_resolved_addresses(url: str, where: str) -> None:
    """Refuse hostnames that resolve to private addresses (a DNS name can hide 10.0.0.1)."""
    host = urlsplit(url).hostname or ""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        raise UserError(f"cannot resolve host {host!r}", where=where, fix="check the URL") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global:
            raise UserError(f"{host} resolves to the non-public address {address}", where=where,
                            fix="use a public URL, or pass --allow-private-urls for local use")


def redact(url: str) -> str:
    """Drop credentials and the query string (it often carries tokens) from a URL for logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port:
        host += f":{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}" + ("?…" if parts.query else "")
