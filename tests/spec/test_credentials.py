"""tuner.credentials: docker config lookup and the three credential shapes of a push secret."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from tuner.errors import UserError
from tuner.spec.credentials import docker_config_file, load_credentials, registry_key

SECRET = "pw-do-not-print-7f3a"


def write_config(directory: Path, auths: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps({"auths": auths}))
    return path


def test_auth_field_decodes_to_user_and_password(tmp_path):
    token = base64.b64encode(f"robot:{SECRET}".encode()).decode()
    path = write_config(tmp_path, {"myacr.azurecr.io": {"auth": token}})
    creds = load_credentials("myacr.azurecr.io", path)
    assert (creds.username, creds.password, creds.source) == ("robot", SECRET, path)


def test_password_may_contain_colons(tmp_path):
    token = base64.b64encode(b"robot:a:b:c").decode()
    creds = load_credentials("r.io", write_config(tmp_path, {"r.io": {"auth": token}}))
    assert creds.password == "a:b:c"


def test_username_and_password_fields(tmp_path):
    creds = load_credentials("r.io:5000", write_config(tmp_path, {"r.io:5000": {"username": "u", "password": SECRET}}))
    assert (creds.username, creds.password) == ("u", SECRET)


def test_identity_token_wins_over_auth(tmp_path):
    entry = {"auth": base64.b64encode(b"00000000-0000-0000-0000-000000000000:").decode(), "identitytoken": "idt-1"}
    creds = load_credentials("r.io", write_config(tmp_path, {"r.io": entry}))
    assert creds.identity_token == "idt-1" and creds.password is None


def test_keys_with_scheme_and_path_match_the_host(tmp_path):
    path = write_config(tmp_path, {"https://r.io:5000/v2/": {"username": "u", "password": "p"}})
    assert load_credentials("r.io:5000", path).username == "u"


def test_docker_hub_aliases_share_one_entry(tmp_path):
    path = write_config(tmp_path, {"https://index.docker.io/v1/": {"username": "u", "password": "p"}})
    assert registry_key("docker.io") == registry_key("registry-1.docker.io") == "docker.io"
    assert load_credentials("docker.io", path).username == "u"


def test_legacy_dockercfg_without_auths_wrapper(tmp_path):
    path = tmp_path / ".dockercfg"
    path.write_text(json.dumps({"r.io": {"username": "u", "password": "p"}}))
    assert load_credentials("r.io", path).username == "u"


def test_other_registry_gives_no_credentials(tmp_path):
    assert load_credentials("other.io", write_config(tmp_path, {"r.io": {"username": "u", "password": "p"}})) is None


def test_repr_never_shows_the_secret(tmp_path):
    creds = load_credentials("r.io", write_config(tmp_path, {"r.io": {"username": "u", "password": SECRET}}))
    assert SECRET not in repr(creds)


def test_bad_base64_names_file_and_registry_but_not_the_value(tmp_path):
    path = write_config(tmp_path, {"r.io": {"auth": f"!!{SECRET}!!"}})
    with pytest.raises(UserError) as error:
        load_credentials("r.io", path)
    assert str(path) in str(error.value) and "r.io" in str(error.value) and SECRET not in str(error.value)


def test_auth_without_colon_is_refused(tmp_path):
    path = write_config(tmp_path, {"r.io": {"auth": base64.b64encode(SECRET.encode()).decode()}})
    with pytest.raises(UserError, match="USER:PASSWORD") as error:
        load_credentials("r.io", path)
    assert SECRET not in str(error.value)


def test_invalid_json_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"auths": {"r.io": {"password": "' + SECRET)
    with pytest.raises(UserError, match="not readable JSON") as error:
        load_credentials("r.io", path)
    assert str(path) in str(error.value) and SECRET not in str(error.value)


def test_explicit_directory_means_its_config_json(tmp_path):
    path = write_config(tmp_path / "secret", {})
    assert docker_config_file(tmp_path / "secret") == path


def test_explicit_missing_path_is_an_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        docker_config_file(tmp_path / "nope")


def test_docker_config_env_is_used_before_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    write_config(tmp_path / "home" / ".docker", {})
    path = write_config(tmp_path / "mounted", {})
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "mounted"))
    assert docker_config_file() == path


def test_home_docker_config_is_the_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    path = write_config(tmp_path / "home" / ".docker", {})
    assert docker_config_file() == path


def test_no_config_anywhere_means_anonymous(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    assert docker_config_file() is None
