"""tuner.unpack: the /data/ files of any image's layers, merged like a container runtime, safely."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import tarfile
from pathlib import Path

import pytest
import zstandard

from tuner.errors import UserError
from tuner.oci.unpack import LAYER_MEDIA_TYPES, unpack_data_dir

GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
WEIGHTS = os.urandom(3000)  # not a multiple of the tar block size
CONFIG = b'{"r": 8, "lora_alpha": 16}'

Member = tuple[tarfile.TarInfo, bytes]


def _member(name: str, kind: bytes, data: bytes = b"", linkname: str = "") -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, len(data), linkname
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info, data


def reg(name: str, data: bytes) -> Member:
    return _member(name, tarfile.REGTYPE, data)


def folder(name: str) -> Member:
    return _member(name, tarfile.DIRTYPE)


def symlink(name: str, target: str) -> Member:
    return _member(name, tarfile.SYMTYPE, linkname=target)


def hardlink(name: str, target: str) -> Member:
    return _member(name, tarfile.LNKTYPE, linkname=target)


def tar_bytes(members: list[Member]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return raw.getvalue()


def write_blob(tmp_path: Path, body: bytes, media_type: str) -> tuple[Path, str]:
    """Store a layer blob the way the caller does: a file named by its digest hex."""
    blob = tmp_path / "blobs" / hashlib.sha256(body).hexdigest()
    blob.parent.mkdir(exist_ok=True)
    blob.write_bytes(body)
    return blob, media_type


def layer(tmp_path: Path, members: list[Member], media_type: str = GZIP) -> tuple[Path, str]:
    body = tar_bytes(members)
    compression = LAYER_MEDIA_TYPES[media_type]
    if compression == "gzip":
        body = gzip.compress(body)
    elif compression == "zstd":
        body = zstandard.ZstdCompressor().compress(body)
    return write_blob(tmp_path, body, media_type)


def tree(dest: Path) -> dict[str, bytes]:
    """Every regular file under dest by relative path; fails if dest holds anything but files and dirs."""
    files = {}
    for path in sorted(dest.rglob("*")):
        assert not path.is_symlink(), f"{path} is a symlink"
        if path.is_file():
            files[path.relative_to(dest).as_posix()] = path.read_bytes()
        else:
            assert path.is_dir(), f"{path} is neither a file nor a directory"
    return files


ADAPTER = [
    folder("data"),
    reg("data/adapter_config.json", CONFIG),
    reg("data/adapter_model.safetensors", WEIGHTS),
    folder("data/tokenizer"),
    reg("data/tokenizer/tokenizer.json", b"{}"),
]


def test_gzip_layer_roundtrip_returns_the_sorted_files(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    files = unpack_data_dir([layer(tmp_path, ADAPTER)], dest)
    assert files == [dest / "adapter_config.json", dest / "adapter_model.safetensors", dest / "tokenizer/tokenizer.json"]
    assert tree(dest) == {
        "adapter_config.json": CONFIG,
        "adapter_model.safetensors": WEIGHTS,
        "tokenizer/tokenizer.json": b"{}",
    }


@pytest.mark.parametrize("media_type", sorted(LAYER_MEDIA_TYPES))
def test_every_tar_media_type_unpacks(tmp_path: Path, media_type: str) -> None:
    unpack_data_dir([layer(tmp_path, ADAPTER, media_type)], tmp_path / "dest")
    assert tree(tmp_path / "dest")["adapter_model.safetensors"] == WEIGHTS


def test_zstd_layer_of_several_frames_unpacks(tmp_path: Path) -> None:
    body = tar_bytes(ADAPTER)
    frames = b"".join(zstandard.ZstdCompressor().compress(body[i:i + 1000]) for i in range(0, len(body), 1000))
    unpack_data_dir([write_blob(tmp_path, frames, ZSTD)], tmp_path / "dest")
    assert tree(tmp_path / "dest")["adapter_model.safetensors"] == WEIGHTS


def test_docker_style_dot_slash_names_unpack(tmp_path: Path) -> None:
    members = [folder("./"), folder("./data/"), reg("./data/adapter_model.safetensors", WEIGHTS)]
    unpack_data_dir([layer(tmp_path, members)], tmp_path / "dest")
    assert tree(tmp_path / "dest") == {"adapter_model.safetensors": WEIGHTS}


def test_busybox_base_layer_outside_data_is_ignored(tmp_path: Path) -> None:
    busybox = [
        folder("bin"),
        reg("bin/busybox", b"\x7fELF..."),
        hardlink("bin/sh", "bin/busybox"),
        symlink("bin/ls", "/bin/busybox"),
        folder("dev"),
        _member("dev/null", tarfile.CHRTYPE),
        reg("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
    ]
    adapter = [folder("data"), reg("data/adapter_model.safetensors", WEIGHTS)]
    dest = tmp_path / "dest"
    files = unpack_data_dir([layer(tmp_path, busybox), layer(tmp_path, adapter)], dest)
    assert files == [dest / "adapter_model.safetensors"]
    assert tree(dest) == {"adapter_model.safetensors": WEIGHTS}


def test_root_may_be_any_directory(tmp_path: Path) -> None:
    members = [reg("data/ignored.bin", b"x"), reg("opt/adapter/adapter_model.safetensors", WEIGHTS)]
    unpack_data_dir([layer(tmp_path, members)], tmp_path / "dest", root="/opt/adapter/")
    assert tree(tmp_path / "dest") == {"adapter_model.safetensors": WEIGHTS}


def test_a_later_layer_overrides_a_file(tmp_path: Path) -> None:
    lower = layer(tmp_path, [reg("data/adapter_model.safetensors", b"old"), reg("data/adapter_config.json", CONFIG)])
    upper = layer(tmp_path, [reg("data/adapter_model.safetensors", WEIGHTS)])
    unpack_data_dir([lower, upper], tmp_path / "dest")
    assert tree(tmp_path / "dest") == {"adapter_config.json": CONFIG, "adapter_model.safetensors": WEIGHTS}


def test_a_later_file_replaces_a_lower_directory(tmp_path: Path) -> None:
    lower = layer(tmp_path, [reg("data/tokenizer/tokenizer.json", b"{}")])
    upper = layer(tmp_path, [reg("data/tokenizer", b"now a file")])
    unpack_data_dir([lower, upper], tmp_path / "dest")
    assert tree(tmp_path / "dest") == {"tokenizer": b"now a file"}


def test_whiteout_deletes_a_lower_file(tmp_path: Path) -> None:
    lower = layer(tmp_path, [reg("data/adapter_model.safetensors", WEIGHTS), reg("data/stale.bin", b"x")])
    upper = layer(tmp_path, [reg("data/.wh.stale.bin", b"")])
    unpack_data_dir([lower, upper], tmp_path / "dest")
    assert tree(tmp_path / "dest") == {"adapter_model.safetensors": WEIGHTS}


def test_whiteout_of_data_itself_deletes_all_lower_files(tmp_path: Path) -> None:
    lower = layer(tmp_path, [reg("data/old/a.bin", b"a"), reg("data/b.bin", b"b")])
    upper = layer(tmp_path, [reg(".wh.data", b""), reg("data/adapter_model.safetensors", WEIGHTS)])
    unpack_data_dir([lower, upper], tmp_path / "dest")
    assert tree(tmp_path / "dest") == {"adapter_model.safetensors": WEIGHTS}


@pytest.mark.parametrize("marker_first", [True, False], ids=["marker-first", "marker-last"])
def test_opaque_whiteout_hides_only_lower_layers_in_its_directory(tmp_path: Path, marker_first: bool) -> None:
    lower = layer(tmp_path, [reg("data/ckpt/a.bin", b"a"), reg("data/ckpt/sub/b.bin", b"b"), reg("data/keep.json", b"k")])
    marker, new = reg("data/ckpt/.wh..wh..opq", b""), reg("data/ckpt/new.bin", b"n")
    upper = layer(tmp_path, [folder("data/ckpt"), *([marker, new] if marker_first else [new, marker])])
    unpack_data_dir([lower, upper], tmp_path / "dest")
    assert tree(tmp_path / "dest") == {"ckpt/new.bin": b"n", "keep.json": b"k"}


def test_hardlink_inside_data_is_written_as_a_copy(tmp_path: Path) -> None:
    members = [reg("data/adapter_model.safetensors", WEIGHTS), hardlink("data/model.bin", "data/adapter_model.safetensors")]
    dest = tmp_path / "dest"
    unpack_data_dir([layer(tmp_path, members)], dest)
    assert tree(dest) == {"adapter_model.safetensors": WEIGHTS, "model.bin": WEIGHTS}
    assert (dest / "model.bin").stat().st_ino != (dest / "adapter_model.safetensors").stat().st_ino


@pytest.mark.parametrize(
    "target", ["adapter_model.safetensors", "/data/adapter_model.safetensors", "../data/./adapter_model.safetensors",
               "../../../data/adapter_model.safetensors"],
)
def test_symlink_inside_data_is_written_as_a_copy(tmp_path: Path, target: str) -> None:
    members = [reg("data/adapter_model.safetensors", WEIGHTS), symlink("data/model.bin", target)]
    unpack_data_dir([layer(tmp_path, members)], tmp_path / "dest")
    assert tree(tmp_path / "dest") == {"adapter_model.safetensors": WEIGHTS, "model.bin": WEIGHTS}


def test_symlink_may_name_a_file_later_in_its_layer_and_other_links(tmp_path: Path) -> None:
    members = [
        symlink("data/adapter_model.safetensors", "latest/weights.bin"),  # through the next link
        symlink("data/latest", "ckpt-2"),  # a directory, copied whole
        reg("data/ckpt-2/weights.bin", WEIGHTS),
    ]
    unpack_data_dir([layer(tmp_path, members)], tmp_path / "dest")
    assert tree(tmp_path / "dest") == {
        "adapter_model.safetensors": WEIGHTS,
        "ckpt-2/weights.bin": WEIGHTS,
        "latest/weights.bin": WEIGHTS,
    }


@pytest.mark.parametrize("target", ["../../etc/passwd", "/etc/passwd", "../bin/sh", "/data/../etc/passwd"])
def test_symlink_leading_outside_data_is_refused(tmp_path: Path, target: str) -> None:
    members = [reg("etc/passwd", b"root"), symlink("data/adapter_model.safetensors", target)]
    with pytest.raises(UserError, match="'data/adapter_model.safetensors' is a symlink leading outside /data/"):
        unpack_data_dir([layer(tmp_path, members)], tmp_path / "dest")
    assert not (tmp_path / "dest" / "adapter_model.safetensors").exists()


def test_hardlink_leading_outside_data_is_refused(tmp_path: Path) -> None:
    members = [reg("etc/passwd", b"root"), hardlink("data/adapter_model.safetensors", "etc/passwd")]
    with pytest.raises(UserError, match="is a hard link leading outside /data/"):
        unpack_data_dir([layer(tmp_path, members)], tmp_path / "dest")


def test_link_to_a_missing_file_is_refused(tmp_path: Path) -> None:
    members = [symlink("data/adapter_model.safetensors", "gone.bin")]
    with pytest.raises(UserError, match="symlink to 'gone.bin', which is not in the image"):
        unpack_data_dir([layer(tmp_path, members)], tmp_path / "dest")


def test_symlink_loop_is_refused(tmp_path: Path) -> None:
    members = [symlink("data/a", "b"), symlink("data/b", "a")]
    with pytest.raises(UserError, match="loops"):
        unpack_data_dir([layer(tmp_path, members)], tmp_path / "dest")


@pytest.mark.parametrize("name", ["/data/adapter_model.safetensors", "/etc/passwd"])
def test_absolute_member_is_refused_inside_and_outside_data(tmp_path: Path, name: str) -> None:
    with pytest.raises(UserError, match=f"layer [0-9a-f]{{64}}: member '{name}' is an absolute path"):
        unpack_data_dir([layer(tmp_path, [reg(name, b"x")])], tmp_path / "dest")


@pytest.mark.parametrize("name", ["data/../../etc/cron.d/job", "bin/../../outside", "data/sub/.."])
def test_dotdot_member_is_refused_inside_and_outside_data(tmp_path: Path, name: str) -> None:
    with pytest.raises(UserError, match="has a '..' component"):
        unpack_data_dir([layer(tmp_path, [reg(name, b"x")])], tmp_path / "dest")
    assert not (tmp_path / "outside").exists()


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE], ids=["chr", "blk", "fifo"])
def test_device_or_fifo_under_data_is_refused(tmp_path: Path, kind: bytes) -> None:
    with pytest.raises(UserError, match="'data/null' is a device, fifo or other special file under /data/"):
        unpack_data_dir([layer(tmp_path, [_member("data/null", kind)])], tmp_path / "dest")


def test_oversized_member_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    members = [reg("data/adapter_config.json", CONFIG), reg("data/big/weights.bin", WEIGHTS)]
    dest = tmp_path / "dest"
    with pytest.raises(UserError, match="'data/big/weights.bin' is 3,000 bytes, over the limit of 2,999 bytes per file"):
        unpack_data_dir([layer(tmp_path, members)], dest, max_member_bytes=len(WEIGHTS) - 1)
    assert tree(dest) == {"adapter_config.json": CONFIG}  # no big/, no partial or temporary file


def test_total_limit_counts_every_file_written(tmp_path: Path) -> None:
    members = [reg("data/a.bin", WEIGHTS), hardlink("data/b.bin", "data/a.bin")]
    dest = tmp_path / "dest"
    with pytest.raises(UserError, match="'data/b.bin' would bring the files unpacked from /data/ to 6,000 bytes, "
                                        "over the limit of 5,999 bytes"):
        unpack_data_dir([layer(tmp_path, members)], dest, max_total_bytes=2 * len(WEIGHTS) - 1)
    assert tree(dest) == {"a.bin": WEIGHTS}


def test_unknown_media_type_is_refused_before_any_layer_is_read(tmp_path: Path) -> None:
    helm = "application/vnd.cncf.helm.chart.content.v1.tar+gzip"
    chart, _ = layer(tmp_path, [reg("Chart.yaml", b"name: x")])
    with pytest.raises(UserError, match=re.escape(f"layer {chart.name} has media type '{helm}', which is not a tar layer")):
        unpack_data_dir([layer(tmp_path, ADAPTER), (chart, helm)], tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize("media_type", [GZIP, ZSTD])
def test_truncated_compressed_layer_is_refused(tmp_path: Path, media_type: str) -> None:
    blob, _ = layer(tmp_path, ADAPTER, media_type)
    truncated = write_blob(tmp_path, blob.read_bytes()[:-20], media_type)
    compression = LAYER_MEDIA_TYPES[media_type]
    with pytest.raises(UserError, match=f"layer {truncated[0].name} is not a valid {compression}-compressed tar"):
        unpack_data_dir([truncated], tmp_path / "dest")


@pytest.mark.parametrize("cut", [2 * 512 + 100, 3 * 512 + 1000], ids=["inside-a-header", "inside-the-weights"])
def test_truncated_tar_layer_is_refused(tmp_path: Path, cut: int) -> None:
    body = tar_bytes([reg("data/adapter_config.json", CONFIG), reg("data/adapter_model.safetensors", WEIGHTS)])
    blob = write_blob(tmp_path, body[:cut], "application/vnd.oci.image.layer.v1.tar")
    with pytest.raises(UserError, match=f"layer {blob[0].name} is not a valid tar"):
        unpack_data_dir([blob], tmp_path / "dest")


def test_a_blob_that_is_not_a_tar_is_refused(tmp_path: Path) -> None:
    blob = write_blob(tmp_path, b'{"schemaVersion": 2}', "application/vnd.oci.image.layer.v1.tar")
    with pytest.raises(UserError, match="is not a valid tar"):
        unpack_data_dir([blob], tmp_path / "dest")


def test_huge_pax_header_is_refused_without_reading_it(tmp_path: Path) -> None:
    info, data = reg("data/x", b"x")
    info.pax_headers = {"comment": "x" * (2 << 20)}
    with pytest.raises(UserError, match="extended header"):
        unpack_data_dir([layer(tmp_path, [(info, data)])], tmp_path / "dest")


def test_symlink_already_in_dest_is_not_written_through(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "tokenizer").symlink_to(outside)
    with pytest.raises(UserError, match="would reach outside .* through a symlink already there"):
        unpack_data_dir([layer(tmp_path, ADAPTER)], dest)
    assert list(outside.iterdir()) == []
