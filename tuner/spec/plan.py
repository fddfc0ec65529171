"""The job plan: everything decided before any download or GPU time, so a bad spec fails cheaply.

`tuner validate`, `render`, `submit` and `run` all start here; the orchestrator (tuner.job) and
the renderer (tuner.kube.render) read the plan and never each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tuner.errors import UserError, quote
from tuner.spec.credentials import docker_config_file, load_credentials, registry_key
from tuner.spec.hub_models import resolve_preset
from tuner.spec.presets import Preset
from tuner.spec.targets import OciLayoutTarget, RegistryOptions, RegistryTarget, parse_output_ref
from tuner.spec.training_config import TrainingConfig, build_config, load_config_file
from tuner.spec.workspace import Workspace, image_notes, load_workspace, local_host_path, normalisation_note
from tuner.workdir import WorkDir

DEFAULT_MAX_LENGTH = 1024  # TRL's SFTConfig default, capped by the preset's context length
CLUSTER_OUTPUT_DIR = "/mnt/output"  # where the Job mounts tuning.output.volumeSource


@dataclass(frozen=True)
class JobPlan:
    """Everything decided before any download or GPU time: a bad spec fails here, cheaply."""

    workspace: Workspace
    workspace_path: Path
    preset: Preset
    config: TrainingConfig
    output: OciLayoutTarget | RegistryTarget | Path  # an OCI layout, a registry image, or a hostPath volume
    work: WorkDir
    allow_private_urls: bool
    registry: RegistryOptions
    notes: tuple[str, ...] = ()  # what the plan decided that the user should read once (normalised images)
    warnings: tuple[str, ...] = ()  # keys accepted but not applied, an anonymous push
    merged_output: OciLayoutTarget | RegistryTarget | None = None  # --merged-image: the merged model's image

    @property
    def max_length(self) -> int:
        return effective_max_length(self.config, self.preset)


def effective_max_length(config: TrainingConfig, preset: Preset) -> int:
    """TrainingArguments.max_length, else TRL's default capped by the preset's context length."""
    return config.training_arguments.max_length or min(DEFAULT_MAX_LENGTH, preset.context_length)


def plan_job(workspace_path: Path, *, config_path: Path | None = None, work_dir: Path | None = None,
             output: str | None = None, allow_private_urls: bool = False,
             registry: RegistryOptions | None = None, for_cluster: bool = False,
             merged_image: str | None = None) -> JobPlan:
    """Validate the Workspace, training config, output target and push credentials without doing any work.

    `for_cluster` plans for `tuner render`: volumes and the push secret are the cluster's, not this machine's.
    `merged_image`: also push the base model with the adapter merged to this reference (--merged-image).
    """
    workspace = load_workspace(workspace_path, allow_private_urls=allow_private_urls)
    tuning = workspace.tuning
    if config_path is None and tuning.config:
        raise UserError(f"tuning.config names the ConfigMap {quote(tuning.config)}, which a local run cannot read",
                        where=str(workspace_path), fix="pass its manifest with --config CONFIGMAP.yaml")
    config = build_config(tuning.method, load_config_file(config_path) if config_path else None)
    preset = resolve_preset(tuning.preset.name, config.model)
    notes = image_notes(workspace, ("input",) if output else ("input", "output"))
    if output or tuning.output.image:
        try:
            target = parse_output_ref(output or tuning.output.image)
        except UserError as exc:
            raise UserError(str(exc), where="--output" if output else "tuning.output.image") from None
        if output and isinstance(target, RegistryTarget) and (note := normalisation_note("--output", output)):
            notes.append(note)
    elif for_cluster:
        target = Path(CLUSTER_OUTPUT_DIR)
    else:
        target = local_host_path(tuning.output.volume_source, workspace_path.parent, "tuning.output.volumeSource")
    registry = registry or RegistryOptions()
    warnings = list(config.warnings)
    if isinstance(target, RegistryTarget) and not for_cluster and (
            anonymous := check_push_credentials(target, registry.config_file)):
        warnings.append(anonymous)
    merged = (merged_target(merged_image, target, workspace, registry, for_cluster, notes, warnings)
              if merged_image is not None else None)
    return JobPlan(workspace, workspace_path, preset, config, target, WorkDir(work_dir or default_work_dir(workspace)),
                   allow_private_urls, registry, tuple(notes), tuple(warnings), merged)


def merged_target(reference: str, output: OciLayoutTarget | RegistryTarget | Path, workspace: Workspace,
                  registry: RegistryOptions, for_cluster: bool, notes: list[str],
                  warnings: list[str]) -> OciLayoutTarget | RegistryTarget:
    """--merged-image REF, parsed and checked once (its notes and warnings appended): not the adapter's own
    image, a registry image for a Job (an OCI layout would stay in the pod), its push credentials readable."""
    try:
        target = parse_output_ref(reference)
    except UserError as exc:
        raise UserError(str(exc), where="--merged-image") from None
    if target == output:
        raise UserError(f"{quote(reference)} is also where the adapter image goes", where="--merged-image",
                        fix="give the merged model an image of its own (another repository or tag)")
    if isinstance(target, OciLayoutTarget):
        if for_cluster:
            raise UserError(f"{quote(reference)} is an OCI layout, which would stay inside the Job's pod",
                            where="--merged-image", fix="name a registry image: REGISTRY/REPOSITORY:TAG")
        return target
    if note := normalisation_note("--merged-image", reference):
        notes.append(note)
    if for_cluster:
        if not workspace.tuning.output.image_push_secret:
            warnings.append("--merged-image: the push will be anonymous: the Job pushes with "
                            "tuning.output.imagePushSecret, and the Workspace sets none")
    elif (anonymous := check_push_credentials(target, registry.config_file)) and anonymous not in warnings:
        warnings.append(anonymous)
    return target


def check_push_credentials(target: RegistryTarget, config_file: Path | None) -> str | None:
    """Read the push credentials now: a malformed secret is a UserError before any download or GPU time;
    none at all is the warning returned (the push will be anonymous)."""
    host = registry_key(target.reference)
    found = docker_config_file(config_file)
    if load_credentials(host, found) is not None:
        return None
    return (f"no credentials for {host} in {found or 'DOCKER_CONFIG or ~/.docker/config.json'}: "
            "the push will be anonymous (set tuning.output.imagePushSecret)")


def default_work_dir(workspace: Workspace) -> Path:
    return Path("tuner-work") / workspace.metadata.name
