"""`tuner plan WORKSPACE`: before any GPU is booked, what the job needs and whether it fits: the GPU
type and count, the predicted peak memory per GPU, the micro-batch and accumulation that fit best,
the dataset's rows and tokens when the data is reachable from here, the steps and an estimated
duration; when it does not fit, which change would. It exits 2 with the same error line as
`tuner render` when the job cannot fit."""

from __future__ import annotations

import math
from pathlib import Path

from tuner.data.prepare import DataStats
from tuner.errors import UserError
from tuner.kube import gpus, memory_fit, throughput
from tuner.kube.sizing import Sizing, size_job
from tuner.kube.sku_precision import for_sku
from tuner.spec.plan import JobPlan, plan_job
from tuner.workdir import scratch_dir


def plan(workspace: Path, *, config_path: Path | None = None, gpu_count: int | None = None,
         gpu_memory_gib: float | None = None, allow_private_urls: bool = False) -> list[str]:
    """The report's lines; UserError (after printing nothing) when the job cannot fit."""
    job = plan_job(workspace, config_path=config_path, allow_private_urls=allow_private_urls, for_cluster=True)
    sku = gpus.lookup(job.workspace.resource.instance_type, gpu_count=gpu_count, gpu_memory_gib=gpu_memory_gib)
    config, precision_notes = for_sku(job.config, sku)
    sizing = size_job(job, sku, config)
    arch, need = job.preset.architecture, sizing.estimate
    lines = [f"job: {job.workspace.metadata.name}: {job.config.method} on {job.preset.name} "
             f"({arch.parameters / 1e9:.1f}B parameters), max_length {job.max_length:,}",
             f"gpus: {sku.name}: {sizing.world_size} x {sku.gpu_model} ({sku.gpu_memory_gib:g} GiB each)"
             + ("" if sku.bf16 else "; no bf16, so float16"),
             *precision_notes,
             f"parallelism: {sizing.layout.describe()}",
             f"memory: {need.total:.1f} GiB per GPU of {sizing.usable_gib:.1f} GiB usable: "
             + ("fits" if sizing.fits else "does NOT fit") + f" ({need.describe()})",
             f"batch: effective {sizing.effective_batch} = micro-batch {need.batch_size} x "
             f"{sizing.effective_batch // (need.batch_size * sizing.world_size)} accumulation x "
             f"{sizing.world_size} GPU(s); best fit: micro-batch {sizing.micro_batch} x {sizing.accumulation} "
             "accumulation"]
    stats, unreachable = _data(job)
    rate = throughput.tokens_per_second(job.preset, sku, job.config.method)
    if stats is None:
        lines += [f"data: not counted ({unreachable})",
                  f"duration: about {_hours(1e6 / (rate.per_gpu * sizing.world_size))} per million training tokens "
                  f"at ~{rate.per_gpu:,.0f} tokens/s per GPU ({rate.basis})"]
    else:
        lines += _steps_and_duration(job, sizing, stats, rate)
    for alternative in sizing.alternatives:
        verdict = "fits" if alternative.fits else f"still {alternative.estimate.total:.1f} GiB"
        lines.append(f"instead: {alternative.change}: {alternative.estimate.total:.1f} GiB, {verdict}")
    if not sizing.fits:
        for line in lines:
            print(line)
        memory_fit.check_fits(sku, need, job.preset.name)  # the error line render gives
    return lines


def _data(job: JobPlan) -> tuple[DataStats | None, str]:
    """The dataset prepared into a scratch folder with the base model's tokenizer, when both are
    reachable from here; else None and why."""
    from tuner.data.fetch import fetch_inputs
    from tuner.data.prepare import prepare
    from tuner.train import base_model

    source = job.workspace.tuning.input
    if source.volume_source and "hostPath" not in source.volume_source:
        return None, "the input is a cluster volume"
    with scratch_dir("tuner-plan-") as scratch:
        try:
            inputs = fetch_inputs(source, scratch / "inputs", base_dir=job.workspace_path.parent,
                                  allow_private_urls=job.allow_private_urls, registry=job.registry)
            tokenizer = base_model.load(job.preset, job.config.model, job.registry)[1]
            return prepare([f.path for f in inputs], tokenizer, max_length=job.max_length, out_dir=scratch / "prepared",
                           dataset=job.config.dataset).stats, ""
        except UserError as exc:
            return None, str(exc).split(" (", 1)[0][:160]


def _steps_and_duration(job: JobPlan, sizing: Sizing, stats: DataStats, rate: throughput.Throughput) -> list[str]:
    args = job.config.training_arguments
    batch = sizing.micro_batch * sizing.accumulation * sizing.world_size
    epochs = args.num_train_epochs
    per_epoch = math.ceil(stats.train_rows / batch)
    steps = args.max_steps if args.max_steps > 0 else math.ceil(per_epoch * epochs)
    tokens = stats.tokens * min(steps * batch / max(stats.train_rows, 1), epochs if steps else 0)
    seconds = tokens / (rate.per_gpu * sizing.world_size)
    return [f"data: {stats.train_rows:,} train rows, {stats.tokens:,} tokens ({stats.eval_rows:,} eval rows)",
            f"steps: {steps:,} ({per_epoch:,} per epoch at batch {batch}), {tokens:,.0f} tokens to train",
            f"duration: about {_hours(seconds)} at ~{rate.per_gpu:,.0f} tokens/s per GPU ({rate.basis})"]


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{max(seconds / 60, 1):.0f} min"
