"""tuner.oci: reproducible adapter images, OCI layouts read by real skopeo, safe extraction."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import save_file

from tuner.errors import UserError
from tuner.oci.image import (
    LAYER_MEDIA_TYPE,
    Blob,
    blob_path,
    build_adapter_image,
    read_oci_layout,
    write_image,
    write_oci_layout,
)
from tuner.oci.unpack import unpack_data_dir
from tuner.spec.targets import OciLayoutTarget, RegistryTarget, parse_output_ref

LABELS = {"kaito.sh/base-model": "phi-3-mini", "org.opencontainers.image.version": "0.0.1"}
ANNOTATIONS = {"org.opencontainers.image.title": "phi3-adapter"}


@pytest.fixture(scope="session")
def skopeo() -> str:
    """Path of the skopeo binary, installed with apt-get when missing (never skipped)."""
    if shutil.which("skopeo") is None:
        subprocess.run(["apt-get", "update"], check=True, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "skopeo"], check=True, capture_output=True)
    path = shutil.which("skopeo")
    assert path is not None, "skopeo is not installed and apt-get did not install it"
    return path


def _write_adapter(directory: Path, seed: int = 0) -> Path:
    """A small PEFT-style adapter: real LoraConfig JSON, safetensors weights, a nested file."""
    directory.mkdir(parents=True)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM").to_dict()
    (directory / "adapter_config.json").write_text(json.dumps(config, default=sorted, sort_keys=True))  # sets -> lists
    generator = torch.Generator().manual_seed(seed)
    save_file(
        {
            "base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 64, generator=generator),
            "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(64, 4, generator=generator),
        },
        directory / "adapter_model.safetensors",
    )
    (directory / "training_summary.json").write_text('{"train_loss": 1.25}')
    (directory / "tokenizer").mkdir()
    (directory / "tokenizer" / "tokenizer_config.json").write_text('{"model_max_length": 4096}')
    return directory


def _tree_digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _tar_bytes(layer: Blob) -> bytes:
    return gzip.decompress(layer.data)


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    return _write_adapter(tmp_path / "adapter")


def _build(adapter_dir: Path):
    return build_adapter_image(adapter_dir, labels=LABELS, annotations=ANNOTATIONS)


def test_same_bytes_give_same_digest_regardless_of_mtime_and_location(adapter: Path, tmp_path: Path) -> None:
    first = _build(adapter)
    assert _build(adapter).manifest.digest == first.manifest.digest

    for path in adapter.rglob("*"):
        os.utime(path, (1_700_000_000, 1_700_000_000))
        path.chmod(0o700 if path.is_dir() else 0o600)
    assert _build(adapter).manifest.digest == first.manifest.digest

    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(adapter, copy)
    rebuilt = _build(copy)
    assert (rebuilt.manifest.digest, rebuilt.layer.data, rebuilt.config.data) == (
        first.manifest.digest,
        first.layer.data,
        first.config.data,
    )


def test_one_changed_weight_byte_changes_the_digest(adapter: Path) -> None:
    before = _build(adapter)
    weights = adapter / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    after = _build(adapter)
    assert after.layer.digest != before.layer.digest
    assert after.manifest.digest != before.manifest.digest


def test_layer_tar_is_normalised(adapter: Path) -> None:
    image = _build(adapter)
    assert image.layer.data[4:8] == b"\0\0\0\0"  # gzip header mtime 0
    assert image.layer.data[3] & 0x08 == 0  # no FNAME in the gzip header
    with tarfile.open(fileobj=io.BytesIO(image.layer.data), mode="r:gz") as tar:
        members = tar.getmembers()
    assert [(m.name, m.type, m.mode) for m in members] == [
        ("data", tarfile.DIRTYPE, 0o755),
        ("data/adapter_config.json", tarfile.REGTYPE, 0o644),
        ("data/adapter_model.safetensors", tarfile.REGTYPE, 0o644),
        ("data/tokenizer", tarfile.DIRTYPE, 0o755),
        ("data/tokenizer/tokenizer_config.json", tarfile.REGTYPE, 0o644),
        ("data/training_summary.json", tarfile.REGTYPE, 0o644),
    ]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}


def test_manifest_and_config_content(adapter: Path) -> None:
    image = build_adapter_image(
        adapter, labels=LABELS, annotations=ANNOTATIONS, created="2025-01-02T03:04:05Z", platform=("linux", "arm64")
    )
    manifest = json.loads(image.manifest.data)
    assert manifest == {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": image.config.digest,
            "size": len(image.config.data),
        },
        "layers": [{"mediaType": LAYER_MEDIA_TYPE, "digest": image.layer.digest, "size": len(image.layer.data)}],
        "annotations": ANNOTATIONS,
    }
    assert image.manifest.digest == "sha256:" + hashlib.sha256(image.manifest.data).hexdigest()
    config = json.loads(image.config.data)
    assert (config["os"], config["architecture"], config["created"]) == ("linux", "arm64", "2025-01-02T03:04:05Z")
    assert config["config"] == {"Labels": LABELS}
    assert config["rootfs"] == {
        "type": "layers",
        "diff_ids": ["sha256:" + hashlib.sha256(_tar_bytes(image.layer)).hexdigest()],
    }
    assert len(config["history"]) == 1
    assert image.config.data == json.dumps(config, sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize("missing", ["adapter_config.json", "adapter_model.safetensors"])
def test_refuses_directory_without_adapter_files(adapter: Path, missing: str) -> None:
    (adapter / missing).unlink()
    with pytest.raises(UserError, match=missing):
        build_adapter_image(adapter)


def test_skopeo_inspect_reads_platform_labels_and_diff_id(adapter: Path, tmp_path: Path, skopeo: str) -> None:
    image = _build(adapter)
    layout = tmp_path / "layout"
    write_oci_layout(image, OciLayoutTarget(layout, "v1"))

    inspect = json.loads(subprocess.run([skopeo, "inspect", f"oci:{layout}:v1"], check=True, capture_output=True, text=True).stdout)
    assert (inspect["Os"], inspect["Architecture"]) == ("linux", "amd64")
    assert inspect["Labels"] == LABELS
    assert inspect["Digest"] == image.manifest.digest
    assert inspect["Layers"] == [image.layer.digest]

    config = json.loads(
        subprocess.run([skopeo, "inspect", "--config", f"oci:{layout}:v1"], check=True, capture_output=True, text=True).stdout
    )
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(_tar_bytes(image.layer)).hexdigest()]


def test_skopeo_copy_to_dir_keeps_our_blobs(adapter: Path, tmp_path: Path, skopeo: str) -> None:
    image = _build(adapter)
    layout, out = tmp_path / "layout", tmp_path / "copied"
    write_oci_layout(image, OciLayoutTarget(layout, "v1"))
    policy = tmp_path / "policy.json"
    policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}')

    subprocess.run([skopeo, "--policy", str(policy), "copy", f"oci:{layout}:v1", f"dir:{out}"], check=True, capture_output=True)

    assert (out / "manifest.json").read_bytes() == image.manifest.data
    for blob in (image.layer, image.config):
        copied = (out / blob.digest.removeprefix("sha256:")).read_bytes()
        assert copied == blob.data
        assert "sha256:" + hashlib.sha256(copied).hexdigest() == blob.digest


def test_round_trip_through_layout_gives_identical_files(adapter: Path, tmp_path: Path) -> None:
    image = _build(adapter)
    target = OciLayoutTarget(tmp_path / "layout", "v1")
    assert write_oci_layout(image, target) == image.manifest.digest
    assert json.loads((target.path / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}

    read = read_oci_layout(target)
    assert read == image
    dest = tmp_path / "extracted"
    written = unpack_data_dir([(blob_path(target.path, read.layer.digest), LAYER_MEDIA_TYPE)], dest)
    assert sorted(p.relative_to(dest).as_posix() for p in written) == sorted(_tree_digests(adapter))
    assert _tree_digests(dest) == _tree_digests(adapter)


def test_second_tag_keeps_the_first_and_retag_replaces(adapter: Path, tmp_path: Path) -> None:
    first = _build(adapter)
    second = build_adapter_image(adapter, labels={"variant": "two"})
    layout = tmp_path / "layout"
    write_oci_layout(first, OciLayoutTarget(layout, "v1"))
    write_oci_layout(second, OciLayoutTarget(layout, "v2"))
    assert read_oci_layout(OciLayoutTarget(layout, "v1")) == first
    assert read_oci_layout(OciLayoutTarget(layout, "v2")) == second

    write_oci_layout(second, OciLayoutTarget(layout, "v1"))
    index = json.loads((layout / "index.json").read_text())
    tags = {m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"] for m in index["manifests"]}
    assert tags == {"v1": second.manifest.digest, "v2": second.manifest.digest}
    assert len(index["manifests"]) == 2


def test_read_rejects_missing_tag_and_corrupt_blob(adapter: Path, tmp_path: Path) -> None:
    image = _build(adapter)
    target = OciLayoutTarget(tmp_path / "layout", "v1")
    write_oci_layout(image, target)
    with pytest.raises(UserError, match="no image tagged 'nope'.*tags present: v1"):
        read_oci_layout(OciLayoutTarget(target.path, "nope"))

    layer_path = target.path / "blobs" / "sha256" / image.layer.digest.removeprefix("sha256:")
    corrupted = bytearray(layer_path.read_bytes())
    corrupted[100] ^= 0xFF
    layer_path.write_bytes(bytes(corrupted))
    with pytest.raises(UserError, match="corrupt"):
        read_oci_layout(target)


def test_write_refuses_non_empty_directory_that_is_not_a_layout(adapter: Path) -> None:
    with pytest.raises(UserError, match="not an OCI image layout"):
        write_oci_layout(_build(adapter), OciLayoutTarget(adapter, "v1"))
    assert not (adapter / "index.json").exists()


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("oci:/x/y:v1", OciLayoutTarget(Path("/x/y"), "v1")),
        ("oci:rel/dir", OciLayoutTarget(Path("rel/dir"), "latest")),
        ("oci:/x/y", OciLayoutTarget(Path("/x/y"), "latest")),
        ("localhost:5000/a/b:1", RegistryTarget("localhost:5000/a/b:1")),
        ("myacr.azurecr.io/adapters/phi3:0.0.1", RegistryTarget("myacr.azurecr.io/adapters/phi3:0.0.1")),
        ("ghcr.io/org/adapter@sha256:" + "a" * 64, RegistryTarget("ghcr.io/org/adapter@sha256:" + "a" * 64)),
        # Kaito's ParseDockerRef: a digested name keeps only the digest; Docker Hub names are normalised
        ("ghcr.io/org/adapter:v1@sha256:" + "b" * 64, RegistryTarget("ghcr.io/org/adapter@sha256:" + "b" * 64)),
        ("phi3:0.0.1", RegistryTarget("docker.io/library/phi3:0.0.1")),
        ("org/phi3", RegistryTarget("docker.io/org/phi3:latest")),
        ("library/phi3:0.0.1", RegistryTarget("docker.io/library/phi3:0.0.1")),
    ],
)
def test_parse_output_ref_accepts(ref: str, expected: OciLayoutTarget | RegistryTarget) -> None:
    assert parse_output_ref(ref) == expected


@pytest.mark.parametrize(
    "ref",
    [
        "UPPER/Case:?",
        "myacr.azurecr.io/Adapters/phi3:1",  # uppercase repository
        "docker://myacr.azurecr.io/a:1",  # transport prefix
        "myacr.azurecr.io/a:bad tag",
        "myacr.azurecr.io/a@sha256:short",
        "oci::v1",  # no directory
        "oci:/x/y:bad/tag",
    ],
)
def test_parse_output_ref_rejects_naming_the_reference(ref: str) -> None:
    with pytest.raises(UserError) as excinfo:
        parse_output_ref(ref)
    assert repr(ref) in str(excinfo.value)


def test_write_image_streams_the_layer_into_the_layout_without_holding_it(tmp_path):
    """A merged model's layer is the model's size: built into the layout it never sits in memory."""
    import tracemalloc

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with (model / "model.safetensors").open("wb") as f:
        for _ in range(32):
            f.write(os.urandom(1 << 20))  # 32 MiB that gzip cannot shrink
    target = OciLayoutTarget(tmp_path / "layout", "v1")
    tracemalloc.start()
    try:
        digest = write_image(model, target, required=("config.json",))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20
    image = read_oci_layout(target)
    assert image.manifest.digest == digest and image.layer.size > 32 << 20
    assert image.layer.content == blob_path(target.path, image.layer.digest)  # read back in place, not copied
    in_memory = build_adapter_image(model, required=("config.json",))
    assert (in_memory.layer, in_memory.manifest) == (image.layer, image.manifest)  # the same bytes either way
    assert sorted(p.name for p in (target.path / "blobs" / "sha256").iterdir()) == sorted(
        blob.digest.split(":")[1] for blob in (image.layer, image.config, image.manifest))  # no leftover part file
