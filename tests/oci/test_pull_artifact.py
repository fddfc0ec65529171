"""tuner.oci.pull on ORAS artifacts: each layer is one file named by its title, as `oras pull` writes
it; Kaito ships its preset weights this way. Pushed with oras-py, an independent client, to the
real registry."""

from __future__ import annotations

import hashlib
import os
import uuid

import oras.client
import pytest

from tuner.errors import UserError
from tuner.oci.pull import pull_image
from tuner.spec.targets import RegistryOptions


def push_artifact(registry, folder, names: list[str]) -> str:
    """`oras push REF file...` with oras-py, from inside `folder` so the titles are the bare names."""
    reference = f"{registry.host}/models/artifact-{uuid.uuid4().hex[:10]}:v1"
    client = oras.client.OrasClient(hostname=registry.host, insecure=True, auth_backend="basic")
    client.login(username=registry.username, password=registry.password, hostname=registry.host)
    here = os.getcwd()
    os.chdir(folder)
    try:
        client.push(target=reference, files=names, disable_path_validation=True)
    finally:
        os.chdir(here)
    return reference


def digest_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_artifacts_files_are_pulled_by_their_titles(registry_plain, tiny_model_dir, tmp_path, monkeypatch):
    names = sorted(p.name for p in tiny_model_dir.iterdir() if p.is_file())
    reference = push_artifact(registry_plain, tiny_model_dir, names)
    monkeypatch.setenv("DOCKER_CONFIG", str(registry_plain.docker_config(tmp_path / "docker")))
    pulled = pull_image(reference, tmp_path / "weights", RegistryOptions(insecure_registries=frozenset({
        registry_plain.host})), required=("config.json",))
    assert sorted(p.name for p in pulled.files) == names
    assert all(digest_of(tmp_path / "weights" / name) == digest_of(tiny_model_dir / name) for name in names)


def test_an_artifact_without_the_required_file_is_refused_and_leaves_nothing(registry_plain, tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("no model here")
    reference = push_artifact(registry_plain, tmp_path, ["notes.txt"])
    monkeypatch.setenv("DOCKER_CONFIG", str(registry_plain.docker_config(tmp_path / "docker")))
    with pytest.raises(UserError, match=r"lacks /data/config.json \(or, as an ORAS artifact, the file config.json\)"):
        pull_image(reference, tmp_path / "weights", RegistryOptions(insecure_registries=frozenset({
            registry_plain.host})), required=("config.json",))
    assert not (tmp_path / "weights").exists()
