"""Package a LoRA adapter directory as a reproducible single-layer OCI image.

The image is what Kaito's inference puller, skopeo, crane, docker and Kubernetes image volumes
read: one gzip tar layer holding the adapter files under `data/`, an OCI image config and an OCI
image manifest. Every byte is a function of the adapter files' contents (and the explicit
`created`/labels/annotations/platform arguments), so the same adapter always gets the same digest.
`write_image` streams the layer straight into an OCI image layout, never holding it in memory (a
merged 7B model's layer is ~15 GB); the registry push then reads the exact bytes from that file.
`build_adapter_image` without a `layer_dir` keeps the layer in memory (small images, tests).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.errors import UserError
from tuner.spec.targets import OciLayoutTarget
from tuner.workdir import atomic_output, atomic_write

LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
REQUIRED_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
DATA_DIR = "data"

# Level 1: safetensors weights are near-incompressible (random-ish floats), so level 6 buys ~1% size
# for up to 3x the time. Measured on 100 MB safetensors of randn*0.02: fp32 L1 35 MB/s ratio 0.929,
# L6 32 MB/s ratio 0.926; bf16 L1 40 MB/s ratio 0.802, L6 13 MB/s ratio 0.795.
GZIP_LEVEL = 1

_SHA256_HEX_RE = re.compile(r"[0-9a-f]{64}")
_LAYER_PART = ".layer-"  # a layer being streamed into a layout's blob folder, before its rename


@dataclass(frozen=True)
class Blob:
    """A content-addressed blob and its OCI descriptor fields; `content` is its bytes, or the file
    holding them (a layer written into a layout). Blobs are equal when their descriptors are."""

    media_type: str
    digest: str
    size: int
    content: bytes | Path = field(compare=False, repr=False)

    @classmethod
    def of(cls, media_type: str, data: bytes) -> Blob:
        return cls(media_type, "sha256:" + hashlib.sha256(data).hexdigest(), len(data), data)

    @property
    def data(self) -> bytes:
        """The bytes (read from the file for a file-backed blob: meant for small images)."""
        return self.content if isinstance(self.content, bytes) else self.content.read_bytes()

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class AdapterImage:
    """The three blobs of an adapter image; `manifest.digest` is the image digest."""

    layer: Blob
    config: Blob
    manifest: Blob


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class _HashingWriter:
    """Passes writes through to `sink` while hashing and counting them (the tar's diff_id, the layer's digest)."""

    def __init__(self, sink):
        self.sink = sink
        self.sha256 = hashlib.sha256()
        self.offset = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.offset += len(data)
        return self.sink.write(data)

    def tell(self) -> int:
        return self.offset

    def flush(self) -> None:
        self.sink.flush()


def _tar_info(name: str, kind: bytes, mode: int, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _adapter_files(adapter_dir: Path) -> list[Path]:
    """Relative paths of every regular file (or symlink to one) under adapter_dir."""
    files = []
    for root, _dirs, names in os.walk(adapter_dir):
        for name in names:
            path = Path(root, name)
            if path.is_file():
                files.append(path.relative_to(adapter_dir))
    return files


def _build_layer(adapter_dir: Path, layer_dir: Path | None) -> tuple[Blob, str]:
    """Return the gzip tar layer of adapter_dir's files under `data/` and its diff_id: in memory, or
    streamed into a temporary file in `layer_dir` (flushed to disk) that the Blob names."""
    files = _adapter_files(adapter_dir)
    entries: dict[str, Path | None] = {f"{DATA_DIR}/": None}  # tar name -> source file (None: dir)
    for rel in files:
        for parent in reversed(rel.parents[:-1]):
            entries[f"{DATA_DIR}/{parent.as_posix()}/"] = None
        entries[f"{DATA_DIR}/{rel.as_posix()}"] = adapter_dir / rel
    if layer_dir is None:
        sink = io.BytesIO()
    else:
        sink = tempfile.NamedTemporaryFile(dir=layer_dir, prefix=_LAYER_PART, suffix=".part", delete=False)
    try:
        compressed = _HashingWriter(sink)
        with gzip.GzipFile(fileobj=compressed, mode="wb", compresslevel=GZIP_LEVEL, mtime=0, filename="") as gz:
            raw = _HashingWriter(gz)
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
                # Sorting names where directories end in "/" puts every directory before its contents.
                for name in sorted(entries):
                    source = entries[name]
                    if source is None:
                        tar.addfile(_tar_info(name, tarfile.DIRTYPE, 0o755))
                        continue
                    with source.open("rb") as f:
                        size = os.fstat(f.fileno()).st_size
                        tar.addfile(_tar_info(name, tarfile.REGTYPE, 0o644, size), f)
        if layer_dir is not None:
            sink.flush()
            os.fsync(sink.fileno())
    except BaseException:
        if layer_dir is not None:
            sink.close()
            Path(sink.name).unlink(missing_ok=True)
        raise
    content: bytes | Path = sink.getvalue() if layer_dir is None else Path(sink.name)
    sink.close()
    layer = Blob(LAYER_MEDIA_TYPE, "sha256:" + compressed.sha256.hexdigest(), compressed.offset, content)
    return layer, "sha256:" + raw.sha256.hexdigest()


def build_adapter_image(
    adapter_dir: Path,
    *,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    created: str = "1970-01-01T00:00:00Z",
    platform: tuple[str, str] = ("linux", "amd64"),
    required: tuple[str, ...] = REQUIRED_ADAPTER_FILES,
    layer_dir: Path | None = None,
) -> AdapterImage:
    """Build the reproducible image of adapter_dir; `platform` is (os, architecture). `required`:
    the files the folder must hold (a PEFT adapter's by default; a model's config.json for weights).
    `layer_dir`: stream the layer into a file there instead of memory (see `write_image`)."""
    missing = [name for name in required if not (adapter_dir / name).is_file()]
    if missing:
        raise UserError(
            f"{adapter_dir} is not a {'PEFT adapter' if required == REQUIRED_ADAPTER_FILES else 'model'} "
            f"directory: missing {', '.join(missing)}",
            fix="point it at the directory written by save_pretrained()",
        )
    layer, diff_id = _build_layer(adapter_dir, layer_dir)
    os_name, architecture = platform
    config = Blob.of(CONFIG_MEDIA_TYPE, _canonical_json({
        "architecture": architecture,
        "os": os_name,
        "created": created,
        "config": {"Labels": dict(labels or {})},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": "tuner: adapter files under /data"}],
    }))
    manifest_obj: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": config.descriptor(),
        "layers": [layer.descriptor()],  # no layer annotations: oras would treat it as a file artifact
    }
    if annotations:
        manifest_obj["annotations"] = dict(annotations)
    return AdapterImage(layer, config, Blob.of(MANIFEST_MEDIA_TYPE, _canonical_json(manifest_obj)))


def digest_hex(digest: str) -> str:
    """The hex part of a `sha256:<64 hex>` digest; UserError for anything else (it names files)."""
    algorithm, _, hex_digest = digest.partition(":")
    if algorithm != "sha256" or not _SHA256_HEX_RE.fullmatch(hex_digest):
        raise UserError(f"unsupported or malformed digest {digest!r}", fix="only sha256 digests are supported")
    return hex_digest


def blob_path(layout: Path, digest: str) -> Path:
    """Where an OCI image layout keeps the blob with this digest."""
    return layout / "blobs" / "sha256" / digest_hex(digest)


def _read_index(layout: Path) -> dict[str, Any]:
    try:
        return json.loads((layout / "index.json").read_bytes())
    except (OSError, ValueError) as e:
        raise UserError(f"{layout} is not a readable OCI image layout: {e}") from e


def write_image(folder: Path, target: OciLayoutTarget, **options: Any) -> str:
    """Build the image of `folder` (build_adapter_image's options) straight into the OCI layout at
    target.path, tagged target.tag: the layer is streamed to a file in the layout's blob folder and
    renamed to its digest, so no size of model is held in memory. Returns the manifest digest."""
    blobs = _layout_blobs(target.path)
    for stale in blobs.glob(f"{_LAYER_PART}*.part"):  # a build killed before its rename
        stale.unlink(missing_ok=True)
    image = build_adapter_image(folder, layer_dir=blobs, **options)
    try:
        return write_oci_layout(image, target)
    finally:
        if isinstance(image.layer.content, Path):
            image.layer.content.unlink(missing_ok=True)  # renamed into place, unless the write failed


def _layout_blobs(layout: Path) -> Path:
    """The layout's sha256 blob folder, made with the layout's marker file (UserError for a path that is
    neither a layout nor empty)."""
    if layout.exists() and not layout.is_dir():
        raise UserError(f"{layout} exists and is not a directory", fix="choose another oci:DIR")
    if layout.is_dir() and any(layout.iterdir()) and not (layout / "oci-layout").is_file():
        raise UserError(f"{layout} is a non-empty directory but not an OCI image layout", fix="choose another oci:DIR")
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    atomic_write(layout / "oci-layout", _canonical_json({"imageLayoutVersion": "1.0.0"}))  # a layout from here on
    return blobs


def write_oci_layout(image: AdapterImage, target: OciLayoutTarget) -> str:
    """Write the image into the OCI layout at target.path, (re)pointing target.tag at it.

    Other tags in an existing layout are kept. A file-backed blob is moved into place. Returns the
    manifest digest.
    """
    layout = target.path
    _layout_blobs(layout)
    for blob in (image.layer, image.config, image.manifest):
        path = blob_path(layout, blob.digest)
        if path.is_file() and path.stat().st_size == blob.size:
            continue
        if isinstance(blob.content, Path) and blob.content.name.startswith(_LAYER_PART):
            os.replace(blob.content, path)  # written and flushed in this folder by write_image
        elif isinstance(blob.content, Path):  # another layout's blob: copied, that layout keeps it
            with blob.content.open("rb") as source, atomic_output(path) as out:
                shutil.copyfileobj(source, out, 1 << 20)
        else:
            atomic_write(path, blob.content)
    index = _read_index(layout) if (layout / "index.json").is_file() else {}
    others = [m for m in index.get("manifests", []) if m.get("annotations", {}).get(REF_NAME_ANNOTATION) != target.tag]
    entry = image.manifest.descriptor() | {"annotations": {REF_NAME_ANNOTATION: target.tag}}
    index.update({"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": [*others, entry]})
    atomic_write(layout / "index.json", _canonical_json(index))
    return image.manifest.digest


def _read_blob(layout: Path, descriptor: dict[str, Any], expected_media_type: str) -> Blob:
    digest = descriptor.get("digest", "")
    if descriptor.get("mediaType") != expected_media_type:
        raise UserError(
            f"{layout}: blob {digest} has media type {descriptor.get('mediaType')!r}, expected {expected_media_type}",
            fix="this is not an adapter image built by tuner",
        )
    path = blob_path(layout, digest)
    sha256, size = hashlib.sha256(), 0
    try:
        with path.open("rb") as f:  # hashed in chunks: a layer may be larger than memory
            while chunk := f.read(1 << 20):
                sha256.update(chunk)
                size += len(chunk)
    except OSError as e:
        raise UserError(f"{layout}: blob {digest} is missing: {e}") from e
    found = "sha256:" + sha256.hexdigest()
    if found != digest or size != descriptor.get("size"):
        raise UserError(
            f"{layout}: blob {path.name} is corrupt (sha256 {found}, {size} bytes; "
            f"descriptor says {digest}, {descriptor.get('size')} bytes)"
        )
    # the layer stays in its file; the small config is read
    return Blob(expected_media_type, digest, size, path if expected_media_type == LAYER_MEDIA_TYPE else path.read_bytes())


def read_layout_manifest(target: OciLayoutTarget) -> tuple[bytes, dict[str, Any]]:
    """The verified bytes and parsed JSON of the image manifest tagged target.tag."""
    layout = target.path
    manifests = _read_index(layout).get("manifests", [])
    tagged = [m for m in manifests if m.get("annotations", {}).get(REF_NAME_ANNOTATION) == target.tag]
    if not tagged:
        tags = sorted(t for m in manifests if (t := m.get("annotations", {}).get(REF_NAME_ANNOTATION)))
        raise UserError(f"{layout} has no image tagged {target.tag!r}", fix=f"tags present: {', '.join(tags) or 'none'}")
    manifest = _read_blob(layout, tagged[-1], MANIFEST_MEDIA_TYPE)
    return manifest.data, json.loads(manifest.data)


def read_oci_layout(target: OciLayoutTarget) -> AdapterImage:
    """Read the adapter image tagged target.tag, verifying every blob's digest and size."""
    layout = target.path
    manifest_bytes, manifest_obj = read_layout_manifest(target)
    manifest = Blob.of(MANIFEST_MEDIA_TYPE, manifest_bytes)
    layers = manifest_obj.get("layers", [])
    if len(layers) != 1:
        raise UserError(
            f"{layout}:{target.tag} has {len(layers)} layers, expected 1",
            fix="this is not an adapter image built by tuner",
        )
    return AdapterImage(
        layer=_read_blob(layout, layers[0], LAYER_MEDIA_TYPE),
        config=_read_blob(layout, manifest_obj.get("config", {}), CONFIG_MEDIA_TYPE),
        manifest=manifest,
    )
