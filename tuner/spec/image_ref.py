"""Image references read exactly as Kaito's webhook reads them: `reference.ParseDockerRef`.

Kaito (github.com/distribution/reference, used by its Workspace webhook for `tuning.input.image`
and `tuning.output.image`) normalises a familiar name before it parses it: a first component
without ".", ":" or uppercase that is not "localhost" is not a registry host, so `name:tag` is
`docker.io/library/name:tag` and `org/name` is `docker.io/org/name:latest`; `index.docker.io` is
`docker.io`; a name holding both a tag and a digest keeps only the digest. The grammar and the
error texts below are that package's, so tuner refuses what Kaito refuses, with Kaito's reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"  # where docker.io's registry API answers
_LEGACY_HUB = "index.docker.io"
_OFFICIAL_PREFIX = "library/"
NAME_TOTAL_LENGTH_MAX = 255

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_REFERENCE_RE = re.compile(
    rf"(?P<name>(?:(?P<domain>{DOMAIN})/)?(?P<path>{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*))"
    rf"(?::(?P<tag>{TAG}))?(?:@(?P<digest>{_DIGEST}))?", re.ASCII)
_HEX64_RE = re.compile(r"[a-f0-9]{64}")
# The digest algorithms go-digest registers (sha256 always; sha384/sha512 with crypto/sha512,
# which every Go TLS binary links), with their hex lengths.
_DIGEST_HEX_LENGTHS = {"sha256": 64, "sha384": 96, "sha512": 128}


class InvalidReference(ValueError):
    """A reference ParseDockerRef refuses; the message is its reason."""


@dataclass(frozen=True)
class ImageRef:
    """A normalised registry image reference: `domain/path` and a tag or a digest (never both)."""

    domain: str
    path: str
    tag: str | None
    digest: str | None

    @property
    def repository(self) -> str:
        return f"{self.domain}/{self.path}"

    @property
    def api_host(self) -> str:
        """The host that serves the registry API (Docker Hub's name and API host differ)."""
        return DOCKER_HUB_API if self.domain == DOCKER_HUB else self.domain

    def __str__(self) -> str:
        return f"{self.repository}@{self.digest}" if self.digest else f"{self.repository}:{self.tag}"


def parse_docker_ref(ref: str) -> ImageRef:
    """ParseDockerRef: normalise, parse, then drop the tag of a digested name or default it to latest."""
    if _HEX64_RE.fullmatch(ref):
        raise InvalidReference(f"invalid repository name ({_short(ref)}), cannot specify 64-byte hexadecimal strings")
    domain, remainder = _split_domain(ref)
    remote = remainder.split(":", 1)[0]
    if remote.lower() != remote:
        raise InvalidReference(f"invalid reference format: repository name ({_short(remote)}) must be lowercase")
    full = f"{domain}/{remainder}"
    match = _REFERENCE_RE.fullmatch(full)
    if match is None:
        if _REFERENCE_RE.fullmatch(full.lower()):
            raise InvalidReference("invalid reference format: repository name must be lowercase")
        raise InvalidReference("invalid reference format")
    if len(match["name"]) > NAME_TOTAL_LENGTH_MAX:
        raise InvalidReference(f"repository name must not be more than {NAME_TOTAL_LENGTH_MAX} characters")
    digest = match["digest"]
    if digest:
        _check_digest(digest)
    return ImageRef(match["domain"], match["path"], None if digest else (match["tag"] or "latest"), digest)


def _split_domain(name: str) -> tuple[str, str]:
    first, slash, rest = name.partition("/")
    if not slash:
        domain, remainder = DOCKER_HUB, name
    elif first == "localhost" or any(c in first for c in ".:") or first.lower() != first:
        domain, remainder = first, rest
    else:
        domain, remainder = DOCKER_HUB, name
    if domain == _LEGACY_HUB:
        domain = DOCKER_HUB
    if domain == DOCKER_HUB and "/" not in remainder:
        remainder = _OFFICIAL_PREFIX + remainder
    return domain, remainder


def _check_digest(digest: str) -> None:
    algorithm, _, encoded = digest.partition(":")
    length = _DIGEST_HEX_LENGTHS.get(algorithm)
    if length is None:
        raise InvalidReference("unsupported digest algorithm")
    if len(encoded) != length:
        raise InvalidReference("invalid checksum digest length")
    if not re.fullmatch(r"[a-f0-9]+", encoded):
        raise InvalidReference("invalid checksum digest format")


def _short(value: str, limit: int = 80) -> str:
    return value if len(value) <= limit else value[:limit] + "..."
