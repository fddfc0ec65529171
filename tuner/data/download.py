"""Dataset URLs downloaded into the work directory, resumably, within limits of size and time.

- Status retries: 429/500/502/503/504 and connect errors are retried `_RETRIES` times with
  exponential backoff (`_BACKOFF` seconds, doubling); a response that does not come within the
  read timeout is retried like a cut, against the same budget and deadline.
- Resume: a body cut mid-transfer continues with `Range: bytes=N-` (and `If-Range` with the ETag or
  Last-Modified when the server gave one), at most `_RESUMES` times; a server that answers the
  range with 200 is read again from byte 0. A `.part` a killed run left resumes the same way.
- 4xx, and an HTML page instead of data, fail at once with the status and the redacted URL
  (no userinfo, no query string).
- Size limit: `TUNER_MAX_DOWNLOAD_BYTES` (default 200 GiB), checked against Content-Length before
  the body and while streaming.
- Time limits, so no server holds a GPU node: each file has a total deadline
  (`TUNER_DOWNLOAD_DEADLINE_SECONDS`, default 6 h: 200 GiB at 10 MB/s) and a minimum rate
  (`TUNER_DOWNLOAD_MIN_BYTES_PER_SECOND`, default 16 KiB/s, measured over each
  `TUNER_DOWNLOAD_RATE_WINDOW_SECONDS`, default 60); every read waits at most
  `TUNER_DOWNLOAD_READ_TIMEOUT_SECONDS` (default 60). A body that stops at the same byte three
  times (shorter than its Content-Length: a server that lies) ends the download instead of
  resuming it ten times.
- `#sha256=<hex>` at the end of a URL is checked against the file and never sent to the server.
- Private URLs: `TUNER_URL_HEADERS_FILE` names a JSON file (mounted from a Secret) mapping a host to
  the headers sent to it, `{"data.example.com": {"Authorization": "Bearer ..."}}`; a `host:port` key
  matches that port only. Headers go to that host alone, never to a redirect elsewhere, and are
  never logged. Redirects are followed here, each hop address-checked like the URL itself.
- A finished download is recorded in a sidecar (`.NNN-name.fetch.json`: a hash of the URL, the
  file, its sha256 and size); a re-run with the file still there makes no request.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

from tuner.data.readers import COMPRESSIONS, SUPPORTED_SUFFIXES
from tuner.data.url_rules import check_resolved_addresses, host_headers, redact, split_sha256
from tuner.errors import UserError
from tuner.observe import events
from tuner.workdir import atomic_write_json

_CHUNK = 1 << 20
_CONNECT_TIMEOUT = 10
_RETRIES = 5  # per request, for retryable statuses and errors before the response
_RESUMES = 10  # Range requests after cuts mid-body, per file
_STUCK_CUTS = 2  # cuts in a row at the same byte (after the first one there) that end the download
_BACKOFF = 0.5  # seconds, doubled per retry
_REDIRECTS = 10
_MAX_BYTES = 200 << 30  # per file, unless TUNER_MAX_DOWNLOAD_BYTES says otherwise
_NAME_LIMIT = 120  # characters of a URL's file name kept in the local name (file systems allow 255 bytes)


@dataclass(frozen=True)
class DownloadLimits:
    """What one file's download may take, from the environment (see the module docstring)."""

    max_bytes: int = _MAX_BYTES
    deadline_seconds: float = 6 * 3600
    min_bytes_per_second: float = 16 << 10
    rate_window_seconds: float = 60
    read_timeout_seconds: float = 60

    @classmethod
    def from_env(cls) -> DownloadLimits:
        values = {}
        for name, env in (("max_bytes", "TUNER_MAX_DOWNLOAD_BYTES"),
                          ("deadline_seconds", "TUNER_DOWNLOAD_DEADLINE_SECONDS"),
                          ("min_bytes_per_second", "TUNER_DOWNLOAD_MIN_BYTES_PER_SECOND"),
                          ("rate_window_seconds", "TUNER_DOWNLOAD_RATE_WINDOW_SECONDS"),
                          ("read_timeout_seconds", "TUNER_DOWNLOAD_READ_TIMEOUT_SECONDS")):
            text = os.environ.get(env, "").strip()
            if not text:
                continue
            try:
                number = float(text)
            except ValueError:
                number = -1.0
            if not number >= 0 or number == float("inf") or (number == 0 and name != "min_bytes_per_second"):
                raise UserError(f"{env}={text[:40]!r} is not a positive number", where=env, fix="set a positive number")
            values[name] = int(number) if name == "max_bytes" else number
        return cls(**values)


@dataclass(frozen=True)
class InputFile:
    """One dataset file on local disk, with where it came from and its sha256."""

    path: Path
    source: str
    sha256: str
    size: int


def download(url: str, dest: Path, index: int, allow_private: bool) -> InputFile:
    """Download one URL into `dest` (or reuse the copy a finished earlier run left there)."""
    where = f"tuning.input.urls[{index}]"
    url, expected = split_sha256(url, where)
    stem = f"{index:03d}-{_local_name(Path(unquote(urlsplit(url).path)).name)}"
    record = dest / f".{stem}.fetch.json"
    url_id = hashlib.sha256(url.encode()).hexdigest()
    done = _read_record(record)
    if done.get("url") == url_id and done.get("state") == "done" and expected in (None, done["sha256"]):
        target = dest / done["file"]
        if target.is_file() and target.stat().st_size == done["size"]:
            events.info(f"fetch: {redact(url)} -> {target.name} (fetched earlier, sha256 {done['sha256'][:12]})")
            return InputFile(target, redact(url), done["sha256"], done["size"])
    if not allow_private:
        check_resolved_addresses(url, where)
    partial = dest / f"{stem}.part"
    sha256, size = _transfer(url, partial, record, url_id, where, allow_private)
    if expected is not None and sha256 != expected:
        _discard(partial, record)
        raise UserError(f"{redact(url)} has sha256 {sha256}, not the {expected} its #sha256= names",
                        where=where, fix="check that the URL serves the intended file, or correct the #sha256=")
    target = _with_data_suffix(dest / stem, partial)
    partial.replace(target)
    _write_record(record, {"url": url_id, "state": "done", "file": target.name, "sha256": sha256, "size": size})
    events.info(f"fetch: {redact(url)} -> {target.name} ({size:,} bytes, sha256 {sha256[:12]})")
    return InputFile(target, redact(url), sha256, size)


def _transfer(url: str, partial: Path, record: Path, url_id: str, where: str,
              allow_private: bool) -> tuple[str, int]:
    """Stream `url` into `partial`, resuming with a Range request after a cut; (sha256, size)."""
    import requests
    import urllib3

    state = _read_record(record)
    resumable = state.get("url") == url_id and state.get("state") == "partial" and partial.is_file()
    validator: str | None = state.get("validator") if resumable else None
    offset = partial.stat().st_size if resumable else 0
    digest = _sha256_of(partial) if offset else hashlib.sha256()
    limits = DownloadLimits.from_env()
    limit = limits.max_bytes
    session = _session()
    clock = _Clock(limits, url, where)
    cuts = stuck = received = 0  # stuck: cuts in a row that brought no byte past `furthest`
    furthest = offset
    while True:
        headers = {"Accept-Encoding": "identity"}  # Range offsets count the bytes as stored
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if validator:
                headers["If-Range"] = validator
        receiving = False
        try:
            clock.check(received)
            with _get(session, url, headers, where, allow_private, clock.read_timeout()) as response:
                if response.status_code == 416 and offset:  # e.g. a run killed before renaming the .part
                    partial.unlink()
                    offset, validator = 0, None
                    continue
                offset = _start(response, url, partial, record, offset, limit, where)
                if offset == 0:
                    digest = hashlib.sha256()
                    validator = _validator(response)
                    _write_record(record, {"url": url_id, "state": "partial", "validator": validator})
                receiving = True
                with partial.open("ab") as out:
                    # Raw bytes as they arrive: a read that waits for a full chunk loses what it
                    # had when the connection is cut or times out.
                    while chunk := response.raw.read1(_CHUNK, decode_content=False):
                        if offset == 0 and _looks_like_html(chunk):
                            _discard(partial, record)
                            raise _html_error(url, where)
                        offset += len(chunk)
                        if offset > limit:
                            _discard(partial, record)
                            raise _limit_error(url, limit, where)
                        out.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        clock.check(received)
            return digest.hexdigest(), offset
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            # Before the body, urllib3's Retry has already retried; a cut body resumes from `offset`.
            # A wait for the response that timed out is retried here (not by urllib3), against the deadline.
            timed_out = not receiving and _timed_out(exc)
            cuts += 1
            stuck = 0 if offset > furthest or timed_out else stuck + 1
            furthest = max(furthest, offset)
            if stuck >= _STUCK_CUTS:  # a body shorter than its Content-Length: asking again will not help
                raise UserError(f"{redact(url)} stops sending at byte {offset:,} every time ({stuck + 1} tries; its "
                                "Content-Length promised more)", where=where,
                                fix="fix the server, or download the file another way") from None
            if (not receiving and not timed_out) or cuts > _RESUMES:
                raise UserError(f"cannot download {redact(url)}: {type(exc).__name__}"
                                + (f" after {cuts} cut(s)" if receiving else " (no answer)" if timed_out else ""),
                                where=where,
                                fix="check the URL and the network; a re-run resumes the download") from None
            events.info(f"fetch: {redact(url)} " + (f"cut after {offset:,} bytes ({type(exc).__name__}); resuming"
                                                     if receiving else "did not answer in time; retrying"))
            time.sleep(min(_BACKOFF * 2 ** min(cuts - 1, 6), clock.remaining()))


def _timed_out(exc: Exception) -> bool:
    """A wait for the response that ran out (requests reports a read timeout before the response,
    with urllib3's retries off, as a ConnectionError wrapping urllib3's ReadTimeoutError)."""
    import requests
    import urllib3

    if isinstance(exc, requests.Timeout):
        return True
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(reason, urllib3.exceptions.ReadTimeoutError)


class _Clock:
    """A download's deadline and minimum rate: `check(bytes held)` raises once either is broken."""

    def __init__(self, limits: DownloadLimits, url: str, where: str):
        self.limits, self.url, self.where = limits, url, where
        self.started = self.window_start = time.monotonic()
        self.window_bytes: int | None = None

    def remaining(self) -> float:
        return max(0.0, self.started + self.limits.deadline_seconds - time.monotonic())

    def read_timeout(self) -> tuple[float, float]:
        """(connect, read) timeouts for the next request, never past the deadline."""
        left = max(self.remaining(), 0.1)
        return min(_CONNECT_TIMEOUT, left), min(self.limits.read_timeout_seconds, left)

    def check(self, held: int) -> None:
        now = time.monotonic()
        if self.remaining() <= 0:
            raise UserError(f"downloading {redact(self.url)} took more than {self.limits.deadline_seconds:g}s "
                            f"({held:,} bytes so far)", where=self.where,
                            fix="check the server, or raise TUNER_DOWNLOAD_DEADLINE_SECONDS for a huge file")
        if self.window_bytes is None:
            self.window_bytes = held
        elapsed = now - self.window_start
        if elapsed >= self.limits.rate_window_seconds:
            rate = (held - self.window_bytes) / elapsed
            if rate < self.limits.min_bytes_per_second and held == 0:
                raise UserError(f"{redact(self.url)} sent no byte in {elapsed:.0f}s", where=self.where,
                                fix="check that the server answers, or lower TUNER_DOWNLOAD_MIN_BYTES_PER_SECOND")
            if rate < self.limits.min_bytes_per_second:
                raise UserError(f"{redact(self.url)} sends {rate:,.0f} bytes/s, less than "
                                f"{self.limits.min_bytes_per_second:,.0f} over {elapsed:.0f}s", where=self.where,
                                fix="check the server, or lower TUNER_DOWNLOAD_MIN_BYTES_PER_SECOND")
            self.window_start, self.window_bytes = now, held


def _get(session, url: str, headers: dict[str, str], where: str, allow_private: bool,
         timeout: tuple[float, float]):
    """GET `url`, following redirects here so each hop is address-checked and host headers stay
    with their host."""
    current = url
    for _ in range(_REDIRECTS + 1):
        response = session.get(current, headers={**host_headers(current), **headers}, stream=True,
                               timeout=timeout, allow_redirects=False)
        if not response.is_redirect:
            return response
        location = urljoin(current, response.headers["Location"])
        response.close()
        if urlsplit(location).scheme not in ("http", "https"):
            raise UserError(f"{redact(url)} redirects to a non-HTTP URL", where=where, fix="use a direct URL")
        if not allow_private:
            check_resolved_addresses(location, where)
        current = location
    raise UserError(f"{redact(url)} redirects more than {_REDIRECTS} times", where=where, fix="use a direct URL")


def _start(response, url: str, partial: Path, record: Path, offset: int, limit: int, where: str) -> int:
    """Check a response before its body; the offset its body starts at (0: `partial` was emptied)."""
    status = response.status_code
    if status not in (200, 206):
        fix = ("check the URL, and the credentials in TUNER_URL_HEADERS_FILE for a private one"
               if status in (401, 403) else "check the URL and that the file is public or its credentials are set")
        raise UserError(f"{redact(url)} answered HTTP {status}", where=where, fix=fix)
    if "text/html" in response.headers.get("Content-Type", ""):
        _discard(partial, record)
        raise _html_error(url, where)
    resumed = status == 206 and offset > 0 and _range_start(response.headers.get("Content-Range", "")) == offset
    if status == 206 and not resumed:
        raise UserError(f"{redact(url)} answered a range that was not asked for", where=where,
                        fix="check the server's Range support")
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and (offset if resumed else 0) + int(length) > limit:
        _discard(partial, record)
        raise _limit_error(url, limit, where)
    if resumed:
        return offset
    partial.unlink(missing_ok=True)  # the server ignored the Range (or none was sent): start over
    return 0


def _range_start(content_range: str) -> int | None:
    """The first byte of `Content-Range: bytes FIRST-LAST/TOTAL`."""
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", content_range.strip())
    return int(match.group(1)) if match else None


def _validator(response) -> str | None:
    """What If-Range can name to resume only the same file: a strong ETag, else Last-Modified."""
    etag = response.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return response.headers.get("Last-Modified")


def _looks_like_html(head: bytes) -> bool:
    return head[:64].lstrip().lower().startswith((b"<!doctype html", b"<html"))


def _html_error(url: str, where: str) -> UserError:
    return UserError(f"{redact(url)} returned an HTML page, not a dataset file", where=where,
                     fix="use the file's direct download URL (a login or preview page is HTML)")


def _limit_error(url: str, limit: int, where: str) -> UserError:
    return UserError(f"{redact(url)} is larger than the download limit of {limit:,} bytes", where=where,
                     fix="raise TUNER_MAX_DOWNLOAD_BYTES, or check the URL")





def _read_record(record: Path) -> dict:
    try:
        loaded = json.loads(record.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _write_record(record: Path, content: dict) -> None:
    atomic_write_json(record, content)


def _local_name(name: str) -> str:
    """A URL's file name as a safe local one: no NUL, slash or control characters, and short enough for
    any file system (the dataset suffixes kept, since they decide how the file is read)."""
    name = re.sub(r"[\x00-\x1f\x7f/\\]", "_", name).strip(". ") or "data"
    if len(name) <= _NAME_LIMIT:
        return name
    suffix = next((s + c for s in SUPPORTED_SUFFIXES for c in ("", *COMPRESSIONS) if name.lower().endswith(s + c)), "")
    return name[:_NAME_LIMIT - len(suffix)] + name[len(name) - len(suffix):]


def _discard(partial: Path, record: Path) -> None:
    partial.unlink(missing_ok=True)
    record.unlink(missing_ok=True)


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



def _session():
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    # read=0: a response that does not come in time is retried by _transfer, which keeps the deadline
    retry = Retry(total=_RETRIES, read=0, backoff_factor=_BACKOFF, status_forcelist=(429, 500, 502, 503, 504),
                  allowed_methods=frozenset({"GET"}), raise_on_status=False)
    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    return session



def sha256_file(path: Path) -> str:
    return _sha256_of(path).hexdigest()


def _sha256_of(path: Path):
    """A sha256 object fed with the file's bytes (to go on hashing what is appended)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest
