"""The registry client under push and pull (tuner.oci.pull), and the push, over the OCI distribution API with oras-py.

oras-py 0.2.43 speaks the protocol (blob existence checks, upload sessions, blob and manifest
URLs); tuner adds what a job runner needs on top of it:

- credentials from the mounted push secret (`tuner.spec.credentials`), answering both Basic and Bearer
  challenges (password or identity token) and sending them up front once known, so a large blob
  is never sent twice;
- a bounded retry policy (tenacity) around whole operations: 5xx, 429 and dropped connections
  back off and retry until a total time budget is spent, while 401/403 fail at once. oras's own
  retry decorator retries every error, authentication included, for about two minutes, so
  `do_request` here replaces it;
- manifests are sent as the exact bytes of the OCI layout, so the registry digest equals the local
  one (oras's `upload_manifest` re-serialises the JSON).
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import oras.auth.base
import oras.auth.utils
import oras.container
import oras.provider
import requests
import tenacity

from tuner.errors import UserError, quote
from tuner.observe import events
from tuner.oci.image import (
    MANIFEST_MEDIA_TYPE,
    blob_path,
    read_layout_manifest,
)
from tuner.spec.credentials import Credentials, docker_config_file, load_credentials
from tuner.spec.targets import OciLayoutTarget, RegistryOptions

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
_TIMEOUT = (30, 300)  # seconds to connect, seconds between bytes
# Blobs go up in PATCH chunks of this size, so pushing a multi-GB adapter holds one chunk in memory
# (oras's monolithic put_upload reads the whole blob). 64 MB chunks measured as fast as one PUT.
_UPLOAD_CHUNK = 64 << 20
T = TypeVar("T")


@dataclass(frozen=True)
class PushResult:
    reference: str
    digest: str
    uploaded_bytes: int
    skipped_blobs: int


class Transient(Exception):
    """A failure worth retrying: 5xx, 429, or a mismatch that a fresh attempt may not repeat."""


class _ChallengeAuth(oras.auth.base.AuthBackend):
    """Answers the registry's WWW-Authenticate challenge, Basic or Bearer, with the credentials."""

    def __init__(self, credentials: Credentials | None, session: requests.Session, tls_verify: bool | str):
        super().__init__()
        self.credentials = credentials
        self.session = session
        self._tls_verify = tls_verify
        self._header: str | None = None  # sent with every request once a challenge was answered

    def header(self) -> dict[str, str]:
        return {"Authorization": self._header} if self._header else {}

    def answer(self, response: requests.Response) -> bool:
        """Set the header that answers response's challenge; False when there is nothing to answer with.

        Called at most once per request, so a refused answer fails the request instead of looping,
        while an expired token is renewed by the next challenge.
        """
        challenge = response.headers.get("WWW-Authenticate", "")
        scheme = challenge.split(" ", 1)[0].lower()
        creds = self.credentials
        if scheme == "basic":
            if creds is None or creds.password is None:
                return False
            self._header = "Basic " + oras.auth.utils.get_basic_auth(creds.username or "", creds.password)
            return True
        if scheme == "bearer":
            token = self._request_token(oras.auth.utils.parse_auth_header(challenge))
            if token:
                self._header = f"Bearer {token}"
            return bool(token)
        return False

    def _request_token(self, challenge: oras.auth.utils.authHeader) -> str | None:
        params = {k: v for k, v in (("service", challenge.service), ("scope", challenge.scope)) if v}
        creds = self.credentials
        if not challenge.realm:
            return None
        if creds is not None and creds.identity_token:  # OAuth2 refresh-token grant (ACR, docker login --identity-token)
            response = self.session.post(challenge.realm, data=params | {
                "grant_type": "refresh_token", "refresh_token": creds.identity_token, "client_id": "tuner"},
                verify=self._tls_verify, timeout=_TIMEOUT)
        else:
            auth = (creds.username or "", creds.password) if creds is not None and creds.password is not None else None
            response = self.session.get(challenge.realm, params=params, auth=auth, verify=self._tls_verify,
                                        timeout=_TIMEOUT)
        if response.status_code >= 500 or response.status_code == 429:
            raise Transient(f"token service {challenge.realm} answered {response.status_code}")
        if response.status_code != 200:
            return None
        body = response.json()
        return body.get("token") or body.get("access_token")


class RegistryClient(oras.provider.Registry):
    """An oras Registry bound to one host, with tuner's auth answers and failure policy."""

    def __init__(self, host: str, options: RegistryOptions):
        tls_verify: bool | str = str(options.ca_cert) if options.ca_cert else True
        super().__init__(hostname=host, insecure=host in options.insecure_registries, tls_verify=tls_verify,
                         auth_backend="basic")
        config_file = docker_config_file(options.config_file)
        self.credentials = load_credentials(host, config_file)
        self.config_file = config_file
        self.auth = _ChallengeAuth(self.credentials, self.session, tls_verify)
        self.options = options

    def do_request(self, url: str, method: str = "GET", data: Any = None, headers: dict | None = None,
                   json: dict | None = None, stream: bool = False) -> requests.Response:
        """One HTTP exchange, answering an auth challenge once; 5xx/429 raise Transient, 401/403 UserError."""
        def send() -> requests.Response:
            return self.session.request(method, url, data=data, json=json, headers=(headers or {}) | self.auth.header(),
                                        stream=stream, verify=self._tls_verify, timeout=_TIMEOUT)

        try:
            response = send()
            if response.status_code == 401 and self.auth.answer(response):
                response = send()
        except requests.exceptions.SSLError as e:
            raise UserError(f"TLS verification of registry {self.hostname} failed ({_reason(e)})",
                            fix="pass the registry's CA with --registry-ca CA.pem, or --insecure-registry "
                                f"{self.hostname} if it only speaks plain HTTP") from None
        if response.status_code in (401, 403):
            raise self._auth_error(response.status_code)
        if response.status_code >= 500 or response.status_code == 429:
            raise Transient(f"{method} {_path(url)} answered {response.status_code}")
        return response

    def _auth_error(self, status: int) -> UserError:
        if self.credentials is None:
            found = f"{self.config_file} has no entry for it" if self.config_file else "no docker config was found"
            return UserError(f"registry {self.hostname} asks for credentials (HTTP {status}) and {found}",
                             fix="mount the imagePushSecret (a kubernetes.io/dockerconfigjson Secret) as "
                                 "$DOCKER_CONFIG/config.json, or pass --registry-config")
        verb = "refused" if status == 401 else "denied access with"
        return UserError(f"registry {self.hostname} {verb} the credentials for it in {self.credentials.source} "
                         f"(HTTP {status})",
                         fix="check the push secret's user, password or token and its push rights on the repository")

    def retrying(self, deadline: float, what: str, operation: Callable[[], T]) -> T:
        """Run operation, retrying transient failures with backoff until the deadline."""
        def log_retry(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            events.warn(f"{what}: {_reason(error)}; retrying in {state.next_action.sleep:.1f}s "
                        f"(attempt {state.attempt_number + 1})")

        retryer = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type((Transient, requests.ConnectionError, requests.Timeout,
                                                    requests.exceptions.ChunkedEncodingError)),
            stop=tenacity.stop_before_delay(max(0.0, deadline - time.monotonic())),
            wait=tenacity.wait_exponential_jitter(multiplier=0.5, max=15, jitter=0.5),
            before_sleep=log_retry, reraise=True)
        try:
            return retryer(operation)
        except (Transient, requests.RequestException) as e:
            raise UserError(f"{what} failed after {self.options.retry_seconds:.0f}s of retries: {_reason(e)}",
                            where=f"registry {self.hostname}") from None


def _reason(error: BaseException | None) -> str:
    """A short, credential-free description of a transport error."""
    if isinstance(error, requests.ConnectionError):
        return "connection failed or was dropped"
    if isinstance(error, requests.Timeout):
        return "timed out"
    return str(error).splitlines()[0] if error else "unknown error"


def _path(url: str) -> str:
    return "/" + url.split("://", 1)[-1].split("/", 1)[-1].split("?", 1)[0]


def container_of(reference: str) -> oras.container.Container:
    """The oras view of a registry reference, normalised as Kaito reads it, addressed at the host
    that serves the registry API (Docker Hub's names live on registry-1.docker.io)."""
    from tuner.spec.targets import RegistryTarget, parse_output_ref

    target = parse_output_ref(reference)
    if not isinstance(target, RegistryTarget):
        raise UserError(f"{quote(reference)} is not a registry image reference",
                        fix="write it as [REGISTRY/]REPOSITORY[:TAG][@DIGEST]")
    container = oras.container.Container(target.reference)
    container.registry = target.parsed.api_host
    return container


def push_layout(source: OciLayoutTarget, reference: str, options: RegistryOptions) -> PushResult:
    """Copy the image tagged source.tag in an OCI layout to `reference`, skipping blobs it has."""
    container = container_of(reference)
    if container.digest:
        raise UserError(f"cannot push to a digest reference ({reference})", fix="push to a tag: REGISTRY/REPO:TAG")
    manifest_bytes, manifest = read_layout_manifest(source)
    client = RegistryClient(container.registry, options)
    deadline = time.monotonic() + options.retry_seconds
    image_digest = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
    url = f"{client.prefix}://{container.manifest_url()}"
    if _tag_points_at(client, url, manifest.get("mediaType", MANIFEST_MEDIA_TYPE), deadline) == image_digest:
        events.info(f"push: {reference} already points at {image_digest}: nothing to upload")
        return PushResult(reference, image_digest, 0, 1 + len(manifest["layers"]))
    uploaded, skipped = 0, 0
    for descriptor in [manifest["config"], *manifest["layers"]]:
        digest, size = descriptor["digest"], descriptor["size"]
        path = blob_path(source.path, digest)
        label = f"blob {digest[7:19]} ({size / 1e6:,.1f} MB)"
        if client.retrying(deadline, f"checking {label}", functools.partial(client.blob_exists, descriptor, container)):
            skipped += 1
            events.info(f"push: {label} already in {container.registry}, not uploaded")
            continue
        started = time.monotonic()
        response = client.retrying(deadline, f"uploading {label}",
                                   functools.partial(_upload, client, path, container, descriptor))
        seconds = max(time.monotonic() - started, 1e-6)
        uploaded += size
        events.info(f"push: {label} uploaded in {seconds:.1f}s ({size / seconds / 1e6:,.0f} MB/s)"
                    + ("" if response.status_code == 201 else f", HTTP {response.status_code}"))
    response = client.retrying(deadline, "uploading the manifest", lambda: check_response(client.do_request(
        url, "PUT", data=manifest_bytes, headers={"Content-Type": manifest.get("mediaType", MANIFEST_MEDIA_TYPE)})))
    echoed = response.headers.get("Docker-Content-Digest")
    if echoed and echoed != image_digest:
        raise UserError(f"registry {container.registry} stored the manifest as {echoed}, expected {image_digest}")
    return PushResult(reference, image_digest, uploaded, skipped)


def _tag_points_at(client: RegistryClient, url: str, media_type: str, deadline: float) -> str | None:
    """The digest the tag currently names (HEAD of the manifest), or None when the tag is new."""
    response = client.retrying(deadline, "checking the tag",
                               lambda: client.do_request(url, "HEAD", headers={"Accept": media_type}))
    return response.headers.get("Docker-Content-Digest") if response.status_code == 200 else None


def _upload(client: RegistryClient, path: Path, container: oras.container.Container,
            descriptor: dict) -> requests.Response:
    """One whole blob upload session (POST, PATCH chunks, PUT)."""
    try:
        response = client.chunked_upload(str(path), container, descriptor, chunk_size=_UPLOAD_CHUNK)
    except ValueError as e:  # oras: a chunk was refused, e.g. the upload session expired; start a new one
        raise Transient(str(e).split("?", 1)[0]) from None
    return check_response(response)


def check_response(response: requests.Response) -> requests.Response:
    if response.status_code not in (200, 201, 202):
        raise UserError(f"registry answered {response.status_code} to {response.request.method} "
                        f"{_path(response.request.url or '')}: {_registry_error(response)}")
    return response


def _registry_error(response: requests.Response) -> str:
    try:
        errors = response.json().get("errors", [])
        return "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors) or response.reason
    except (ValueError, AttributeError):
        return response.reason or "no details"