"""Push and pull through a real registry (docker-registry 2.8, htpasswd auth, TLS and plain HTTP),
with skopeo as the independent client and proxies that inject faults or demand bearer tokens."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import tarfile
import uuid
from pathlib import Path

import pytest

from registry_support import FaultProxy, RegistryServer, TokenAuthProxy, skopeo, skopeo_auth_args
from tuner import cli
from tuner.errors import UserError
from tuner.observe.summary import JobSummary
from tuner.oci.publish import publish
from tuner.oci.pull import pull_image
from tuner.oci.unpack import unpack_data_dir
from tuner.spec.targets import RegistryOptions

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "training_summary.json")


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished work directory: a real PEFT adapter of the tiny model plus tuner's summary."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    work = tmp_path_factory.mktemp("work")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(work / "adapter")
    JobSummary(
        tuner_version="0.1.0", workspace="phi-3-adapter", preset="smollm2-135m-instruct", method="qlora",
        base_model={"hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "12fd25f7"},
        config_digest="sha256:" + "cd" * 32, config={},
        datasets=[{"source": "https://data.example/a.parquet", "sha256": "ab" * 32, "bytes": 10}],
        data={}, max_length=64, world_size=1,
        train={"steps": 4, "total_steps": 4, "epochs": 1.0, "train_loss": 1.23456, "final_loss": 1.2,
               "tokens_seen": 512, "tokens_per_second": 100.0, "seconds": 5.1, "precision": "float32",
               "trainable_parameters": 8192},
        eval={"rows": 2, "base_loss": 3.0, "adapter_loss": 1.5}, loss_history=[], stage_seconds={"train": 5.1},
        started="2026-11-24T11:59:00Z", finished="2026-11-24T12:00:00Z", job={},
    ).write(work / "adapter" / "training_summary.json")
    return work


def repo(server: RegistryServer | FaultProxy, name: str = "") -> str:
    """A fresh repository reference on server (tests share the session's registries)."""
    return f"{server.host}/adapters/{name or uuid.uuid4().hex[:12]}"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def secrets_of(server: RegistryServer, *extra: str) -> list[str]:
    return [server.password, base64.b64encode(f"{server.username}:{server.password}".encode()).decode(), *extra]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture
def plain_auth(tmp_path, registry_plain, monkeypatch) -> RegistryServer:
    """DOCKER_CONFIG holds the plain registry's credentials, as the mounted push secret would."""
    monkeypatch.setenv("DOCKER_CONFIG", str(registry_plain.docker_config(tmp_path / "docker")))
    return registry_plain


def pushed_digest(work_dir: Path, ref: str, options: RegistryOptions) -> str:
    return publish(work_dir, ref, options).digest


def plain_options(*hosts: str, **kwargs) -> RegistryOptions:
    return RegistryOptions(insecure_registries=frozenset(hosts), **kwargs)


# --- push ---------------------------------------------------------------------------------------

def test_push_over_tls_is_read_by_skopeo_with_platform_and_provenance(work_dir, registry_tls, tmp_path, capsys,
                                                                       monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(registry_tls.docker_config(tmp_path / "docker")))
    ref = repo(registry_tls) + ":0.0.1"
    code, log = run_cli(["push", str(work_dir), ref, "--registry-ca", str(registry_tls.ca_cert)], capsys)
    assert code == 0, log
    info = json.loads(skopeo("inspect", *skopeo_auth_args(registry_tls), f"docker://{ref}"))
    assert (info["Os"], info["Architecture"]) == ("linux", "amd64")
    assert f"@{info['Digest']}" in log
    labels = info["Labels"]
    assert labels["sh.kaito.model.name"] == "smollm2-135m-instruct"
    assert labels["org.opencontainers.image.version"] == "0.0.1"
    assert labels["org.opencontainers.image.created"] == "2026-11-24T12:00:00Z"
    assert labels["dev.tuner.base-model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert labels["dev.tuner.base-model.revision"] == "12fd25f7"
    assert labels["dev.tuner.method"] == "qlora"
    assert labels["dev.tuner.datasets"] == "sha256:" + "ab" * 32
    assert labels["dev.tuner.config-digest"] == "sha256:" + "cd" * 32
    assert (labels["dev.tuner.train-loss"], labels["dev.tuner.eval-loss"]) == ("1.2346", "1.5000")
    manifest = json.loads(skopeo("inspect", "--raw", *skopeo_auth_args(registry_tls), f"docker://{ref}"))
    assert manifest["annotations"] == labels


def test_skopeo_copy_gives_the_adapter_bytes_and_peft_loads_them(work_dir, registry_tls, tmp_path, tiny_model_dir,
                                                                 monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("DOCKER_CONFIG", str(registry_tls.docker_config(tmp_path / "docker")))
    ref = repo(registry_tls) + ":v1"
    pushed_digest(work_dir, ref, RegistryOptions(ca_cert=registry_tls.ca_cert))
    skopeo("copy", *skopeo_auth_args(registry_tls, "src"), f"docker://{ref}", f"dir:{tmp_path / 'copy'}")
    manifest = json.loads((tmp_path / "copy" / "manifest.json").read_text())
    layer = manifest["layers"][0]
    files = unpack_data_dir([(tmp_path / "copy" / layer["digest"].split(":")[1], layer["mediaType"])],
                            tmp_path / "unpacked")
    assert {p.name for p in files} >= set(ADAPTER_FILES)
    for name in ADAPTER_FILES:
        assert sha256_of(tmp_path / "unpacked" / name) == sha256_of(work_dir / "adapter" / name)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "unpacked")
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_username_password_secret_works_where_skopeo_ignores_it(work_dir, registry_plain, tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(registry_plain.docker_config(tmp_path / "docker", style="userpass")))
    ref = repo(registry_plain) + ":v1"
    digest = pushed_digest(work_dir, ref, plain_options(registry_plain.host))
    assert json.loads(skopeo("inspect", *skopeo_auth_args(registry_plain), f"docker://{ref}"))["Digest"] == digest


def test_plain_http_registry_needs_the_insecure_flag(work_dir, plain_auth, capsys):
    code, log = run_cli(["push", str(work_dir), repo(plain_auth) + ":v1"], capsys)
    assert code == 2
    assert "TLS" in log and f"--insecure-registry {plain_auth.host}" in log


def test_tls_registry_with_an_unknown_ca_is_refused(work_dir, registry_tls, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(registry_tls.docker_config(tmp_path / "docker")))
    code, log = run_cli(["push", str(work_dir), repo(registry_tls) + ":v1"], capsys)
    assert code == 2
    assert f"TLS verification of registry {registry_tls.host} failed" in log and "--registry-ca" in log


def test_unchanged_repush_uploads_no_bytes(work_dir, fault_proxy, tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(fault_proxy.upstream.docker_config(tmp_path / "d", host=fault_proxy.host)))
    ref, options = repo(fault_proxy) + ":v1", plain_options(fault_proxy.host)
    first = pushed_digest(work_dir, ref, options)
    fault_proxy.reset_log()
    again = publish(work_dir, ref, options)
    assert again.digest == first
    assert again.push.uploaded_bytes == 0 and again.push.skipped_blobs == 2
    assert {(r.method, "/manifests/" in r.path) for r in fault_proxy.requests} == {("HEAD", True)}  # 401, then 200


def test_large_blobs_go_up_in_bounded_chunks(work_dir, proxy_auth, monkeypatch):
    monkeypatch.setattr("tuner.oci.registry._UPLOAD_CHUNK", 4096)
    ref = repo(proxy_auth) + ":v1"
    digest = pushed_digest(work_dir, ref, plain_options(proxy_auth.host))
    patches = [r.body_bytes for r in proxy_auth.requests if r.method == "PATCH"]
    manifest = json.loads(skopeo("inspect", "--raw", *skopeo_auth_args(proxy_auth), f"docker://{ref}"))
    assert "sha256:" + hashlib.sha256(json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
                                      ).hexdigest() == digest
    assert max(patches) == 4096 and len(patches) > 2
    assert sum(patches) == manifest["config"]["size"] + manifest["layers"][0]["size"]


def test_push_to_a_digest_reference_is_refused(work_dir, plain_auth):
    with pytest.raises(UserError, match="digest reference"):
        pushed_digest(work_dir, repo(plain_auth) + "@sha256:" + "0" * 64, plain_options(plain_auth.host))


# --- faults -------------------------------------------------------------------------------------

@pytest.fixture
def proxy_auth(fault_proxy, tmp_path, monkeypatch) -> FaultProxy:
    monkeypatch.setenv("DOCKER_CONFIG", str(fault_proxy.upstream.docker_config(tmp_path / "d", host=fault_proxy.host)))
    return fault_proxy


def test_server_errors_are_retried_until_the_push_succeeds(work_dir, proxy_auth, capsys):
    proxy_auth.fail("PUT", "/blobs/uploads/", status=500, times=2)
    proxy_auth.fail("PUT", "/manifests/", status=503, times=1)
    ref = repo(proxy_auth) + ":v1"
    code, log = run_cli(["push", str(work_dir), ref, "--insecure-registry", proxy_auth.host], capsys)
    assert code == 0, log
    assert log.count("retrying in") == 3
    assert [r.status for r in proxy_auth.requests if r.method == "PUT" and "/manifests/" in r.path] == [503, 201]


def test_a_dropped_upload_is_retried(work_dir, proxy_auth, capsys):
    proxy_auth.drop("PATCH", "/blobs/uploads/", times=1, after_bytes=1024)
    ref = repo(proxy_auth) + ":v1"
    code, log = run_cli(["push", str(work_dir), ref, "--insecure-registry", proxy_auth.host], capsys)
    assert code == 0, log
    assert "connection failed or was dropped; retrying" in log
    assert None in [r.status for r in proxy_auth.requests]


def test_persistent_server_errors_stop_within_the_retry_budget(work_dir, proxy_auth):
    proxy_auth.fail("PUT", "/blobs/uploads/", status=500, times=10_000)
    with pytest.raises(UserError) as error:
        pushed_digest(work_dir, repo(proxy_auth) + ":v1", plain_options(proxy_auth.host, retry_seconds=2))
    message = str(error.value)
    assert "failed after 2s of retries" in message
    assert f"re-run only the push: tuner push {work_dir}" in message
    assert (work_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (work_dir / "image" / "index.json").is_file()


@pytest.mark.parametrize("status", [401, 403])
def test_auth_refusal_fails_at_once_naming_registry_and_secret(work_dir, proxy_auth, status, capsys):
    proxy_auth.deny(status)
    code, log = run_cli(["push", str(work_dir), repo(proxy_auth) + ":v1", "--insecure-registry", proxy_auth.host],
                        capsys)
    assert code == 2
    assert f"registry {proxy_auth.host}" in log and os.environ["DOCKER_CONFIG"] in log
    assert f"HTTP {status}" in log and "retrying" not in log
    assert len(proxy_auth.requests) <= 2  # the first request, and the one answering the challenge
    assert not any(secret in log for secret in secrets_of(proxy_auth.upstream))


def test_wrong_password_fails_without_printing_it(work_dir, registry_plain, tmp_path, capsys, monkeypatch):
    wrong = "pw-wrong-" + uuid.uuid4().hex
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text(json.dumps(
        {"auths": {registry_plain.host: {"username": registry_plain.username, "password": wrong}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "d"))
    code, log = run_cli(["--debug", "push", str(work_dir), repo(registry_plain) + ":v1",
                         "--insecure-registry", registry_plain.host], capsys)
    assert code == 2
    assert f"registry {registry_plain.host} refused the credentials for it in {tmp_path / 'd' / 'config.json'}" in log
    assert wrong not in log and base64.b64encode(f"{registry_plain.username}:{wrong}".encode()).decode() not in log


def test_missing_credentials_say_how_to_provide_the_secret(work_dir, registry_plain, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "empty"))
    code, log = run_cli(["push", str(work_dir), repo(registry_plain) + ":v1", "--insecure-registry",
                         registry_plain.host], capsys)
    assert code == 2
    assert "asks for credentials" in log and "imagePushSecret" in log


# --- bearer tokens ------------------------------------------------------------------------------

def token_config(tmp_path: Path, proxy: TokenAuthProxy, entry: dict) -> Path:
    (tmp_path / "t").mkdir(exist_ok=True)
    (tmp_path / "t" / "config.json").write_text(json.dumps({"auths": {proxy.host: entry}}))
    return tmp_path / "t"


def test_bearer_token_flow_with_user_and_password(work_dir, token_proxy, tmp_path):
    upstream = token_proxy.upstream
    config = token_config(tmp_path, token_proxy, {"username": upstream.username, "password": upstream.password})
    options = plain_options(token_proxy.host, config_file=config)
    ref = repo(token_proxy) + ":v1"
    digest = pushed_digest(work_dir, ref, options)
    pulled = pull_image(ref, tmp_path / "pulled", options)
    assert pulled.digest == digest
    assert sha256_of(tmp_path / "pulled" / "adapter_model.safetensors") == sha256_of(
        work_dir / "adapter" / "adapter_model.safetensors")


def test_bearer_token_flow_with_an_identity_token(work_dir, token_proxy, tmp_path):
    config = token_config(tmp_path, token_proxy, {"auth": base64.b64encode(b"00000000-0000:").decode(),
                                                  "identitytoken": token_proxy.identity_token})
    ref = repo(token_proxy) + ":v1"
    digest = pushed_digest(work_dir, ref, plain_options(token_proxy.host, config_file=config))
    assert digest.startswith("sha256:")
    assert any(r.method == "POST" and r.path == "/token" and r.status == 200 for r in token_proxy.requests)


def test_an_expired_token_is_renewed_by_the_next_challenge(work_dir, token_proxy, tmp_path):
    from tuner.oci.registry import RegistryClient

    upstream = token_proxy.upstream
    config = token_config(tmp_path, token_proxy, {"username": upstream.username, "password": upstream.password})
    name = repo(token_proxy)
    pushed_digest(work_dir, name + ":v1", plain_options(token_proxy.host, config_file=config))
    client = RegistryClient(token_proxy.host, plain_options(token_proxy.host, config_file=config))
    tags_url = f"http://{name.replace('/adapters/', '/v2/adapters/', 1)}/tags/list"
    assert client.do_request(tags_url).json()["tags"] == ["v1"]
    token_proxy.tokens.clear()  # every issued token expires
    assert client.do_request(tags_url).json()["tags"] == ["v1"]


def test_a_revoked_identity_token_is_an_auth_error(work_dir, token_proxy, tmp_path):
    config = token_config(tmp_path, token_proxy, {"identitytoken": "idt-revoked"})
    with pytest.raises(UserError, match="refused the credentials") as error:
        pushed_digest(work_dir, repo(token_proxy) + ":v1", plain_options(token_proxy.host, config_file=config))
    assert "idt-revoked" not in str(error.value)


# --- pull ---------------------------------------------------------------------------------------

def test_pull_round_trip_gives_the_same_files_and_digest(work_dir, plain_auth, tmp_path, capsys):
    ref = repo(plain_auth) + ":v1"
    digest = pushed_digest(work_dir, ref, plain_options(plain_auth.host))
    code, log = run_cli(["pull", ref, str(tmp_path / "pulled"), "--insecure-registry", plain_auth.host], capsys)
    assert code == 0, log
    assert digest in log
    adapter = work_dir / "adapter"
    pulled = tmp_path / "pulled"
    assert sorted(p.relative_to(pulled) for p in pulled.rglob("*")) == sorted(p.relative_to(adapter)
                                                                             for p in adapter.rglob("*"))
    for path in adapter.rglob("*"):
        if path.is_file():
            assert sha256_of(pulled / path.relative_to(adapter)) == sha256_of(path)


def test_pull_by_digest(work_dir, plain_auth, tmp_path):
    ref = repo(plain_auth)
    digest = pushed_digest(work_dir, ref + ":v1", plain_options(plain_auth.host))
    assert pull_image(f"{ref}@{digest}", tmp_path / "pulled", plain_options(plain_auth.host)).digest == digest


def test_pull_into_a_non_empty_directory_is_refused(plain_auth, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not an empty directory"):
        pull_image(repo(plain_auth) + ":v1", tmp_path / "taken", plain_options(plain_auth.host))
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_pull_of_a_missing_tag_names_it(plain_auth, tmp_path):
    ref = repo(plain_auth) + ":nope"
    with pytest.raises(UserError, match="does not exist"):
        pull_image(ref, tmp_path / "pulled", plain_options(plain_auth.host))


def _layer(members: dict[str, bytes | None]) -> bytes:
    """A gzip tar: name -> content (None for a directory)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            if content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return gzip.compress(raw.getvalue(), mtime=0)


def _blob(layout: Path, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _image(layout: Path, layers: list[bytes], arch: str = "amd64") -> dict:
    """Write a multi-layer OCI image's blobs into layout; return its manifest descriptor."""
    config = json.dumps({"os": "linux", "architecture": arch,
                         "rootfs": {"type": "layers", "diff_ids": [
                             "sha256:" + hashlib.sha256(gzip.decompress(data)).hexdigest() for data in layers]}})
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **_blob(layout, config.encode())},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **_blob(layout, data)}
                           for data in layers]}
    return {"mediaType": "application/vnd.oci.image.manifest.v1+json", **_blob(layout, json.dumps(manifest).encode()),
            "platform": {"os": "linux", "architecture": arch}}


def _write_index(layout: Path, manifests: list[dict]) -> None:
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": manifests}))


def kaito_style_layers(adapter: Path) -> list[bytes]:
    """A busybox-like base layer, then the adapter COPY'd to /data as docker would build it."""
    base = _layer({"bin/": None, "bin/busybox": b"\x7fELF...", "etc/": None, "etc/passwd": b"root:x:0:0\n"})
    files = {"./data/": None} | {f"./data/{p.name}": p.read_bytes() for p in adapter.iterdir() if p.is_file()}
    return [base, _layer(files)]


def test_pull_of_a_multi_layer_docker_image_finds_data(work_dir, plain_auth, tmp_path):
    layout = tmp_path / "layout"
    _write_index(layout, [_image(layout, kaito_style_layers(work_dir / "adapter"))])
    ref = repo(plain_auth) + ":kaito"
    skopeo("copy", "--format", "v2s2", *skopeo_auth_args(plain_auth, "dest"), f"oci:{layout}", f"docker://{ref}")
    raw = json.loads(skopeo("inspect", "--raw", *skopeo_auth_args(plain_auth), f"docker://{ref}"))
    assert raw["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json" and len(raw["layers"]) == 2
    pulled = pull_image(ref, tmp_path / "pulled", plain_options(plain_auth.host))
    assert {p.name for p in pulled.files} == {p.name for p in (work_dir / "adapter").iterdir() if p.is_file()}
    assert sha256_of(tmp_path / "pulled" / "adapter_model.safetensors") == sha256_of(
        work_dir / "adapter" / "adapter_model.safetensors")


def test_pull_of_an_index_takes_the_linux_amd64_image(work_dir, plain_auth, tmp_path):
    layout = tmp_path / "layout"
    adapter = work_dir / "adapter"
    arm = _image(layout, [_layer({"data/adapter_config.json": b"{}", "data/adapter_model.safetensors": b"arm"})],
                 arch="arm64")
    _write_index(layout, [{"mediaType": "application/vnd.oci.image.index.v1+json", **_blob(layout, json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [arm, _image(layout, kaito_style_layers(adapter))]}).encode())}])
    ref = repo(plain_auth) + ":multi"
    skopeo("copy", "--all", *skopeo_auth_args(plain_auth, "dest"), f"oci:{layout}", f"docker://{ref}")
    pull_image(ref, tmp_path / "pulled", plain_options(plain_auth.host))
    assert sha256_of(tmp_path / "pulled" / "adapter_model.safetensors") == sha256_of(
        adapter / "adapter_model.safetensors")


def test_pull_of_an_image_without_adapter_files_is_refused(plain_auth, tmp_path):
    layout = tmp_path / "layout"
    _write_index(layout, [_image(layout, [_layer({"data/": None, "data/readme.txt": b"hi"})])])
    ref = repo(plain_auth) + ":empty"
    skopeo("copy", *skopeo_auth_args(plain_auth, "dest"), f"oci:{layout}", f"docker://{ref}")
    with pytest.raises(UserError, match="/data/adapter_config.json"):
        pull_image(ref, tmp_path / "pulled", plain_options(plain_auth.host))
    assert not (tmp_path / "pulled").exists()


def test_pull_detects_a_corrupted_blob_in_the_registry(work_dir, plain_auth, tmp_path):
    ref = repo(plain_auth) + ":v1"
    pushed_digest(work_dir, ref, plain_options(plain_auth.host))
    manifest = json.loads(skopeo("inspect", "--raw", *skopeo_auth_args(plain_auth), f"docker://{ref}"))
    hex_digest = manifest["layers"][0]["digest"].split(":")[1]
    stored = plain_auth.root / "data/docker/registry/v2/blobs/sha256" / hex_digest[:2] / hex_digest / "data"
    original = stored.read_bytes()
    try:
        stored.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        with pytest.raises(UserError, match="arrived corrupt"):
            pull_image(ref, tmp_path / "pulled", plain_options(plain_auth.host, retry_seconds=1))
    finally:
        stored.write_bytes(original)
    assert not (tmp_path / "pulled").exists()


def test_no_credential_reaches_any_output(work_dir, plain_auth, tmp_path, capsys):
    ref = repo(plain_auth) + ":v1"
    outputs = [run_cli(["--debug", "push", str(work_dir), ref, "--insecure-registry", plain_auth.host], capsys)[1],
               run_cli(["--debug", "pull", ref, str(tmp_path / "p"), "--insecure-registry", plain_auth.host], capsys)[1],
               run_cli(["--debug", "pull", ref + "-missing", str(tmp_path / "q"), "--insecure-registry",
                        plain_auth.host], capsys)[1]]
    log = "\n".join(outputs)
    assert "pushed" in log and "pulled" in log and "does not exist" in log
    assert not any(secret in log for secret in secrets_of(plain_auth))


# --- dataset images (tuning.input.image) ----------------------------------------------------------

def test_input_image_data_folder_becomes_the_dataset_files(plain_auth, tmp_path):
    from tuner.data.fetch import fetch_inputs
    from tuner.spec.workspace import DataSource

    rows = b'{"prompt": "Hi", "completion": "Hello"}\n'
    layout = tmp_path / "layout"
    _write_index(layout, [_image(layout, [_layer({"data/": None, "data/train.jsonl": rows})])])
    ref = repo(plain_auth) + ":data"
    skopeo("copy", *skopeo_auth_args(plain_auth, "dest"), f"oci:{layout}", f"docker://{ref}")
    files = fetch_inputs(DataSource(image=ref), tmp_path / "inputs", base_dir=tmp_path,
                         registry=plain_options(plain_auth.host))
    assert [(f.path.name, f.sha256, f.source) for f in files] == [
        ("train.jsonl", hashlib.sha256(rows).hexdigest(), f"{ref}:/data/train.jsonl")]
