"""Deliver a finished adapter: its files copied to an output volume, or an image with labels from its
training summary, written as an OCI layout in the work directory (the copy that is never lost) and
pushed to a registry when asked."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tuner import __version__
from tuner.errors import UserError
from tuner.observe import events
from tuner.observe.summary import JobSummary, PublishedImage
from tuner.oci.image import write_image
from tuner.oci.registry import PushResult, push_layout
from tuner.spec.targets import OciLayoutTarget, RegistryOptions, RegistryTarget, parse_output_ref
from tuner.workdir import SUMMARY_FILE, WorkDir


@dataclass(frozen=True)
class Published:
    digest: str
    layout: OciLayoutTarget
    push: PushResult | None


def image_annotations(adapter_dir: Path, version: str | None) -> dict[str, str]:
    """OCI, Kaito and tuner provenance annotations for the adapter, from its training summary.

    A folder without tuner's summary (e.g. a Kaito adapter) still gets the standard ones, dated by
    its weights file, so the same folder always gives the same image.
    """
    weights = adapter_dir / "adapter_model.safetensors"
    summary = JobSummary.read(adapter_dir / SUMMARY_FILE)
    if summary is None:
        return {key: value for key, value in {
            "org.opencontainers.image.created": datetime.fromtimestamp(
                int(weights.stat().st_mtime), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "org.opencontainers.image.title": f"{adapter_dir.resolve().name} adapter",
            "org.opencontainers.image.description": "LoRA adapter",
            "org.opencontainers.image.version": version,
            "dev.tuner.version": __version__,
        }.items() if value}
    base = summary.base_model
    annotations = {
        "org.opencontainers.image.created": summary.finished,
        "org.opencontainers.image.title": f"{summary.workspace} adapter",
        "org.opencontainers.image.description": f"{summary.method} adapter for {summary.preset} ({base.hub_id})",
        "org.opencontainers.image.version": version,
        "sh.kaito.model.name": summary.preset,
        "dev.tuner.version": summary.tuner_version,
        "dev.tuner.base-model": base.hub_id,
        "dev.tuner.base-model.revision": base.revision or base.gguf,
        "dev.tuner.method": summary.method,
        "dev.tuner.datasets": ",".join(f"sha256:{d.sha256}" for d in summary.datasets) or None,
        "dev.tuner.config-digest": summary.config_digest,
        "dev.tuner.train-loss": _loss(summary.train.train_loss),
        "dev.tuner.eval-loss": _loss(summary.eval.adapter_loss),
    }
    return {key: value for key, value in annotations.items() if value}


def _loss(value: float | None) -> str | None:
    return None if value is None else f"{value:.4f}"


def adapter_dir_of(work_dir: Path) -> Path:
    """A work directory's adapter folder, or work_dir itself when it is an adapter folder."""
    nested = WorkDir(work_dir).adapter
    if nested.is_dir():
        return nested
    if (work_dir / "adapter_config.json").is_file():
        return work_dir
    raise UserError(f"{work_dir} holds no adapter ({nested.name}/ or adapter_config.json)",
                    fix="pass the work directory of a finished `tuner run`, or an adapter folder")


def package(adapter_dir: Path, layout: OciLayoutTarget) -> str:
    """Write the adapter image into an OCI layout, tagged layout.tag; return its digest."""
    annotations = image_annotations(adapter_dir, layout.tag if layout.tag != "latest" else None)
    return write_image(adapter_dir, layout, labels=annotations, annotations=annotations,
                       created=annotations["org.opencontainers.image.created"])


def package_merged(model_dir: Path, adapter_dir: Path, dtype: str, layout: OciLayoutTarget) -> str:
    """Write the merged model's image (its files under /data, as the adapter image's) into an OCI layout,
    tagged layout.tag, with the adapter's provenance; return its digest."""
    annotations = image_annotations(adapter_dir, layout.tag if layout.tag != "latest" else None)
    summary = JobSummary.read(adapter_dir / SUMMARY_FILE)
    annotations["org.opencontainers.image.title"] = (f"{summary.workspace} merged model" if summary else
                                                     f"{adapter_dir.resolve().name} merged model")
    annotations["org.opencontainers.image.description"] = (
        f"{summary.preset} ({summary.base_model.hub_id}) with its {summary.method} adapter merged, {dtype}"
        if summary else f"base model with a LoRA adapter merged, {dtype}")
    annotations["dev.tuner.merged-dtype"] = dtype
    return write_image(model_dir, layout, labels=annotations, annotations=annotations,
                       created=annotations["org.opencontainers.image.created"], required=("config.json",))


def publish(work_dir: Path, reference: str, options: RegistryOptions) -> Published:
    """Package work_dir's adapter and push it to `reference` (a registry, or oci:DIR[:TAG]).

    For a registry, the image is first written to work_dir/image so a failed push loses nothing
    and `tuner push` can be re-run alone.
    """
    adapter_dir = adapter_dir_of(work_dir)
    # a bare adapter folder: keep the layout out of it
    layout_dir = None if adapter_dir == work_dir else WorkDir(work_dir).image
    return _publish(lambda layout: package(adapter_dir, layout), reference, options, layout_dir,
                    f"the adapter is safe in {adapter_dir}; fix the cause and re-run only the push: "
                    f"tuner push {work_dir} {reference}")


def publish_merged(model_dir: Path, adapter_dir: Path, dtype: str, reference: str, options: RegistryOptions,
                   layout_dir: Path) -> Published:
    """Package the merged model folder and push it to `reference`, through the OCI layout `layout_dir`."""
    return _publish(lambda layout: package_merged(model_dir, adapter_dir, dtype, layout), reference, options,
                    layout_dir, f"the merged model is safe in {model_dir}; fix the cause and re-run the job "
                                "(it reuses the adapter and the merged model, and only pushes)")


def _publish(pack: Callable[[OciLayoutTarget], str], reference: str, options: RegistryOptions,
             layout_dir: Path | None, fix: str) -> Published:
    """`pack` the image into an OCI layout and push it: `reference` oci:DIR[:TAG] is that layout;
    for a registry the layout is `layout_dir` (None: a temporary folder)."""
    target = parse_output_ref(reference)
    if isinstance(target, OciLayoutTarget):
        digest = pack(target)
        events.emit("push.done", f"output: {reference}@{digest} (an OCI image layout)",
                    data={"reference": reference, "digest": digest, "uploaded_bytes": 0})
        return Published(digest, target, None)
    assert isinstance(target, RegistryTarget)
    tag = reference.rsplit("/", 1)[-1].partition("@")[0].partition(":")[2] or "latest"
    with contextlib.ExitStack() as cleanup:
        if layout_dir is None:
            layout_dir = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="tuner-image-")))
        layout = OciLayoutTarget(layout_dir, tag)
        digest = pack(layout)
        events.info(f"push: {reference} (image {digest})")
        try:
            result = push_layout(layout, reference, options)
        except UserError as e:
            raise UserError(f"push failed: {e}", fix=fix) from None
    events.emit("push.done", f"push: done: {reference}@{result.digest}, {result.uploaded_bytes / 1e6:,.1f} MB "
                             f"uploaded, {result.skipped_blobs} blob(s) already there",
                data={"reference": reference, "digest": result.digest, "uploaded_bytes": result.uploaded_bytes})
    return Published(result.digest, layout, result)


def deliver(output: OciLayoutTarget | RegistryTarget | Path, work: WorkDir,
            registry: RegistryOptions) -> PublishedImage | None:
    """The finished adapter to the job's output: its files copied into an output volume (None), or
    published as an image (where it went)."""
    if isinstance(output, Path):
        output.mkdir(parents=True, exist_ok=True)
        for path in sorted(work.adapter.iterdir()):
            if path.is_file():
                shutil.copy2(path, output / path.name)
        if work.runs.is_dir():  # TensorBoard's event files (report_to: tensorboard), beside the adapter
            shutil.copytree(work.runs, output / work.runs.name, dirs_exist_ok=True)
        events.info(f"output: adapter files copied to {output}")
        return None
    reference = output.reference if isinstance(output, RegistryTarget) else f"oci:{output.path}:{output.tag}"
    return PublishedImage(reference=reference, digest=publish(work.root, reference, registry).digest)


def deliver_merged(output: OciLayoutTarget | RegistryTarget, work: WorkDir, dtype: str,
                   registry: RegistryOptions) -> PublishedImage:
    """The merged model in WORK/merged published as the job's second image (`tuner run --merged-image`)."""
    reference = output.reference if isinstance(output, RegistryTarget) else f"oci:{output.path}:{output.tag}"
    published = publish_merged(work.merged, work.adapter, dtype, reference, registry, work.merged_image)
    return PublishedImage(reference=reference, digest=published.digest)
