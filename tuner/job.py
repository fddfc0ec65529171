"""`tuner run`: Workspace -> fetch -> prepare -> train -> adapter image, in one work directory."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from tuner import __version__
from tuner.data.fetch import InputFile, fetch_inputs
from tuner.errors import UserError
from tuner.observe import events, summary
from tuner.observe.loss_curves import EVENTS_FILE
from tuner.spec.plan import JobPlan, check_push_credentials, default_work_dir, effective_max_length
from tuner.spec.presets import get_preset
from tuner.spec.training_config import TrainingConfig, build_config, load_config_file
from tuner.spec.workspace import DataSource, image_notes, load_workspace
from tuner.train import distributed

if TYPE_CHECKING:
    from tuner.data.prepare import DataStats, PreparedData
    from tuner.spec.targets import RegistryOptions

INPUTS_DIR = "inputs"
FETCHED_MARKER = ".fetched.json"  # in INPUTS_DIR: written once every input is on disk


def fetch_job(workspace_path: Path, *, work_dir: Path | None = None, allow_private_urls: bool = False,
              registry: RegistryOptions | None = None) -> tuple[Path, list[InputFile]]:
    """`tuner fetch`: only the fetch stage, into WORK/inputs; return the marker file and the inputs."""
    from tuner.spec.targets import parse_output_ref

    workspace = load_workspace(workspace_path, allow_private_urls=allow_private_urls)
    for note in image_notes(workspace, ("input",)):
        events.info(note)
    if workspace.tuning.output.image:  # the push secret (at $DOCKER_CONFIG in the Job) is checked before any download
        check_push_credentials(parse_output_ref(workspace.tuning.output.image), None)
    work_dir = work_dir or default_work_dir(workspace)
    inputs = _fetch(workspace.tuning.input, workspace_path, work_dir, allow_private_urls, registry)
    return work_dir / INPUTS_DIR / FETCHED_MARKER, inputs


def run_job(plan: JobPlan, *, skip_fetch: bool = False, restart: bool = False) -> dict | None:
    """Run every stage; return the summary that is also written next to the adapter.

    `skip_fetch` uses the inputs `tuner fetch` left in the work directory. Training resumes from
    the latest complete checkpoint of the same job in WORK/checkpoints (`restart`: delete them and
    start over) and is skipped when WORK/adapter already holds this job's finished adapter; on
    SIGTERM it saves a checkpoint and exits with EXIT_PREEMPTED (143), writing no adapter. Under torchrun each
    node's local rank 0 fetches and prepares the data while the node's other ranks wait, every rank
    trains, and only rank 0 logs progress, writes the adapter and publishes it (the others return None).
    """
    ranks = distributed.ranks_from_env()
    if ranks.distributed and ranks.is_node_leader and not ranks.is_main:
        events.info(f"rank {ranks.rank} of {ranks.world_size} (node {ranks.node}): preparing this node's data, "
                    "then training; rank 0 logs the progress")
    timeout = timedelta(seconds=plan.config.training_arguments.ddp_timeout)
    with distributed.process_group(ranks, timeout), distributed.quiet_unless_main(ranks):
        if ranks.is_main:  # closed by the CLI once the job's last event (success or failure) is in
            # a restart starts the record anew: the loss curve in the image must not carry the old run's tail
            events.record_to(plan.work_dir / EVENTS_FILE, fresh=restart)
        return _run_stages(plan, ranks, skip_fetch, restart)


def _run_stages(plan: JobPlan, ranks: distributed.Ranks, skip_fetch: bool, restart: bool = False) -> dict | None:
    from tuner.data import prepare
    from tuner.oci.publish import ADAPTER_DIR, SUMMARY_FILE
    from tuner.train import trainer

    tuning = plan.workspace.tuning
    started = summary.now()
    devices = _devices(ranks)
    events.emit("job.started", f"tuner {__version__}: workspace {plan.workspace.metadata.name} | preset "
                               f"{plan.preset.name} | method {tuning.method} | {devices} | work dir {plan.work_dir}",
                data={"tuner_version": __version__, "workspace": plan.workspace.metadata.name,
                      "preset": plan.preset.name, "method": tuning.method, "devices": devices,
                      "world_size": ranks.world_size, "work_dir": str(plan.work_dir)})
    for note in plan.notes:
        events.info(note)
    for warning in plan.warnings:
        events.warn(warning)
    stages: dict[str, float] = {}
    for key in ("dataset_path", "dataset_extension"):
        if getattr(plan.config.dataset, key):
            events.warn(f"DatasetConfig.{key} is not applied: tuner reads every dataset file of tuning.input")
    prepared_dir = plan.work_dir / "prepared"
    adapter_dir = plan.work_dir / ADAPTER_DIR

    def lead() -> tuple[tuple[Path, object, PreparedData], tuple[list[InputFile], DataStats, bool]]:
        with _stage("fetch", stages):
            if skip_fetch:
                inputs = _fetched_inputs(tuning.input, plan.work_dir)
            else:
                inputs = _fetch(tuning.input, plan.workspace_path, plan.work_dir, plan.allow_private_urls,
                                plan.registry)
        with _stage("load", stages):
            model_dir, tokenizer = _load_model(plan)
        with _stage("prepare", stages):
            prepared = _prepare_once(inputs, tokenizer, plan, prepared_dir)
            for line in prepared.stats.log_lines():
                events.info(line)
            _data_prepared(prepared.stats)
        prepare.require_training_rows(prepared.stats)
        finished = not restart and _finished_summary(plan.work_dir, adapter_dir,
                                                     _job_identity(plan, inputs, prepared)) is not None
        return (model_dir, tokenizer, prepared), (inputs, prepared.stats, finished)

    kept, shared = distributed.leader_first(ranks, lead)
    if len({tuple(f.sha256 for f in files) for files, _, _ in shared.values()}) > 1:
        raise UserError("the nodes fetched different dataset files (their sha256s differ)", where="tuning.input",
                        fix="give every node the same, unchanging files")
    inputs, stats, _ = shared[ranks.node_leader]
    finished = shared[0][2]  # what rank 0's work dir holds decides for every rank
    if kept is None:  # the node's leader has fetched and prepared: load its work
        from tuner.data import prepared_cache

        model_dir, tokenizer = _load_model(plan)
        prepared = prepared_cache.load(prepared_dir)
    else:
        model_dir, tokenizer, prepared = kept
    identity = _job_identity(plan, inputs, prepared)
    result_file = plan.work_dir / "result.json"
    if finished:
        if not ranks.is_main:
            return None
        finished_summary = _finished_summary(plan.work_dir, adapter_dir, identity)
        events.info(f"train: skipped: this job finished training on {finished_summary['finished']} "
                    "(--restart trains again)")
        _package(plan, finished_summary, adapter_dir, result_file, stages)
        _succeeded(finished_summary, adapter_dir, result_file, trained=False)
        return finished_summary
    if restart and ranks.is_main:  # the old adapter no longer counts as this job's finished one
        for stale in (adapter_dir / SUMMARY_FILE, result_file):
            stale.unlink(missing_ok=True)
    with _stage("train", stages):
        result = trainer.train(model_dir, tokenizer, prepared, plan.config, plan.preset, plan.work_dir, adapter_dir,
                             plan.max_length, identity=identity, restart=restart)
    if not ranks.is_main:
        return None

    _draw_curve(plan, adapter_dir)
    job_summary = summary.build(plan, inputs, stats, result, stages, started, ranks.world_size)
    job_summary["job"] = identity
    (adapter_dir / SUMMARY_FILE).write_text(json.dumps(job_summary, indent=2, sort_keys=True) + "\n")
    result_file.write_text(json.dumps(job_summary, indent=2, sort_keys=True) + "\n")
    _package(plan, job_summary, adapter_dir, result_file, stages)
    _succeeded(job_summary, adapter_dir, result_file, trained=True)
    return job_summary


def _devices(ranks: distributed.Ranks) -> str:
    """What trains: "2 processes x NVIDIA A100 80GB PCIe", "1x Tesla V100-PCIE-16GB", "cpu (2 cores)"."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(ranks.local_rank)
        return f"{ranks.world_size} processes x {name}" if ranks.distributed else f"1x {name}"
    return f"cpu ({os.cpu_count()} cores)" + (f" x {ranks.world_size} processes" if ranks.distributed else "")


def _data_prepared(stats: DataStats) -> None:
    events.emit("data.prepared", f"data: {stats.train_rows:,} train / {stats.eval_rows:,} eval rows, "
                                 f"{stats.tokens:,} tokens ({stats.label_tokens:,} with loss)",
                metrics={"rows_read": stats.rows_read, "rows_kept": stats.rows_kept, "train_rows": stats.train_rows,
                         "eval_rows": stats.eval_rows, "tokens": stats.tokens, "label_tokens": stats.label_tokens,
                         "length_p50": stats.length_p50, "length_p95": stats.length_p95,
                         "length_max": stats.length_max},
                data={"files": [f.path for f in stats.files], "dropped": {k: d.count for k, d in stats.dropped.items()}})


def _draw_curve(plan: JobPlan, adapter_dir: Path) -> None:
    """The loss curve into the adapter (so into the output and the image); never fails the job."""
    from tuner.observe import loss_curves

    title = f"{plan.workspace.metadata.name}: {plan.workspace.tuning.method} on {plan.preset.name}"
    try:
        curve = loss_curves.draw(plan.work_dir / EVENTS_FILE, adapter_dir / loss_curves.CURVE_FILE, title=title)
    except (UserError, OSError, ValueError) as exc:
        events.warn(f"no loss curve: {exc}")
        return
    events.info(f"report: loss curve in {curve} (`tuner report {plan.work_dir}` draws any logged metric)")


def _succeeded(job_summary: dict, adapter_dir: Path, result_file: Path, *, trained: bool) -> None:
    """The table, the job.succeeded event and the termination message."""
    from tuner.observe import termination
    from tuner.observe.loss_curves import CURVE_FILE

    results: dict[str, Path | str] = {"adapter": adapter_dir, "result": result_file}
    if (adapter_dir / CURVE_FILE).is_file():
        results["curve"] = adapter_dir / CURVE_FILE
    if image := job_summary.get("image"):
        results["image"] = f"{image['reference']}@{image['digest']}"
    summary.succeeded(job_summary, results, trained=trained)
    termination.write(termination.succeeded(job_summary))


def _job_identity(plan: JobPlan, inputs: list[InputFile], prepared: PreparedData) -> dict:
    from tuner.train.checkpoints import job_identity

    return job_identity(config_digest=plan.config.digest(), preset=plan.preset.name,
                        method=plan.workspace.tuning.method, datasets=[f.sha256 for f in inputs],
                        train_rows=len(prepared.train), eval_rows=len(prepared.eval))


def _finished_summary(work_dir: Path, adapter_dir: Path, identity: dict) -> dict | None:
    """The summary of this job's finished run in `work_dir`, if its adapter is complete (else None).

    The summary is written into the adapter folder after the adapter's files: it marks it complete.
    """
    from tuner.oci.publish import SUMMARY_FILE

    try:
        summary = json.loads((adapter_dir / SUMMARY_FILE).read_text())
        json.loads((work_dir / "result.json").read_text())
    except (OSError, ValueError):
        return None
    if summary.get("job") != identity or not (adapter_dir / "adapter_model.safetensors").is_file():
        return None
    return summary


def _package(plan: JobPlan, job_summary: dict, adapter_dir: Path, result_file: Path,
             stages: dict[str, float]) -> None:
    """Copy the adapter to the output volume, or publish it as an image; record that in result.json."""
    from tuner.oci.publish import publish
    from tuner.spec.targets import RegistryTarget

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
            job_summary["image"] = {"reference": reference, "digest": published.digest}
    job_summary["stage_seconds"] = summary.stage_seconds(stages)
    result_file.write_text(json.dumps(job_summary, indent=2, sort_keys=True) + "\n")


def _fetch(source: DataSource, workspace_path: Path, work_dir: Path, allow_private_urls: bool,
           registry: RegistryOptions | None) -> list[InputFile]:
    """Fetch the inputs into WORK/inputs, then write the marker that `run --skip-fetch` reads."""
    inputs_dir = work_dir / INPUTS_DIR
    inputs = fetch_inputs(source, inputs_dir, base_dir=workspace_path.parent, allow_private_urls=allow_private_urls,
                          registry=registry)
    inputs_dir.mkdir(parents=True, exist_ok=True)  # a volume input downloads nothing
    files = [{"path": str(_relative_to(f.path, inputs_dir)), "source": f.source, "sha256": f.sha256, "size": f.size}
             for f in inputs]
    marker = inputs_dir / FETCHED_MARKER
    partial = marker.with_name(marker.name + ".part")
    partial.write_text(json.dumps({"input": _input_digest(source), "files": files}, indent=2) + "\n")
    partial.replace(marker)
    return inputs


def _fetched_inputs(source: DataSource, work_dir: Path) -> list[InputFile]:
    """The inputs a `tuner fetch` of this tuning.input left in WORK/inputs, checked to be still there."""
    inputs_dir = work_dir / INPUTS_DIR
    marker = inputs_dir / FETCHED_MARKER
    fix = "run `tuner fetch WORKSPACE --work-dir WORK` first, with the same workspace and work dir"
    if not marker.is_file():
        raise UserError(f"the inputs were not fetched ({marker} is missing)", where="--skip-fetch", fix=fix)
    record = json.loads(marker.read_text())
    if record["input"] != _input_digest(source):
        raise UserError(f"{marker} lists the inputs of a different tuning.input", where="--skip-fetch", fix=fix)
    inputs = [InputFile(inputs_dir / f["path"], f["source"], f["sha256"], f["size"]) for f in record["files"]]
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


def _load_model(plan: JobPlan):
    """The base model's folder and its tokenizer."""
    from tuner.train import base_model, trainer

    model_dir = base_model.resolve_base_model(plan.preset, plan.config.model.pretrained_model_name_or_path,
                                              hub_options=plan.config.model.values())
    return model_dir, trainer.load_tokenizer(model_dir, plan.config)


def _prepare_once(inputs: list[InputFile], tokenizer, plan: JobPlan, out_dir: Path) -> PreparedData:
    """Prepare the inputs into `out_dir`, or reuse what a run with the same inputs, tokenizer and
    DatasetConfig prepared there before."""
    from tuner.data import prepared_cache

    files = [(f.path.name, f.sha256) for f in inputs]
    key = prepared_cache.cache_key(files, tokenizer, plan.config.dataset.values(), plan.max_length)
    prepared = prepared_cache.load(out_dir, key)
    if prepared is not None:
        events.info(f"prepare: reusing the data prepared earlier in {out_dir} (same inputs, tokenizer and config)")
        return prepared
    prepared_cache.forget(out_dir)
    prepared = _prepare([f.path for f in inputs], tokenizer, plan.config, plan.max_length, out_dir)
    prepared_cache.save(out_dir, key, prepared)
    return prepared


def check_data(files: list[Path], *, preset_name: str, tokenizer_dir: Path | None = None,
               config_path: Path | None = None, max_length: int | None = None) -> DataStats:
    """`tuner check-data`: prepare the files into a scratch folder and return what preparation did."""
    from tuner.spec.config_values import check_value
    from tuner.train import base_model, trainer
    from tuner.workdir import scratch_dir

    if max_length is not None:  # the same rule as TrainingArguments.max_length
        check_value("TrainingArguments", "max_length", max_length, "--max-length")
    preset = get_preset(preset_name)
    config = build_config("lora", load_config_file(config_path) if config_path else None)
    tokenizer = trainer.load_tokenizer(tokenizer_dir or base_model.resolve_base_model(preset), config)
    length = max_length or effective_max_length(config, preset)
    with scratch_dir("tuner-check-") as scratch:
        return _prepare(files, tokenizer, config, length, scratch).stats


def _prepare(files: list[Path], tokenizer, config: TrainingConfig, max_length: int, out_dir: Path):
    """Run data preparation with the DatasetConfig's mapping, shuffle, split and row policies."""
    from tuner.data import prepare

    return prepare.prepare(files, tokenizer, max_length=max_length, out_dir=out_dir, dataset=config.dataset)


@contextmanager
def _stage(name: str, durations: dict[str, float]) -> Iterator[None]:
    """Time a stage and log its start and, when it succeeds, its duration."""
    started = time.monotonic()
    events.emit("stage", f"stage {name}: started", data={"name": name, "state": "started"})
    yield
    durations[name] = time.monotonic() - started
    events.emit("stage", f"stage {name}: done in {durations[name]:.1f}s", metrics={"seconds": round(durations[name], 3)},
                data={"name": name, "state": "done"})
