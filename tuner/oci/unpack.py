"""Extract the files under `/data/` from the layers of any container image, safely.

Adapter images keep the adapter under `/data/`: tuner's own single-layer images, Kaito's, or any
image built `FROM busybox` with `COPY adapter /data`. `unpack_data_dir` streams the already
downloaded, digest-verified layer blobs (lowest first) and writes the merged filesystem under
`/data/` into a directory, the way a container runtime would stack the layers:

- later layers override earlier files; OCI whiteouts (`.wh.NAME`, `.wh..wh..opq`) hide what lower
  layers put there, never what their own layer adds;
- hard links and symlinks whose target lies under `/data/` are written as copies of the target
  (so the directory never holds a link); a layer's links are copied once the whole layer is
  unpacked, so a link may name a file that comes later in its layer, and a later layer that
  replaces the target does not change the copy;
- members outside `/data/` are skipped, but an absolute or `..` member name anywhere refuses the
  whole image, as do links leading outside `/data/` and devices or fifos under it;
- files are written 0644 (directories with the default mode); owners, modes and times in the
  layers are not applied.

Each file is written to a temporary name beside it and renamed, so a refused image never leaves a
partial file under a final name; files unpacked before the refusal do remain. Callers unpack into
a fresh staging directory and rename it into place only when this returns.

Decompression bombs are stopped by `max_member_bytes` (checked from the tar header before anything
of the member is written) and `max_total_bytes` (everything written, link copies included).
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tarfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import zstandard

from tuner.errors import UserError
from tuner.workdir import atomic_output

# Adapters are MBs to a few GB; these are far above any real adapter and only stop bombs.
DEFAULT_MAX_MEMBER_BYTES = 64 << 30
DEFAULT_MAX_TOTAL_BYTES = 256 << 30

# Layer media type -> compression (None: a plain tar).
LAYER_MEDIA_TYPES: dict[str, str | None] = {
    "application/vnd.oci.image.layer.v1.tar": None,
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": None,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar": None,
}

_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_MAX_LINK_DEPTH = 40  # like Linux's limit on symlinks followed while resolving one path
_MAX_HEADER_BYTES = 1 << 20  # pax and GNU long-name headers, which tarfile reads into memory
_COPY_CHUNK = 1 << 20
# zstd's highest ratio is ~32768:1 (a 4-byte RLE block), so one 4 KiB input chunk decompresses to
# at most 128 MiB; measured as fast as zstandard's own stream_reader on incompressible data.
_ZSTD_INPUT_CHUNK = 4096
_CORRUPT = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError)
_REFUSED_FIX = "the image is refused as unsafe; rebuild it with docker, buildah or tuner"
_TOO_BIG_FIX = "adapter files are at most a few GB; check that the reference names an adapter image"

Rel = tuple[str, ...]  # a path below the root directory, as its components


class _BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo refusing partial headers (tarfile takes them for the end of the archive) and pax and
    GNU long-name headers over _MAX_HEADER_BYTES (tarfile reads them whole)."""

    @classmethod
    def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:
        if 0 < len(buf) < tarfile.BLOCKSIZE:
            raise tarfile.SubsequentHeaderError("the data ends inside a tar header")
        return super().frombuf(buf, encoding, errors)

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        extended = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                    tarfile.SOLARIS_XHDTYPE)
        if self.type in extended and self.size > _MAX_HEADER_BYTES:
            raise tarfile.SubsequentHeaderError(f"{self.size:,}-byte extended header (limit {_MAX_HEADER_BYTES:,})")
        return super()._proc_member(tar)


class _ZstdFrames(io.RawIOBase):
    """The decompressed concatenation of the zstd frames in `raw`; ZstdError if it ends inside a frame.

    zstandard's stream_reader returns a truncated frame's output without complaint, hence this.
    """

    def __init__(self, raw: io.BufferedReader):
        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._frame: zstandard.ZstdDecompressionObj | None = None  # None between frames
        self._input = b""  # compressed bytes not yet decompressed
        self._output = b""
        self._offset = 0  # into _output

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while self._offset == len(self._output):
            chunk, self._input = self._input or self._raw.read(_ZSTD_INPUT_CHUNK), b""
            if not chunk:
                if self._frame is not None:
                    raise zstandard.ZstdError("the data ends inside a zstd frame")
                return 0
            if self._frame is None:
                self._frame = self._dctx.decompressobj()
            self._output, self._offset = self._frame.decompress(chunk), 0
            if self._frame.eof:
                self._input, self._frame = self._frame.unused_data, None
        n = min(len(buffer), len(self._output) - self._offset)
        buffer[:n] = self._output[self._offset:self._offset + n]
        self._offset += n
        return n


def _decompressed(raw: io.BufferedReader, compression: str | None) -> io.BufferedIOBase | io.RawIOBase:
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw)
    if compression == "zstd":
        return _ZstdFrames(raw)
    return raw


@dataclass(frozen=True)
class _Link:
    """A hard link or symlink under the root, to be copied once its layer is unpacked."""

    member: str  # the member's name, for messages
    kind: str  # "symlink" or "hard link"
    linkname: str
    target: Rel


def _normalise(base: Rel, linkname: str) -> tuple[str, ...]:
    """The image path linkname names from directory base; `..` stops at `/`, as inside a container."""
    parts = list(base)
    for part in linkname.split("/"):
        if part == "..":
            if parts:
                parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return tuple(parts)


class _Unpacker:
    """The merged root directory of the layers unpacked so far, kept as real files in dest."""

    def __init__(self, dest: Path, root: Rel, max_member_bytes: int, max_total_bytes: int):
        self.dest = dest
        self.real_dest = dest.resolve()
        self.root = root
        self.root_name = "/" + "/".join(root) + "/"
        self.max_member_bytes = max_member_bytes
        self.max_total_bytes = max_total_bytes
        self.total = 0
        self.layer = ""  # the blob's file name (its digest hex), for messages
        self.this_layer: set[Rel] = set()  # paths the current layer put in place, with their parents
        self.links: dict[Rel, _Link] = {}  # the current layer's links, copied at its end

    def unpack(self, blob: Path, media_type: str) -> None:
        """Apply one layer on top of what dest holds."""
        self.layer, self.this_layer, self.links = blob.name, set(), {}
        compression = LAYER_MEDIA_TYPES[media_type]
        try:
            with blob.open("rb") as raw:
                stream = _decompressed(raw, compression)
                with tarfile.open(fileobj=stream, mode="r|", tarinfo=_BoundedTarInfo) as tar:
                    while (member := tar.next()) is not None:
                        tar.members.clear()  # stream mode would keep every header: layers can hold millions
                        self._member(tar, member)
                while stream.read(_COPY_CHUNK):  # decompress to the end, so a damaged end is noticed
                    pass
        except _CORRUPT as e:
            kind = f"{compression}-compressed tar" if compression else "tar"
            raise UserError(
                f"layer {self.layer} is not a valid {kind} ({media_type}): {e}",
                fix="the image holds a damaged layer; rebuild and push it again",
            ) from e
        while self.links:
            self._copy_link(next(iter(self.links)), [])

    def _error(self, member: str, problem: str, fix: str | None = None) -> UserError:
        return UserError(f"member {member!r} {problem}", where=f"layer {self.layer}", fix=fix)

    def _member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = member.name
        if name.startswith("/"):
            raise self._error(name, "is an absolute path", fix=_REFUSED_FIX)
        if ".." in name.split("/"):
            raise self._error(name, "has a '..' component", fix=_REFUSED_FIX)
        parts = tuple(p for p in name.split("/") if p not in ("", "."))
        if parts and parts[-1].startswith(_WHITEOUT):
            self._whiteout(name, parts)
            return
        if parts[:len(self.root)] != self.root:
            return
        rel = parts[len(self.root):]
        if not rel:
            if not member.isdir():
                raise self._error(name, f"makes {self.root_name} something other than a directory")
            return
        for i in range(1, len(rel)):
            if rel[:i] in self.links:
                raise self._error(name, f"lies under {self.links[rel[:i]].member!r}, a link in the same layer")
        self.links.pop(rel, None)  # a later entry for the same path wins
        self._mark(rel)
        if member.isdir():
            self._path(name, rel)
            self._make_dirs(rel)
        elif member.isreg():
            self._charge(name, member.size)
            source = tar.extractfile(member)
            assert source is not None  # a regular file
            self._write(name, rel, source)
        elif member.issym() or member.islnk():
            self.links[rel] = self._link(member, parts)
        else:
            raise self._error(
                name, f"is a device, fifo or other special file under {self.root_name}",
                fix=f"put only regular files, directories and links under {self.root_name}",
            )

    def _whiteout(self, name: str, parts: Rel) -> None:
        """Hide what lower layers hold at the path a whiteout names (or in the directory it marks opaque)."""
        opaque = parts[-1] == _OPAQUE
        hidden = parts[-1][len(_WHITEOUT):]
        if not opaque and hidden.startswith(_WHITEOUT):
            return  # aufs metadata such as .wh..wh.plnk, not a whiteout
        if hidden in ("", ".", ".."):
            raise self._error(name, "is a whiteout of no valid name", fix=_REFUSED_FIX)
        target = parts[:-1] if opaque else parts[:-1] + (hidden,)
        if self.root[:len(target)] == target:  # the root or one of its parents: hides everything below root
            rel: Rel = ()
        elif target[:len(self.root)] == self.root:
            rel = target[len(self.root):]
        else:
            return
        if opaque:
            self._mark(rel)
        self._remove_lower(name, rel)

    def _mark(self, rel: Rel) -> None:
        self.this_layer.update(rel[:i] for i in range(len(rel) + 1))

    def _path(self, member: str, rel: Rel) -> Path:
        """dest/rel, refused if a symlink already in dest would take it outside dest."""
        path = self.dest.joinpath(*rel)
        if not path.resolve().is_relative_to(self.real_dest):
            raise self._error(
                member, f"would reach outside {self.dest} through a symlink already there",
                fix="unpack into a new empty directory",
            )
        return path

    def _make_dirs(self, rel: Rel) -> None:
        """Make dest/rel and its parents directories, replacing files a lower layer had there."""
        for i in range(1, len(rel) + 1):
            path = self.dest.joinpath(*rel[:i])
            if not path.is_dir():
                if os.path.lexists(path):
                    path.unlink()
                path.mkdir()

    def _remove(self, member: str, rel: Rel) -> None:
        path = self._path(member, rel)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()

    def _remove_lower(self, member: str, rel: Rel) -> None:
        """Remove what lower layers put at rel, keeping what the current layer put there."""
        if rel and rel not in self.this_layer:
            self._remove(member, rel)
            return
        path = self._path(member, rel)
        if path.is_dir():
            for child in sorted(os.listdir(path)):
                self._remove_lower(member, rel + (child,))

    def _charge(self, member: str, size: int) -> None:
        """Count size bytes about to be written, refusing a file or a total over the limits."""
        if size > self.max_member_bytes:
            raise self._error(
                member, f"is {size:,} bytes, over the limit of {self.max_member_bytes:,} bytes per file", fix=_TOO_BIG_FIX,
            )
        if self.total + size > self.max_total_bytes:
            raise self._error(
                member, f"would bring the files unpacked from {self.root_name} to {self.total + size:,} bytes, "
                f"over the limit of {self.max_total_bytes:,} bytes", fix=_TOO_BIG_FIX,
            )
        self.total += size

    def _write(self, member: str, rel: Rel, source: IO[bytes]) -> None:
        """Write source to dest/rel through a temporary file renamed into place."""
        path = self._path(member, rel)
        self._make_dirs(rel[:-1])
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)  # a file replaces a lower layer's directory
        with atomic_output(path, durable=False) as f:  # the pull renames the whole folder once complete
            os.fchmod(f.fileno(), 0o644)
            shutil.copyfileobj(source, f, _COPY_CHUNK)

    def _link(self, member: tarfile.TarInfo, parts: Rel) -> _Link:
        """The link member at image path parts, refused if its target is outside the root."""
        kind = "symlink" if member.issym() else "hard link"
        # A symlink's relative target starts from its directory; a hard link names an archive path.
        base = parts[:-1] if member.issym() and not member.linkname.startswith("/") else ()
        target = _normalise(base, member.linkname)
        if target[:len(self.root)] != self.root:
            raise self._error(
                member.name, f"is a {kind} leading outside {self.root_name} ({member.linkname!r})",
                fix=f"copy the file itself into {self.root_name} instead of linking to it",
            )
        return _Link(member.name, kind, member.linkname, target[len(self.root):])

    def _copy_link(self, rel: Rel, chain: list[Rel]) -> None:
        """Replace the link at rel by a copy of its target, first copying the links inside a target directory."""
        link = self.links[rel]
        chain.append(rel)
        source = link.target
        # Follow the layer's other links on the way, as a path lookup would (they are not copied yet).
        for _ in range(_MAX_LINK_DEPTH):
            via = next((source[:i] for i in range(1, len(source) + 1) if source[:i] in self.links), None)
            if via is None:
                break
            source = self.links[via].target + source[len(via):]
        if via is not None or len(chain) > _MAX_LINK_DEPTH or rel[:len(source)] == source:
            raise self._error(
                link.member, f"is a {link.kind} ({link.linkname!r}) that loops or goes through "
                f"more than {_MAX_LINK_DEPTH} links",
            )
        if self._path(link.member, source).is_dir():
            for other in [r for r in self.links if r[:len(source)] == source]:
                if other in self.links:
                    self._copy_link(other, chain)
        self._remove(link.member, rel)
        self._copy(link, source, rel)
        del self.links[rel]
        chain.pop()

    def _copy(self, link: _Link, source: Rel, rel: Rel) -> None:
        path = self._path(link.member, source)
        if path.is_dir():
            self._path(link.member, rel)
            self._make_dirs(rel)
            for child in sorted(os.listdir(path)):
                self._copy(link, source + (child,), rel + (child,))
        elif path.is_file():
            self._charge(link.member, path.stat().st_size)
            with path.open("rb") as f:
                self._write(link.member, rel, f)
        else:
            raise self._error(link.member, f"is a {link.kind} to {link.linkname!r}, which is not in the image")


def unpack_data_dir(
    layers: Sequence[tuple[Path, str]],
    dest: Path,
    *,
    root: str = "data",
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
) -> list[Path]:
    """Unpack the files under `/<root>/` of an image into dest; returns the regular files in dest, sorted.

    `layers` are (blob file, layer media type) in manifest order, lowest first; blob file names are
    the layers' digest hex (they name the layer in messages). Raises UserError for an unknown media
    type, a damaged layer, an unsafe member, or a file or total over the limits; dest may then
    hold some files, so unpack into a fresh staging directory and rename it on success.
    """
    for blob, media_type in layers:
        if media_type not in LAYER_MEDIA_TYPES:
            raise UserError(
                f"layer {blob.name} has media type {media_type!r}, which is not a tar layer tuner can unpack",
                fix="push the image with OCI or Docker tar, tar+gzip or tar+zstd layers (docker, buildah, tuner do)",
            )
    root_parts = tuple(p for p in root.split("/") if p not in ("", "."))
    if not root_parts or ".." in root_parts:
        raise ValueError(f"root must name a directory below /, not {root!r}")
    dest.mkdir(parents=True, exist_ok=True)
    unpacker = _Unpacker(dest, root_parts, max_member_bytes, max_total_bytes)
    for blob, media_type in layers:
        unpacker.unpack(blob, media_type)
    return sorted(p for p in dest.rglob("*") if p.is_file() and not p.is_symlink())
