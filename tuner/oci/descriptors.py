"""The shape of what a registry sends, checked before any field is used: an image manifest, an
image index and their descriptors (OCI image-spec; Docker's schema 2 has the same fields). A
registry is someone else's server: `[]`, a digest of `7` or a size of "big" is one `error:` line
naming the registry and the field, never a TypeError."""

from __future__ import annotations

import re
from typing import Any

from tuner.errors import UserError, quote

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def manifest(document: Any, where: str) -> dict:
    """An image manifest with a `config` descriptor and a non-empty list of `layers` descriptors."""
    body = _object(document, where, "the manifest")
    descriptor(body.get("config"), where, "config")
    layers = body.get("layers")
    if not isinstance(layers, list) or not layers:
        raise _bad(where, "layers", layers, "a non-empty list of layer descriptors")
    for index, layer in enumerate(layers):
        descriptor(layer, where, f"layers[{index}]")
    return body


def index(document: Any, where: str) -> dict:
    """An image index: `manifests`, a list of descriptors (their `platform` an object when given)."""
    body = _object(document, where, "the index")
    entries = body.get("manifests")
    if not isinstance(entries, list):
        raise _bad(where, "manifests", entries, "a list of manifest descriptors", "index")
    for position, entry in enumerate(entries):
        descriptor(entry, where, f"manifests[{position}]", "index")
        if "platform" in entry and not isinstance(entry["platform"], dict):
            raise _bad(where, f"manifests[{position}].platform", entry["platform"], "an object", "index")
    return body


def descriptor(value: Any, where: str, field: str, within: str = "manifest") -> dict:
    """{mediaType: str, digest: sha256:<64 hex>, size: int >= 0}."""
    if not isinstance(value, dict):
        raise _bad(where, field, value, "a descriptor object (mediaType, digest, size)", within)
    if not isinstance(value.get("mediaType", ""), str):
        raise _bad(where, f"{field}.mediaType", value.get("mediaType"), "a media type string", within)
    digest = value.get("digest")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise _bad(where, f"{field}.digest", digest, "a sha256:<64 hex digits> digest", within)
    size = value.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise _bad(where, f"{field}.size", size, "a byte count", within)
    return value


def _object(document: Any, where: str, what: str) -> dict:
    if not isinstance(document, dict):
        raise UserError(f"{what} is {type(document).__name__} {quote(document)}, not a JSON object", where=where,
                        fix="the registry serves something that is not an OCI/Docker image; check the reference")
    return document


def _bad(where: str, field: str, value: Any, expected: str, within: str = "manifest") -> UserError:
    return UserError(f"the {within}'s {field} is {quote(value)}, not {expected}", where=where,
                     fix="the registry serves a malformed manifest; push the image again or check the reference")
