"""Self-test of tests/registry_support.py: real registries, proxies and skopeo behave as promised."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import pytest
import requests

from registry_support import (
    FaultProxy,
    RegistryServer,
    TokenAuthProxy,
    skopeo,
    skopeo_auth_args,
    skopeo_tls_args,
)


def _oci_layout(directory: Path, tag: str = "v1") -> bytes:
    """Write a one-layer OCI image layout tagged `tag`; return its manifest bytes."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes, media_type: str) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as archive:
        payload = b"hello registry\n" * 1000
        info = tarfile.TarInfo("hello.txt")
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
    diff_id = "sha256:" + hashlib.sha256(tar.getvalue()).hexdigest()
    config = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff_id]}}
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": blob(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json"),
        "layers": [blob(gzip.compress(tar.getvalue(), mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip")],
    }).encode()
    entry = blob(manifest, "application/vnd.oci.image.manifest.v1+json")
    index = {"schemaVersion": 2, "manifests": [{**entry, "annotations": {"org.opencontainers.image.ref.name": tag}}]}
    (directory / "index.json").write_text(json.dumps(index))
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return manifest


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> tuple[str, bytes]:
    """(skopeo source `oci:DIR:v1`, manifest bytes) of a tiny image."""
    directory = tmp_path_factory.mktemp("image") / "layout"
    return f"oci:{directory}:v1", _oci_layout(directory)


@pytest.fixture(scope="module")
def pushed_tls(registry_tls: RegistryServer, image: tuple[str, bytes]) -> str:
    """`docker://` reference of the image pushed once to the TLS registry."""
    ref = f"docker://{registry_tls.host}/selftest/tls:v1"
    skopeo("copy", image[0], ref, *skopeo_auth_args(registry_tls, "dest"))
    return ref


def _push(image: tuple[str, bytes], target: RegistryServer | FaultProxy, repo: str) -> None:
    skopeo("copy", image[0], f"docker://{target.host}/{repo}:v1", *skopeo_auth_args(target, "dest"))


def _upload_bytes(proxy: FaultProxy) -> int:
    """Request body bytes sent to blob-upload endpoints (POST/PATCH/PUT .../blobs/uploads/...)."""
    return sum(r.body_bytes for r in proxy.requests if "/blobs/uploads/" in r.path)


def _challenge(response: requests.Response) -> dict[str, str]:
    """The parameters of a `WWW-Authenticate: Bearer k="v",...` header."""
    header = response.headers["WWW-Authenticate"]
    assert header.startswith("Bearer ")
    return dict(re.findall(r'(\w+)="([^"]*)"', header))


def test_tls_push_then_raw_inspect_returns_the_same_manifest(
    registry_tls: RegistryServer, image: tuple[str, bytes], pushed_tls: str
) -> None:
    assert skopeo("inspect", "--raw", pushed_tls, *skopeo_auth_args(registry_tls)).encode() == image[1]


def test_tls_certificate_verifies_only_against_its_ca(registry_tls: RegistryServer) -> None:
    assert registry_tls.ca_cert is not None and registry_tls.url.startswith("https://")
    assert requests.get(f"{registry_tls.url}/v2/", verify=registry_tls.ca_cert, timeout=5).status_code == 401
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{registry_tls.url}/v2/", timeout=5)


def test_plain_http_registry_takes_htpasswd_auth(registry_plain: RegistryServer, image: tuple[str, bytes]) -> None:
    skopeo("copy", image[0], f"docker://{registry_plain.host}/selftest/plain:v1",
           f"--dest-creds={registry_plain.username}:{registry_plain.password}", "--dest-tls-verify=false")
    ref = f"docker://{registry_plain.host}/selftest/plain:v1"
    assert skopeo("inspect", "--raw", ref, *skopeo_auth_args(registry_plain)).encode() == image[1]


def test_wrong_password_is_refused(registry_tls: RegistryServer, pushed_tls: str) -> None:
    with pytest.raises(AssertionError, match="unauthorized: authentication required"):
        skopeo("inspect", "--raw", pushed_tls, f"--creds={registry_tls.username}:wrong", *skopeo_tls_args(registry_tls))


def test_docker_config_auth_style_authenticates_skopeo(
    registry_tls: RegistryServer, pushed_tls: str, tmp_path: Path
) -> None:
    config = registry_tls.docker_config(tmp_path / "secret") / "config.json"
    entry = json.loads(config.read_text())["auths"][registry_tls.host]
    assert base64.b64decode(entry["auth"]).decode() == f"{registry_tls.username}:{registry_tls.password}"
    skopeo("inspect", "--raw", pushed_tls, f"--authfile={config}", *skopeo_tls_args(registry_tls))


def test_docker_config_userpass_style_is_ignored_by_skopeo(
    registry_tls: RegistryServer, pushed_tls: str, tmp_path: Path
) -> None:
    """Kubernetes accepts username/password entries; containers/image (skopeo) reads only `auth`."""
    config = registry_tls.docker_config(tmp_path / "secret", style="userpass") / "config.json"
    entry = json.loads(config.read_text())["auths"][registry_tls.host]
    assert entry == {"username": registry_tls.username, "password": registry_tls.password}
    with pytest.raises(AssertionError, match="unauthorized"):
        skopeo("inspect", "--raw", pushed_tls, f"--authfile={config}", *skopeo_tls_args(registry_tls))


def test_proxy_forwards_and_upload_location_points_at_proxy(fault_proxy: FaultProxy) -> None:
    server = fault_proxy.upstream
    response = requests.post(f"{fault_proxy.url}/v2/selftest/location/blobs/uploads/",
                             auth=(server.username, server.password), timeout=5)
    assert response.status_code == 202
    assert response.headers["Location"].startswith(f"{fault_proxy.url}/v2/selftest/location/blobs/uploads/")
    assert fault_proxy.requests[-1] == ("POST", "/v2/selftest/location/blobs/uploads/", 202, 0)


def test_re_push_sends_no_blob_bytes(fault_proxy: FaultProxy, image: tuple[str, bytes]) -> None:
    _push(image, fault_proxy, "selftest/re-push")
    assert _upload_bytes(fault_proxy) > 0
    fault_proxy.reset_log()
    _push(image, fault_proxy, "selftest/re-push")
    assert fault_proxy.requests and _upload_bytes(fault_proxy) == 0


def test_500_on_blob_commit_fails_skopeo_push_without_retry(fault_proxy: FaultProxy, image: tuple[str, bytes]) -> None:
    fault_proxy.fail("PUT", "/blobs/uploads/", 500)
    with pytest.raises(AssertionError, match="500 Internal Server Error"):
        _push(image, fault_proxy, "selftest/fail")
    commits = [r for r in fault_proxy.requests if r.method == "PUT" and "/blobs/uploads/" in r.path]
    assert [r.status for r in commits] == [500]
    assert not any("/manifests/" in r.path for r in fault_proxy.requests)


def test_fault_applies_to_the_next_n_matching_requests_only(fault_proxy: FaultProxy) -> None:
    fault_proxy.fail("GET", "^/v2/$", status=503, times=2)
    statuses = [requests.get(f"{fault_proxy.url}/v2/", timeout=5).status_code for _ in range(3)]
    assert statuses == [503, 503, 401]
    assert requests.head(f"{fault_proxy.url}/v2/", timeout=5).status_code == 401  # method must match too


def test_deny_answers_401_then_403_until_clear(fault_proxy: FaultProxy) -> None:
    server = fault_proxy.upstream
    fault_proxy.deny()
    denied = requests.get(f"{fault_proxy.url}/v2/", auth=(server.username, server.password), timeout=5)
    assert denied.status_code == 401 and denied.headers["WWW-Authenticate"].startswith("Basic realm=")
    assert denied.json()["errors"][0]["code"] == "UNAUTHORIZED"
    fault_proxy.deny(403)
    assert requests.get(f"{fault_proxy.url}/v2/", auth=(server.username, server.password), timeout=5).status_code == 403
    fault_proxy.clear()
    assert requests.get(f"{fault_proxy.url}/v2/", auth=(server.username, server.password), timeout=5).status_code == 200


def test_drop_resets_the_connection_after_reading_part_of_the_body(fault_proxy: FaultProxy) -> None:
    path = "/v2/selftest/drop/blobs/uploads/some-uuid"
    fault_proxy.drop("PUT", "/blobs/uploads/", after_bytes=65536)
    with pytest.raises(requests.ConnectionError):
        requests.put(f"{fault_proxy.url}{path}", data=b"x" * 4_000_000, timeout=5)
    assert fault_proxy.requests == [("PUT", path, None, 65536)]


def test_token_proxy_push_and_challenge_flow(token_proxy: TokenAuthProxy, image: tuple[str, bytes]) -> None:
    _push(image, token_proxy, "selftest/token")  # skopeo does the whole bearer dance itself
    tags_url = f"{token_proxy.url}/v2/selftest/token/tags/list"
    challenged = requests.get(tags_url, timeout=5)
    assert challenged.status_code == 401
    params = _challenge(challenged)
    assert params == {"realm": token_proxy.realm, "service": "tuner-test", "scope": "repository:selftest/token:pull"}
    upstream = token_proxy.upstream
    token = requests.get(params["realm"], params={"service": params["service"], "scope": params["scope"]},
                         auth=(upstream.username, upstream.password), timeout=5).json()["token"]
    response = requests.get(tags_url, headers={"Authorization": f"Bearer {token}"}, timeout=5)
    assert response.status_code == 200 and response.json()["tags"] == ["v1"]
    assert ("GET", "/token", 200, 0) in token_proxy.requests


def test_token_endpoint_refuses_a_wrong_password(token_proxy: TokenAuthProxy) -> None:
    response = requests.get(token_proxy.realm, params={"service": "tuner-test"},
                            auth=(token_proxy.upstream.username, "wrong"), timeout=5)
    assert response.status_code == 401


def test_refresh_token_grant_gives_a_working_access_token(token_proxy: TokenAuthProxy) -> None:
    form = {"grant_type": "refresh_token", "service": "tuner-test", "scope": "repository:selftest/refresh:pull"}
    bad = requests.post(token_proxy.realm, data={**form, "refresh_token": "idt-wrong"}, timeout=5)
    assert bad.status_code == 401
    granted = requests.post(token_proxy.realm, data={**form, "refresh_token": token_proxy.identity_token}, timeout=5)
    assert granted.status_code == 200
    token = granted.json()["access_token"]
    # A repository nobody pushed: the registry itself answers, so the token got through.
    response = requests.get(f"{token_proxy.url}/v2/selftest/refresh/tags/list",
                            headers={"Authorization": f"Bearer {token}"}, timeout=5)
    assert response.status_code == 404 and response.json()["errors"][0]["code"] == "NAME_UNKNOWN"


def test_pull_only_token_is_refused_for_a_push(token_proxy: TokenAuthProxy) -> None:
    upstream = token_proxy.upstream

    def token(scope: str) -> str:
        return requests.get(token_proxy.realm, params={"service": "tuner-test", "scope": scope},
                            auth=(upstream.username, upstream.password), timeout=5).json()["token"]

    uploads = f"{token_proxy.url}/v2/selftest/scoped/blobs/uploads/"
    pull = {"Authorization": f"Bearer {token('repository:selftest/scoped:pull')}"}
    refused = requests.post(uploads, headers=pull, timeout=5)
    assert refused.status_code == 401
    assert _challenge(refused)["scope"] == "repository:selftest/scoped:pull,push"
    push = {"Authorization": f"Bearer {token('repository:selftest/scoped:pull,push')}"}
    assert requests.post(uploads, headers=push, timeout=5).status_code == 202
