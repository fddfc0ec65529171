"""`tuner run`: Workspace -> fetch -> prepare -> train -> adapter image, in one work directory."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from tuner import __version__, events
from tuner.errors import UserError
from tuner.fetch import InputFile, fetch_inputs
from tuner.presets import Preset, get_preset
from tuner.spec import Workspace, load_workspace, local_host_path
from tuner.training_config import TrainingConfig, build_config, load_config_file

if TYPE_CHECKING:
    from tuner.oci import OciLayoutTarget, RegistryTarget
    from tuner.registry import RegistryOptions

DEFAULT_MAX_LENGTH = 1024  # TRL's SFTConfig default, capped by the preset's context length


@dataclass(frozen=True)
class JobPlan:
    """Everything decided before any download or GPU time: a bad spec fails here, cheaply."""

    workspace: Workspace
    workspace_path: Path
    preset: Preset
    config: TrainingConfig
    output: OciLayoutTarget | RegistryTarget | Path  # an OCI layout, a registry image, or a hostPath volume
    work_dir: Path
    allow_private_urls: bool
    registry: RegistryOptions

    @property
    def max_length(self) -> int:
        return effective_max_length(self.config, self.preset)


def effective_max_length(config: TrainingConfig, preset: Preset) -> int:
    """TrainingArguments.max_length, else TRL's default capped by the preset's context length."""
    return int(config.training_arguments.get("max_length") or min(DEFAULT_MAX_LENGTH, preset.context_length))


def plan_job(workspace_path: Path, *, config_path: Path | None = None, work_dir: Path | None = None,
             output: str | None = None, allow_private_urls: bool = False,
             registry: RegistryOptions | None = None) -> JobPlan:
    """Validate the Workspace, training config, output target and push credentials without doing any work."""
    from tuner.credentials import docker_config_file, load_credentials, registry_key
    from tuner.oci import RegistryTarget, parse_output_ref
    from tuner.registry import RegistryOptions

    workspace = load_workspace(workspace_path, allow_private_urls=allow_private_urls)
    tuning = workspace.tuning
    preset = get_preset(tuning.preset.name)
    if config_path is None and tuning.config:
        raise UserError(f"tuning.config names the ConfigMap {tuning.config!r}, which a local run cannot read",
                        where=str(workspace_path), fix="pass its manifest with --config CONFIGMAP.yaml")
    config = build_config(tuning.method, load_config_file(config_path) if config_path else None)
    if output or tuning.output.image:
        try:
            target = parse_output_ref(output or tuning.output.image)
        except UserError as exc:
            raise UserError(str(exc), where="--output" if output else "tuning.output.image") from None
    else:
        target = local_host_path(tuning.output.volume_source, workspace_path.parent, "tuning.output.volumeSource")
    registry = registry or RegistryOptions()
    if isinstance(target, RegistryTarget):
        host = registry_key(target.reference)
        config_file = docker_config_file(registry.config_file)
        if load_credentials(host, config_file) is None:  # a malformed secret fails above, before any work
            events.warn(f"no credentials for {host} in {config_file or 'DOCKER_CONFIG or ~/.docker/config.json'}: "
                        "the push will be anonymous (set tuning.output.imagePushSecret)")
    return JobPlan(workspace, workspace_path, preset, config, target,
                   work_dir or Path("tuner-work") / workspace.metadata.name, allow_private_urls, registry)


def run_job(plan: JobPlan) -> dict:
    """Run every stage; return the summary that is also written next to the adapter."""
    from tuner import models, train
    from tuner.oci import RegistryTarget
    from tuner.publish import ADAPTER_DIR, SUMMARY_FILE, publish

    tuning = plan.workspace.tuning
    started = _now()
    events.info(f"tuner {__version__}: workspace {plan.workspace.metadata.name} | preset {plan.preset.name} | "
                f"method {tuning.method} | work dir {plan.work_dir}")
    stages: dict[str, float] = {}
    for key in ("dataset_path", "dataset_extension"):
        if plan.config.dataset.get(key):
            events.warn(f"DatasetConfig.{key} is not applied: tuner reads every dataset file of tuning.input")

    with _stage("fetch", stages):
        inputs = fetch_inputs(tuning.input, plan.work_dir / "inputs", base_dir=plan.workspace_path.parent,
                              allow_private_urls=plan.allow_private_urls)
    with _stage("load", stages):
        model_dir = models.resolve_base_model(plan.preset, plan.config.model.get("pretrained_model_name_or_path"))
        tokenizer = train.load_tokenizer(model_dir, plan.config)
    with _stage("prepare", stages):
        prepared = _prepare([f.path for f in inputs], tokenizer, plan.config, plan.max_length,
                            plan.work_dir / "prepared")
        for line in prepared.stats.log_lines():
            events.info(line)
    if not len(prepared.train):
        raise UserError("no training rows are left after preparation", where="tuning.input",
                        fix="check the dataset's format and the dropped-row reasons above")
    adapter_dir = plan.work_dir / ADAPTER_DIR
    with _stage("train", stages):
        result = train.train(model_dir, tokenizer, prepared, plan.config, plan.preset, plan.work_dir, adapter_dir,
                             plan.max_length)

    summary = _summary(plan, inputs, prepared.stats, result, stages, started)
    (adapter_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    result_file = plan.work_dir / "result.json"
    result_file.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    with _stage("package", stages):
        if isinstance(plan.output, Path):
            plan.output.mkdir(parents=True, exist_ok=True)
            for path in sorted(adapter_dir.iterdir()):
                if path.is_file():
                    shutil.copy2(path, plan.output / path.name)
            events.info(f"output: adapter files copied to {plan.output}")
        else:
            reference = (plan.output.reference if isinstance(plan.output, RegistryTarget)
                         else f"oci:{plan.output.path}:{plan.output.tag}")
            published = publish(plan.work_dir, reference, plan.registry)
            summary["image"] = {"reference": reference, "digest": published.digest}
    result_file.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    events.info(f"done: train loss {result.train_loss:.4f}"
                + (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else "")
                + f", {result.steps} steps, {result.tokens_per_second:,.0f} tok/s; adapter in {adapter_dir}")
    return summary


def check_data(files: list[Path], *, preset_name: str, tokenizer_dir: Path | None = None,
               config_path: Path | None = None, max_length: int | None = None) -> list[str]:
    """`tuner check-data`: prepare the files into a scratch folder and return the report lines."""
    import tempfile

    from tuner import models, train

    preset = get_preset(preset_name)
    config = build_config("lora", load_config_file(config_path) if config_path else None)
    tokenizer = train.load_tokenizer(tokenizer_dir or models.resolve_base_model(preset), config)
    length = max_length or effective_max_length(config, preset)
    with tempfile.TemporaryDirectory(prefix="tuner-check-") as scratch:
        return _prepare(files, tokenizer, config, length, Path(scratch)).stats.log_lines()


def _prepare(files: list[Path], tokenizer, config: TrainingConfig, max_length: int, out_dir: Path):
    """Run data preparation with the DatasetConfig's mapping, shuffle, split and row policies."""
    from tuner import data
    from tuner.formats import ColumnMapping

    dataset = config.dataset
    return data.prepare(
        files, tokenizer, max_length=max_length, out_dir=out_dir, mapping=ColumnMapping.from_dataset_config(dataset),
        shuffle=bool(dataset.get("shuffle_dataset", True)), seed=int(dataset.get("shuffle_seed", 42)),
        train_test_split=float(dataset.get("train_test_split", 1)),
        bad_rows=dataset.get("bad_rows", "drop"), long_rows=dataset.get("long_rows", "truncate"))


def _summary(plan: JobPlan, inputs: list[InputFile], stats, result, stages: dict[str, float], started: str) -> dict:
    source = plan.preset.source
    return {
        "tuner_version": __version__,
        "workspace": plan.workspace.metadata.name,
        "preset": plan.preset.name,
        "base_model": {"hub_id": source.hub_id, "revision": source.revision,
                       "gguf": f"{source.gguf_package}/{source.gguf_file}" if source.gguf_package else None},
        "method": plan.workspace.tuning.method,
        "config_digest": plan.config.digest(),
        "config": plan.config.as_sections(),
        "datasets": [{"source": f.source, "sha256": f.sha256, "bytes": f.size} for f in inputs],
        "data": asdict(stats),
        "max_length": plan.max_length,
        "train": {k: v for k, v in asdict(result).items() if k != "log_history"}
                 | {"tokens_per_second": round(result.tokens_per_second, 1)},
        "loss_history": [{"step": e["step"], "loss": e["loss"]} for e in result.log_history if "loss" in e],
        "stage_seconds": {k: round(v, 2) for k, v in stages.items()},
        "started": started,
        "finished": _now(),
    }


@contextmanager
def _stage(name: str, durations: dict[str, float]) -> Iterator[None]:
    """Time a stage and log its start and, when it succeeds, its duration."""
    started = time.monotonic()
    events.info(f"stage {name}: started")
    yield
    durations[name] = time.monotonic() - started
    events.info(f"stage {name}: done in {durations[name]:.1f}s")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
