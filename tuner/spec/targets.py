"""Where the adapter goes and how registries are reached: the output target (`oci:DIR[:TAG]` or a
registry reference, read with Kaito's grammar) and the registry connection options."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tuner.errors import UserError, quote
from tuner.spec.image_ref import TAG, ImageRef, InvalidReference, parse_docker_ref

_TAG_RE = re.compile(TAG, re.ASCII)


@dataclass(frozen=True)
class OciLayoutTarget:
    """An image in a local OCI image layout directory (`oci:DIR[:TAG]`)."""

    path: Path
    tag: str


@dataclass(frozen=True)
class RegistryTarget:
    """An image in a registry: `reference` is the normalised form (e.g. `docker.io/library/x:latest`
    for `x`), the one tuner pushes to, logs and records."""

    reference: str

    @property
    def parsed(self) -> ImageRef:
        return parse_docker_ref(self.reference)


@dataclass(frozen=True)
class RegistryOptions:
    """How to reach registries: plain-HTTP hosts, a CA bundle, the docker config, retry budget."""

    insecure_registries: frozenset[str] = frozenset()
    ca_cert: Path | None = None
    config_file: Path | None = None
    retry_seconds: float = 300.0


def parse_output_ref(ref: str) -> OciLayoutTarget | RegistryTarget:
    """Parse `oci:DIR[:TAG]` (skopeo syntax, TAG defaults to `latest`) or a registry reference (Kaito's
    grammar and normalisation, tuner.image_ref)."""
    if ref.startswith("oci:"):
        # Like skopeo's oci transport, split on the first colon after "oci:": DIR cannot hold ":".
        path, sep, tag = ref[len("oci:"):].partition(":")
        if not sep:
            tag = "latest"
        if not path:
            raise UserError(f"output reference {quote(ref)} has no directory", fix="write it as oci:DIR[:TAG]")
        if not _TAG_RE.fullmatch(tag):
            raise UserError(
                f"output reference {quote(ref)} has an invalid tag {quote(tag)}",
                fix="a tag is 1-128 characters of letters, digits, '_', '.', '-', not starting with '.' or '-'",
            )
        return OciLayoutTarget(Path(path), tag)
    try:
        parsed = parse_docker_ref(ref)
    except InvalidReference as exc:
        raise UserError(
            f"{quote(ref)} is not a valid image reference ({exc})",
            fix="write it as [REGISTRY/]REPOSITORY[:TAG][@DIGEST] with a lowercase repository "
            "(e.g. myacr.azurecr.io/adapters/phi3:0.0.1), or oci:DIR[:TAG] for a local OCI layout",
        ) from None
    return RegistryTarget(str(parsed))
