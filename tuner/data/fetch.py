"""The fetch stage: `tuning.input` as local files in WORK/inputs (URLs downloaded by
tuner.data.download, an image's /data pulled, a volume's files listed), and the marker a later
`tuner run --skip-fetch` reads them back from."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tuner.data.download import InputFile, download, sha256_file
from tuner.data.readers import dataset_files
from tuner.errors import UserError
from tuner.observe import events
from tuner.spec.targets import RegistryOptions
from tuner.spec.workspace import DataSource, local_host_path
from tuner.workdir import WorkDir, atomic_write_json


def fetch_inputs(source: DataSource, dest: Path, *, base_dir: Path, allow_private_urls: bool = False,
                 registry: RegistryOptions | None = None) -> list[InputFile]:
    """Resolve `tuning.input` to local files: download URLs or an image's /data into `dest`, or
    list a volume's files."""
    if source.urls:
        dest.mkdir(parents=True, exist_ok=True)
        return [download(url, dest, index, allow_private_urls) for index, url in enumerate(source.urls)]
    if source.volume_source:
        return _volume_files(source.volume_source, base_dir)
    return _image_files(source.image or "", dest / "image", registry or RegistryOptions())


def _image_files(reference: str, dest: Path, registry: RegistryOptions) -> list[InputFile]:
    """Pull a dataset image's /data (again only if an earlier pull did not finish)."""
    from tuner.oci.pull import pull_image

    if not dest.is_dir():
        try:
            pulled = pull_image(reference, dest, registry, required=())
        except UserError as exc:
            raise UserError(str(exc), where="tuning.input.image") from None
        events.info(f"fetch: {reference} @ {pulled.digest}: {len(pulled.files)} files")
    try:
        files = dataset_files([dest])
    except UserError as exc:
        raise UserError(str(exc), where="tuning.input.image") from None
    return [InputFile(p, f"{reference}:/data/{p.relative_to(dest).as_posix()}", sha256_file(p), p.stat().st_size)
            for p in files]


def _volume_files(volume: dict, base_dir: Path) -> list[InputFile]:
    root = local_host_path(volume, base_dir, "tuning.input.volumeSource")
    try:
        files = dataset_files([root])
    except UserError as exc:
        raise UserError(str(exc), where="tuning.input.volumeSource.hostPath.path") from None
    return [InputFile(p, str(p), sha256_file(p), p.stat().st_size) for p in files]


def fetch_into(work: WorkDir, source: DataSource, *, base_dir: Path, allow_private_urls: bool = False,
               registry: RegistryOptions | None = None) -> list[InputFile]:
    """Fetch the inputs into WORK/inputs, then write the marker that `run --skip-fetch` reads."""
    inputs = fetch_inputs(source, work.inputs, base_dir=base_dir, allow_private_urls=allow_private_urls,
                          registry=registry)
    work.inputs.mkdir(parents=True, exist_ok=True)  # a volume input downloads nothing
    files = [{"path": str(_relative_to(f.path, work.inputs)), "source": f.source, "sha256": f.sha256, "size": f.size}
             for f in inputs]
    atomic_write_json(work.fetched_marker, {"input": _input_digest(source), "files": files})
    return inputs


def fetched_inputs(work: WorkDir, source: DataSource) -> list[InputFile]:
    """The inputs a `tuner fetch` of this tuning.input left in WORK/inputs, checked to be still there."""
    marker = work.fetched_marker
    fix = "run `tuner fetch WORKSPACE --work-dir WORK` first, with the same workspace and work dir"
    if not marker.is_file():
        raise UserError(f"the inputs were not fetched ({marker} is missing)", where="--skip-fetch", fix=fix)
    record = json.loads(marker.read_text())
    if record["input"] != _input_digest(source):
        raise UserError(f"{marker} lists the inputs of a different tuning.input", where="--skip-fetch", fix=fix)
    inputs = [InputFile(work.inputs / f["path"], f["source"], f["sha256"], f["size"]) for f in record["files"]]
    for f in inputs:
        if not f.path.is_file() or f.path.stat().st_size != f.size:
            raise UserError(f"{f.path} is missing or changed since it was fetched", where="--skip-fetch", fix=fix)
    events.info(f"fetch: {len(inputs)} input files fetched earlier ({marker})")
    return inputs


def _input_digest(source: DataSource) -> str:
    return "sha256:" + hashlib.sha256(source.model_dump_json(by_alias=True).encode()).hexdigest()


def _relative_to(path: Path, folder: Path) -> Path:
    """`path` relative to `folder` when inside it (the work dir may be mounted elsewhere later), else as is."""
    return path.relative_to(folder) if path.is_relative_to(folder) else path
