"""Bring the tuning inputs into the work directory: URLs downloaded, volume paths listed."""

from __future__ import annotations

import hashlib
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tuner import events
from tuner.errors import UserError
from tuner.registry import RegistryOptions
from tuner.readers import COMPRESSIONS, SUPPORTED_SUFFIXES, dataset_files
from tuner.spec import DataSource, local_host_path

_CHUNK = 1 << 20
_TIMEOUT = (10, 60)  # connect, read (seconds)


@dataclass(frozen=True)
class InputFile:
    """One dataset file on local disk, with where it came from and its sha256."""

    path: Path
    source: str
    sha256: str
    size: int


def fetch_inputs(source: DataSource, dest: Path, *, base_dir: Path, allow_private_urls: bool = False,
                 registry: RegistryOptions | None = None) -> list[InputFile]:
    """Resolve `tuning.input` to local files: download URLs or an image's /data into `dest`, or
    list a volume's files."""
    if source.urls:
        dest.mkdir(parents=True, exist_ok=True)
        return [_download(url, dest, index, allow_private_urls) for index, url in enumerate(source.urls)]
    if source.volume_source:
        return _volume_files(source.volume_source, base_dir)
    return _image_files(source.image or "", dest / "image", registry or RegistryOptions())


def _image_files(reference: str, dest: Path, registry: RegistryOptions) -> list[InputFile]:
    """Pull a dataset image's /data (again only if an earlier pull did not finish)."""
    from tuner.registry import pull_image

    if not dest.is_dir():
        try:
            pulled = pull_image(reference, dest, registry, required=())
        except UserError as exc:
            raise UserError(str(exc), where="tuning.input.image") from None
        events.info(f"fetch: {reference} @ {pulled.digest}: {len(pulled.files)} files")
    try:
        files = dataset_files([dest])
    except UserError as exc:
        raise UserError(str(exc), where="tuning.input.image") from None
    return [InputFile(p, f"{reference}:/data/{p.relative_to(dest).as_posix()}", _sha256(p), p.stat().st_size)
            for p in files]


def _volume_files(volume: dict, base_dir: Path) -> list[InputFile]:
    root = local_host_path(volume, base_dir, "tuning.input.volumeSource")
    try:
        files = dataset_files([root])
    except UserError as exc:
        raise UserError(str(exc), where="tuning.input.volumeSource.hostPath.path") from None
    return [InputFile(p, str(p), _sha256(p), p.stat().st_size) for p in files]


def _download(url: str, dest: Path, index: int, allow_private: bool) -> InputFile:
    where = f"tuning.input.urls[{index}]"
    if not allow_private:
        _check_resolved_addresses(url, where)
    name = Path(unquote(urlsplit(url).path)).name or "data"
    target = dest / f"{index:03d}-{name}"
    session = _session()
    digest = hashlib.sha256()
    size = 0
    partial = target.with_name(target.name + ".part")
    try:
        with session.get(url, stream=True, timeout=_TIMEOUT, allow_redirects=True) as response:
            if response.status_code >= 400:
                raise UserError(f"{_redact(url)} answered HTTP {response.status_code}", where=where,
                                fix="check the URL and that the file is public or its credentials are set")
            if "text/html" in response.headers.get("Content-Type", ""):
                raise UserError(f"{_redact(url)} returned an HTML page, not a dataset file", where=where,
                                fix="use the file's direct download URL")
            with partial.open("wb") as out:
                for chunk in response.iter_content(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
    except UserError:
        raise
    except Exception as exc:  # requests wraps socket, TLS and retry errors in many types
        raise UserError(f"cannot download {_redact(url)}: {type(exc).__name__}", where=where,
                        fix="check the URL and the network") from None
    target = _with_data_suffix(target, partial)
    partial.replace(target)
    events.info(f"fetch: {_redact(url)} -> {target.name} ({size:,} bytes, sha256 {digest.hexdigest()[:12]})")
    return InputFile(target, _redact(url), digest.hexdigest(), size)


def _with_data_suffix(target: Path, content: Path) -> Path:
    """Name the file by its content when the URL's name carries no dataset suffix."""
    if any(target.name.lower().endswith(s + c) for s in SUPPORTED_SUFFIXES for c in ("", *COMPRESSIONS)):
        return target
    with content.open("rb") as handle:
        head = handle.read(64).lstrip()
    if head.startswith(b"PAR1"):
        return target.with_name(target.name + ".parquet")
    if head.startswith(b"["):
        return target.with_name(target.name + ".json")
    if head.startswith(b"{"):
        return target.with_name(target.name + ".jsonl")
    return target.with_name(target.name + ".csv")


def _check_resolved_addresses(url: str, where: str) -> None:
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


def _session():
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    retry = Retry(total=5, backoff_factor=0.5, status_forcelist=(429, 500, 502, 503, 504),
                  allowed_methods=frozenset({"GET"}), raise_on_status=False)
    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    return session


def _redact(url: str) -> str:
    """Drop credentials and the query string (it often carries tokens) from a URL for logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}" + ("?…" if parts.query else "")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()

