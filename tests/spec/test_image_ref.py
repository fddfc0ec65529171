"""tuner.image_ref: image references read as Kaito's webhook reads them (distribution/reference's
ParseDockerRef): the same normalisation, the same refusals, the same reasons."""

from __future__ import annotations

import pytest

from tuner.spec.image_ref import ImageRef, InvalidReference, parse_docker_ref

DIGEST = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize(("ref", "normalised"), [
    ("data-image:latest", "docker.io/library/data-image:latest"),
    ("data-image", "docker.io/library/data-image:latest"),
    ("org/name", "docker.io/org/name:latest"),
    ("org/team/name:v2", "docker.io/org/team/name:v2"),
    ("index.docker.io/org/name:v1", "docker.io/org/name:v1"),
    ("docker.io/name", "docker.io/library/name:latest"),
    ("localhost/name", "localhost/name:latest"),  # localhost is always a host
    ("localhost:5000/a/b:1", "localhost:5000/a/b:1"),  # a host with a port
    ("registry:5000/name", "registry:5000/name:latest"),  # ":" makes it a host
    ("10.0.0.1:5000/name:v1", "10.0.0.1:5000/name:v1"),
    ("[::1]:5000/a/b:v", "[::1]:5000/a/b:v"),
    ("myacr.azurecr.io/adapters/phi3:0.0.1", "myacr.azurecr.io/adapters/phi3:0.0.1"),
    ("MyRegistry/name:v1", "MyRegistry/name:v1"),  # an uppercase first component is a host
    ("ghcr.io/org/a_b__c-d--e.f:V_1.0-rc", "ghcr.io/org/a_b__c-d--e.f:V_1.0-rc"),
    (f"ghcr.io/org/adapter@{DIGEST}", f"ghcr.io/org/adapter@{DIGEST}"),
    (f"ghcr.io/org/adapter:v1@{DIGEST}", f"ghcr.io/org/adapter@{DIGEST}"),  # the digest wins, the tag goes
    (f"name@{DIGEST}", f"docker.io/library/name@{DIGEST}"),
])
def test_kaito_accepts_and_normalises(ref: str, normalised: str) -> None:
    assert str(parse_docker_ref(ref)) == normalised


@pytest.mark.parametrize(("ref", "reason"), [
    ("myacr.azurecr.io/Adapters/phi3:1", "repository name (Adapters/phi3) must be lowercase"),
    ("Data-Image:v1", "repository name (library/Data-Image) must be lowercase"),
    ("UPPER/Case", "repository name (Case) must be lowercase"),
    ("ghcr.io/a..b", "invalid reference format"),  # two separators in a row
    ("a..b/c", "invalid reference format"),  # a host cannot hold an empty label
    ("ghcr.io/-name", "invalid reference format"),
    ("ghcr.io/name:bad tag", "invalid reference format"),
    ("ghcr.io/name:-tag", "invalid reference format"),
    ("ghcr.io/name:" + "t" * 129, "invalid reference format"),
    ("ghcr.io/name@sha256:short", "invalid reference format"),
    ("ghcr.io/name@sha256:" + "A" * 64, "invalid checksum digest format"),  # go-digest wants lowercase hex
    ("ghcr.io/name@sha256:" + "a" * 63 + "a" * 2, "invalid checksum digest length"),
    ("ghcr.io/name@md5:" + "a" * 32, "unsupported digest algorithm"),
    ("host:port/name", "invalid reference format"),  # a port is digits
    ("docker://ghcr.io/name:1", "invalid reference format"),  # no transport prefixes
    ("ghcr.io/", "invalid reference format"),
    ("ghcr.io/name with space", "invalid reference format"),
    ("0123456789abcdef" * 4, "cannot specify 64-byte hexadecimal strings"),
    ("ghcr.io/" + "a" * 250, "must not be more than 255 characters"),
])
def test_kaito_refuses_with_its_reason(ref: str, reason: str) -> None:
    with pytest.raises(InvalidReference, match=reason.replace("(", r"\(").replace(")", r"\)")):
        parse_docker_ref(ref)


def test_docker_hub_names_are_served_by_its_api_host() -> None:
    ref = parse_docker_ref("org/name:v1")
    assert ref == ImageRef("docker.io", "org/name", "v1", None)
    assert (ref.repository, ref.api_host) == ("docker.io/org/name", "registry-1.docker.io")
    assert parse_docker_ref("ghcr.io/org/name").api_host == "ghcr.io"
