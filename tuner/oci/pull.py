"""Pull an image's /data files, or an ORAS artifact's files: the manifest (or the index's entry for
the platform) verified against its digest and read no further than the distribution spec's 4 MiB,
every blob streamed and verified, an image's layers unpacked safely (tuner.oci.unpack), an
artifact's layers each placed as the file its title names (as `oras pull` does: how Kaito ships
preset weights), all into a scratch folder that becomes the destination only once complete."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import oras.container
import requests

from tuner.errors import UserError, quote
from tuner.oci import descriptors
from tuner.oci.image import INDEX_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, REQUIRED_ADAPTER_FILES, digest_hex
from tuner.oci.registry import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    RegistryClient,
    Transient,
    check_response,
    container_of,
)
from tuner.oci.unpack import unpack_data_dir
from tuner.spec.targets import RegistryOptions
from tuner.workdir import scratch_dir

_INDEX_TYPES = (INDEX_MEDIA_TYPE, DOCKER_MANIFEST_LIST)
_MANIFEST_TYPES = (MANIFEST_MEDIA_TYPE, DOCKER_MANIFEST)
_MAX_MANIFEST_BYTES = 4 << 20  # the distribution spec's recommended manifest limit
TITLE_ANNOTATION = "org.opencontainers.image.title"  # an ORAS artifact's file name per layer
UNPACK_ANNOTATION = "io.deis.oras.content.unpack"  # ORAS: this layer is a tar of a folder


@dataclass(frozen=True)
class PullResult:
    reference: str
    digest: str
    files: list[Path]
    labels: dict[str, str]


def pull_image(reference: str, dest: Path, options: RegistryOptions, platform: tuple[str, str] = ("linux", "amd64"),
               required: tuple[str, ...] = REQUIRED_ADAPTER_FILES) -> PullResult:
    """Download the image at `reference` and unpack its /data files into dest (new or empty).

    `required` names files /data must hold: the adapter's by default; () for a dataset image.
    """
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UserError(f"{dest} exists and is not an empty directory", fix="pull into a new directory")
    container = container_of(reference)
    client = RegistryClient(container.registry, options)
    deadline = time.monotonic() + options.retry_seconds
    where = f"registry {container.registry}, {reference}"
    digest, manifest = _fetch_manifest(client, container, container.digest or container.tag, deadline)
    if manifest.get("mediaType") in _INDEX_TYPES or "manifests" in manifest:
        chosen = _choose_platform(descriptors.index(manifest, where), platform, reference)
        digest, manifest = _fetch_manifest(client, container, chosen, deadline)
    if manifest.get("mediaType", MANIFEST_MEDIA_TYPE) not in _MANIFEST_TYPES or not manifest.get("layers"):
        raise UserError(f"{reference} is not a container image (manifest media type "
                        f"{quote(manifest.get('mediaType'))})",
                        fix="pull an image whose filesystem holds /data/adapter_config.json")
    descriptors.manifest(manifest, where)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with scratch_dir(".tuner-pull-", dest.parent) as scratch:
        blobs = Path(scratch, "blobs")
        blobs.mkdir()
        config = json.loads(_download_blob(client, container, manifest["config"], blobs, deadline).read_bytes())
        staging = Path(scratch, "data")
        titles = [(layer.get("annotations") or {}).get(TITLE_ANNOTATION) for layer in manifest["layers"]]
        if all(titles):  # an ORAS artifact: each layer is one file, named by its title (how Kaito ships weights)
            _place_artifact_files(client, container, manifest["layers"], titles, blobs, staging, deadline,
                                  reference)
        else:
            layers = [(_download_blob(client, container, layer, blobs, deadline), layer.get("mediaType", ""))
                      for layer in manifest["layers"]]
            unpack_data_dir(layers, staging)
        missing = [name for name in required if not (staging / name).is_file()]
        if missing:
            raise UserError(f"{reference} lacks /data/{', /data/'.join(missing)} (or, as an ORAS artifact, the "
                            f"file{'s' if len(missing) > 1 else ''} {', '.join(missing)})",
                            fix="pull an image built by tuner or Kaito (the files under /data), or an ORAS artifact")
        if not any(staging.rglob("*")):
            raise UserError(f"{reference} has no files under /data", fix="put the files in the image's /data folder")
        if dest.exists():
            dest.rmdir()
        shutil.move(staging, dest)
    files = sorted(p for p in dest.rglob("*") if p.is_file())
    labels = (config.get("config") or {}).get("Labels") or {}
    return PullResult(reference, digest, files, labels)


def _place_artifact_files(client: RegistryClient, container: oras.container.Container, layers: list[dict],
                          titles: list[str], blobs: Path, staging: Path, deadline: float, reference: str) -> None:
    """Each layer's blob, verified, as the file its title names (`oras pull` does the same): a title that
    would leave the folder, repeat another, or a layer ORAS would unpack as a folder is refused."""
    staging.mkdir()
    for layer, title in zip(layers, titles, strict=True):
        parts = PurePosixPath(title).parts
        if not parts or PurePosixPath(title).is_absolute() or any(part in ("..", ".") for part in parts) \
                or (staging / title).exists():
            raise UserError(f"{reference} has a layer titled {quote(title)}, which is not a file name in one folder",
                            fix="push the files with plain relative names (oras push REF file ...)")
        if str((layer.get("annotations") or {}).get(UNPACK_ANNOTATION, "")).lower() == "true":
            raise UserError(f"{reference} packs the folder {quote(title)} as one layer, which tuner does not unpack",
                            fix="push the folder's files one by one (oras push REF dir/*)")
        (staging / title).parent.mkdir(parents=True, exist_ok=True)
        _download_blob(client, container, layer, blobs, deadline).rename(staging / title)


def _fetch_manifest(client: RegistryClient, container: oras.container.Container, ref: str,
                    deadline: float) -> tuple[str, dict]:
    """GET a manifest or index by tag or digest; verify it against the digest it is known by."""
    url = f"{client.prefix}://{container.manifest_url(ref)}"
    accept = ", ".join((MANIFEST_MEDIA_TYPE, INDEX_MEDIA_TYPE, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST))

    def get() -> tuple[requests.Response, bytes]:
        response = client.do_request(url, "GET", headers={"Accept": accept}, stream=True)
        if response.status_code == 404:
            raise UserError(f"{container.registry}/{container.api_prefix}:{ref} does not exist in the registry",
                            fix="check the repository, tag and digest")
        return response, _bounded_body(check_response(response), f"manifest {ref} from registry {container.registry}")

    response, body = client.retrying(deadline, f"fetching manifest {ref}", get)
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    expected = ref if ref.startswith("sha256:") else response.headers.get("Docker-Content-Digest")
    if expected and expected != digest:
        raise UserError(f"manifest {ref} does not match its digest: got {digest}, expected {quote(expected)}")
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise UserError(f"manifest {ref} from registry {container.registry} is not JSON") from None
    if not isinstance(document, dict):
        raise UserError(f"manifest {ref} is {type(document).__name__} {quote(document)}, not a JSON object",
                        where=f"registry {container.registry}",
                        fix="the registry serves something that is not an OCI/Docker image; check the reference")
    return digest, document


def _bounded_body(response: requests.Response, what: str) -> bytes:
    """The body, read no further than _MAX_MANIFEST_BYTES: an endless manifest is refused, not held."""
    with response:
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > _MAX_MANIFEST_BYTES:
            raise UserError(f"{what} is {int(length):,} bytes, over the {_MAX_MANIFEST_BYTES:,} byte limit",
                            fix="a manifest is kilobytes; check the registry and the reference")
        body = bytearray()
        for chunk in response.iter_content(chunk_size=1 << 16):
            body += chunk
            if len(body) > _MAX_MANIFEST_BYTES:
                raise UserError(f"{what} is over the {_MAX_MANIFEST_BYTES:,} byte limit (read no further)",
                                fix="a manifest is kilobytes; check the registry and the reference")
        return bytes(body)


def _choose_platform(index: dict, platform: tuple[str, str], reference: str) -> str:
    entries = [m for m in index.get("manifests", []) if m.get("mediaType") in _MANIFEST_TYPES]
    for entry in entries:
        p = entry.get("platform") or {}
        if (p.get("os"), p.get("architecture")) == platform:
            return entry["digest"]
    if len(entries) == 1:
        return entries[0]["digest"]
    raise UserError(f"{reference} is an index without a {platform[0]}/{platform[1]} image",
                    fix="pull a single-platform image or the platform's manifest digest")


def _download_blob(client: RegistryClient, container: oras.container.Container, descriptor: dict, folder: Path,
                   deadline: float) -> Path:
    """Stream a blob to folder/<hex>, verifying its sha256 and size; retried as a whole."""
    digest, size = descriptor.get("digest", ""), descriptor.get("size")
    path = folder / digest_hex(digest)

    def download() -> Path:
        sha256, received = hashlib.sha256(), 0
        with client.get_blob(container, digest, stream=True) as response:
            check_response(response)
            with path.open("wb") as f:
                for chunk in response.iter_content(chunk_size=1 << 20):
                    sha256.update(chunk)
                    received += len(chunk)
                    if size is not None and received > size:
                        raise UserError(f"blob {digest} is larger than the {size:,} bytes its descriptor says")
                    f.write(chunk)
        if "sha256:" + sha256.hexdigest() != digest or (size is not None and received != size):
            raise Transient(f"blob {digest} arrived corrupt ({received:,} bytes, sha256:{sha256.hexdigest()[:12]})")
        return path

    return client.retrying(deadline, f"downloading blob {digest[7:19]}", download)
