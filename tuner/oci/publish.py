"""Turn a finished adapter into an image: labels from its training summary, an OCI layout in the
work directory (the copy that is never lost), and a push to a registry when asked."""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tuner import __version__
from tuner.errors import UserError
from tuner.observe import events
from tuner.oci.image import build_adapter_image, write_oci_layout
from tuner.oci.registry import PushResult, push_layout
from tuner.spec.targets import OciLayoutTarget, RegistryOptions, RegistryTarget, parse_output_ref

SUMMARY_FILE = "training_summary.json"
ADAPTER_DIR = "adapter"
IMAGE_DIR = "image"  # the OCI layout a registry push is copied from


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
    summary_path = adapter_dir / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    weights = adapter_dir / "adapter_model.safetensors"
    created = summary.get("finished") or datetime.fromtimestamp(
        int(weights.stat().st_mtime), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    base = summary.get("base_model") or {}
    train, evaluation = summary.get("train") or {}, summary.get("eval") or {}
    method, preset = summary.get("method"), summary.get("preset")
    annotations = {
        "org.opencontainers.image.created": created,
        "org.opencontainers.image.title": f"{summary.get('workspace') or adapter_dir.resolve().name} adapter",
        "org.opencontainers.image.description": (f"{method} adapter for {preset} ({base.get('hub_id')})"
                                                 if method else "LoRA adapter"),
        "org.opencontainers.image.version": version,
        "sh.kaito.model.name": preset,
        "dev.tuner.version": summary.get("tuner_version", __version__),
        "dev.tuner.base-model": base.get("hub_id"),
        "dev.tuner.base-model.revision": base.get("revision") or base.get("gguf"),
        "dev.tuner.method": method,
        "dev.tuner.datasets": ",".join(f"sha256:{d['sha256']}" for d in summary.get("datasets", [])) or None,
        "dev.tuner.config-digest": summary.get("config_digest"),
        "dev.tuner.train-loss": _loss(train.get("train_loss")),
        "dev.tuner.eval-loss": _loss(evaluation.get("adapter_loss")),  # tuner.summary.build writes it there
    }
    return {key: value for key, value in annotations.items() if value}


def _loss(value: float | None) -> str | None:
    return None if value is None else f"{value:.4f}"


def adapter_dir_of(work_dir: Path) -> Path:
    """A work directory's adapter folder, or work_dir itself when it is an adapter folder."""
    nested = work_dir / ADAPTER_DIR
    if nested.is_dir():
        return nested
    if (work_dir / "adapter_config.json").is_file():
        return work_dir
    raise UserError(f"{work_dir} holds no adapter ({ADAPTER_DIR}/ or adapter_config.json)",
                    fix="pass the work directory of a finished `tuner run`, or an adapter folder")


def package(adapter_dir: Path, layout: OciLayoutTarget) -> str:
    """Write the adapter image into an OCI layout, tagged layout.tag; return its digest."""
    annotations = image_annotations(adapter_dir, layout.tag if layout.tag != "latest" else None)
    image = build_adapter_image(adapter_dir, labels=annotations, annotations=annotations,
                                created=annotations["org.opencontainers.image.created"])
    return write_oci_layout(image, layout)


def publish(work_dir: Path, reference: str, options: RegistryOptions) -> Published:
    """Package work_dir's adapter and push it to `reference` (a registry, or oci:DIR[:TAG]).

    For a registry, the image is first written to work_dir/image so a failed push loses nothing
    and `tuner push` can be re-run alone.
    """
    adapter_dir = adapter_dir_of(work_dir)
    target = parse_output_ref(reference)
    if isinstance(target, OciLayoutTarget):
        digest = package(adapter_dir, target)
        events.emit("push.done", f"output: {reference}@{digest} (an OCI image layout)",
                    data={"reference": reference, "digest": digest, "uploaded_bytes": 0})
        return Published(digest, target, None)
    assert isinstance(target, RegistryTarget)
    tag = reference.rsplit("/", 1)[-1].partition("@")[0].partition(":")[2] or "latest"
    with contextlib.ExitStack() as cleanup:
        if adapter_dir == work_dir:  # a bare adapter folder: keep the layout out of it
            layout = OciLayoutTarget(Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="tuner-image-"))), tag)
        else:
            layout = OciLayoutTarget(work_dir / IMAGE_DIR, tag)
        digest = package(adapter_dir, layout)
        events.info(f"push: {reference} (image {digest})")
        try:
            result = push_layout(layout, reference, options)
        except UserError as e:
            raise UserError(f"push failed: {e}",
                            fix=f"the adapter is safe in {adapter_dir}; fix the cause and re-run only the push: "
                                f"tuner push {work_dir} {reference}") from None
    events.emit("push.done", f"push: done: {reference}@{result.digest}, {result.uploaded_bytes / 1e6:,.1f} MB "
                             f"uploaded, {result.skipped_blobs} blob(s) already there",
                data={"reference": reference, "digest": result.digest, "uploaded_bytes": result.uploaded_bytes})
    return Published(result.digest, layout, result)
