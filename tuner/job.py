"""One tuning job, Workspace to delivered adapter: the order of the stages and nothing else.

    plan (tuner.spec.plan, done by the caller) -> fetch (tuner.data.fetch) -> base model
    (tuner.train.base_model) -> prepare (tuner.data.prepared_cache) -> train (tuner.train.trainer)
    -> summary (tuner.observe.summary) -> loss curve (tuner.observe.loss_curves) -> package
    (tuner.oci.publish) -> [merge (tuner.train.merge) and its image, with --merged-image]
    -> succeeded (tuner.observe.summary)

Every stage writes into the work directory (tuner.workdir) and is idempotent: a retried pod
reuses the fetched inputs, the prepared data, the latest complete checkpoint, and a finished
adapter (then only packaging runs again). Under torchrun each node's local rank 0 fetches and
prepares while the node's other ranks wait, every rank trains, and rank 0 alone writes the
adapter, its summary and the image.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from tuner import __version__
from tuner.data import fetch, prepared_cache
from tuner.data.fetch import InputFile
from tuner.data.prepare import PreparedData, require_training_rows
from tuner.errors import UserError
from tuner.observe import events, loss_curves, summary
from tuner.observe.stages import Stages
from tuner.observe.summary import JobSummary
from tuner.spec.plan import JobPlan, check_push_credentials, default_work_dir
from tuner.spec.targets import RegistryOptions, parse_output_ref
from tuner.spec.workspace import image_notes, load_workspace
from tuner.train import distributed
from tuner.train.distributed import Ranks
from tuner.workdir import WorkDir


def fetch_job(workspace_path: Path, *, work_dir: Path | None = None, allow_private_urls: bool = False,
              registry: RegistryOptions | None = None) -> tuple[Path, list[InputFile]]:
    """`tuner fetch` (the Job's init container): only the fetch stage, into WORK/inputs; return the
    marker file and the inputs."""
    workspace = load_workspace(workspace_path, allow_private_urls=allow_private_urls)
    for note in image_notes(workspace, ("input",)):
        events.info(note)
    if workspace.tuning.output.image:  # the push secret (at $DOCKER_CONFIG in the Job) is checked before any download
        check_push_credentials(parse_output_ref(workspace.tuning.output.image), None)
    work = WorkDir(work_dir or default_work_dir(workspace))
    inputs = fetch.fetch_into(work, workspace.tuning.input, base_dir=workspace_path.parent,
                              allow_private_urls=allow_private_urls, registry=registry)
    return work.fetched_marker, inputs


def run_job(plan: JobPlan, *, skip_fetch: bool = False, restart: bool = False) -> JobSummary | None:
    """Run every stage; return the summary that is also written next to the adapter (None on ranks
    other than 0).

    `skip_fetch` uses the inputs `tuner fetch` left in the work directory. Training resumes from the
    latest complete checkpoint of the same job (`restart`: delete them and start over) and is skipped
    when WORK/adapter already holds this job's finished adapter; on SIGTERM it saves a checkpoint and
    exits with EXIT_PREEMPTED (143), writing no adapter.
    """
    ranks = distributed.ranks_from_env()
    if ranks.distributed and ranks.is_node_leader and not ranks.is_main:  # its last line before rank 0 speaks
        events.info(f"rank {ranks.rank} of {ranks.world_size} (node {ranks.node}): preparing this node's data, "
                    "then training; rank 0 logs the progress")
    with distributed.process_group(ranks, timedelta(seconds=plan.config.training_arguments.ddp_timeout)), \
            distributed.quiet_unless_main(ranks):
        if ranks.is_main:  # closed by the CLI once the job's last event (success or failure) is in
            # a restart starts the record anew: the loss curve in the image must not carry the old run's tail
            events.record_to(plan.work.events, fresh=restart)
        return _run_stages(plan, ranks, skip_fetch, restart)


def _run_stages(plan: JobPlan, ranks: Ranks, skip_fetch: bool, restart: bool) -> JobSummary | None:
    from tuner.train import base_model, trackers, trainer  # here: `tuner fetch` (the init container) needs no torch

    work, tuning, stages = plan.work, plan.workspace.tuning, Stages()
    started = summary.now()
    _announce(plan, ranks)

    def lead() -> tuple[tuple[Path, object, PreparedData], tuple[list[InputFile], JobSummary | None]]:
        """A node leader's share: fetch, load the base model, prepare (the node's other ranks wait)."""
        with stages.stage("fetch"):
            inputs = (fetch.fetched_inputs(work, tuning.input) if skip_fetch else
                      fetch.fetch_into(work, tuning.input, base_dir=plan.workspace_path.parent,
                                       allow_private_urls=plan.allow_private_urls, registry=plan.registry))
        with stages.stage("load"):
            model_dir, tokenizer = base_model.load(plan.preset, plan.config.model, plan.registry)
        with stages.stage("prepare"):
            prepared = prepared_cache.prepare_once(inputs, tokenizer, plan.config.dataset, plan.max_length,
                                                   work.prepared)
            prepared.stats.report()
        require_training_rows(prepared.stats)
        done = None if restart else summary.finished(work, _identity(plan, inputs, prepared))
        return (model_dir, tokenizer, prepared), (inputs, done)

    kept, shared = distributed.leader_first(ranks, lead)
    if len({tuple(f.sha256 for f in files) for files, _ in shared.values()}) > 1:
        raise UserError("the nodes fetched different dataset files (their sha256s differ)", where="tuning.input",
                        fix="give every node the same, unchanging files")
    inputs, finished = shared[ranks.node_leader][0], shared[0][1]  # rank 0's work dir decides for every rank
    if kept is None:  # the node's leader has fetched and prepared: load its work
        model_dir, tokenizer = base_model.load(plan.preset, plan.config.model, plan.registry)
        prepared = prepared_cache.load(work.prepared)
    else:
        model_dir, tokenizer, prepared = kept
    identity = _identity(plan, inputs, prepared)

    if finished is not None:
        if not ranks.is_main:
            return None
        events.info(f"train: skipped: this job finished training on {finished.finished} (--restart trains again)")
        done = _package(plan, finished, stages)
        summary.succeeded(done, work, trained=False)
        return done
    if restart and ranks.is_main:
        summary.forget(work)
    with stages.stage("train"):
        result = trainer.train(model_dir, tokenizer, prepared, plan.config, plan.preset, work, plan.max_length,
                               identity=identity, restart=restart,
                               tracking=trackers.Tracking.of(plan.workspace.metadata.name, identity))
    if not ranks.is_main:
        return None
    loss_curves.draw_job_curve(work, f"{plan.workspace.metadata.name}: {tuning.method} on {plan.preset.name}")
    trained = summary.build(plan, inputs, prepared.stats, result, stages.seconds, started, ranks.world_size,
                            identity)
    trained.write(work.summary)  # last into the adapter folder: it marks the adapter complete
    trained.write(work.result)
    trained = _package(plan, trained, stages)
    summary.succeeded(trained, work, trained=True)
    return trained


def _announce(plan: JobPlan, ranks: Ranks) -> None:
    """The job.started event, then what the plan decided and warned about."""
    name, tuning, devices = plan.workspace.metadata.name, plan.workspace.tuning, ranks.devices()
    events.emit("job.started", f"tuner {__version__}: workspace {name} | preset {plan.preset.name} | method "
                               f"{tuning.method} | {devices} | work dir {plan.work.root}",
                data={"tuner_version": __version__, "workspace": name, "preset": plan.preset.name,
                      "method": tuning.method, "devices": devices, "world_size": ranks.world_size,
                      "work_dir": str(plan.work.root)})
    for note in plan.notes:
        events.info(note)
    for warning in plan.warnings:
        events.warn(warning)
    for key in ("dataset_path", "dataset_extension"):
        if getattr(plan.config.dataset, key):
            events.warn(f"DatasetConfig.{key} is not applied: tuner reads every dataset file of tuning.input")


def _identity(plan: JobPlan, inputs: list[InputFile], prepared: PreparedData) -> dict:
    from tuner.train.checkpoints import job_identity

    return job_identity(config_digest=plan.config.digest(), preset=plan.preset.name,
                        method=plan.workspace.tuning.method, datasets=[f.sha256 for f in inputs],
                        train_rows=len(prepared.train), eval_rows=len(prepared.eval))


def _package(plan: JobPlan, finished: JobSummary, stages: Stages) -> JobSummary:
    """Deliver the adapter (output volume or image) and record where it went in result.json."""
    from tuner.oci.publish import deliver
    from tuner.train import trackers

    with stages.stage("package"):
        image = deliver(plan.output, plan.work, plan.registry)
    if image is not None:
        trackers.record_image(plan.work, f"{image.reference}@{image.digest}")
    finished = finished.model_copy(update={"image": image or finished.image,
                                           "stage_seconds": summary.stage_seconds(stages.seconds)})
    finished.write(plan.work.result)
    if plan.merged_output is not None:
        finished = _merge(plan, finished, stages)
    return finished


def _merge(plan: JobPlan, finished: JobSummary, stages: Stages) -> JobSummary:
    """`--merged-image`: the adapter merged into its base model (WORK/merged, reused once complete),
    pushed as the job's second image, and where it went recorded in result.json."""
    from tuner.oci.publish import deliver_merged
    from tuner.train.merge import merge

    with stages.stage("merge"):
        merged = merge(plan.work.root, plan.work.merged, registry=plan.registry, replace=True)
        image = deliver_merged(plan.merged_output, plan.work, merged.dtype, plan.registry)
    finished = finished.model_copy(update={"merged_image": image,
                                           "stage_seconds": summary.stage_seconds(stages.seconds)})
    finished.write(plan.work.result)
    return finished
