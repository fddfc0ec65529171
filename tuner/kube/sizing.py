"""Sizing a job for `tuner plan`: whether it fits the instance type's GPUs, the micro-batch and
gradient accumulation that fit best at the configured effective batch, and, when it does not fit,
which single change would (tuner.kube.memory_fit estimates each)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tuner.kube import parallelism
from tuner.kube.gpus import GpuSku, smallest_with
from tuner.kube.memory_fit import USABLE_FRACTION, MemoryEstimate, estimate
from tuner.kube.parallelism import Layout
from tuner.spec.plan import JobPlan
from tuner.spec.training_config import TrainingConfig, build_config


@dataclass(frozen=True)
class Alternative:
    change: str
    estimate: MemoryEstimate
    fits: bool


@dataclass(frozen=True)
class Sizing:
    sku: GpuSku
    layout: Layout  # single, DDP or FSDP, and why
    estimate: MemoryEstimate  # at the configured micro-batch, in that layout
    usable_gib: float
    effective_batch: int  # micro-batch x accumulation x GPUs, as configured
    micro_batch: int  # the largest that fits and divides the effective batch (None: none fits)
    accumulation: int
    alternatives: tuple[Alternative, ...] = ()  # when it does not fit

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def fits(self) -> bool:
        return self.estimate.total <= self.usable_gib


def size_job(plan: JobPlan, sku: GpuSku, config: TrainingConfig) -> Sizing:
    """Size `plan` on `sku` (config: the plan's, as it trains on that GPU type)."""
    usable = sku.gpu_memory_gib * USABLE_FRACTION
    layout = parallelism.choose(plan.preset, config, plan.max_length, sku, plan.workspace.resource.count)
    world, args = layout.world_size, config.training_arguments
    effective = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    need, shards = layout.estimate, layout.estimate.shards
    per_gpu = effective // world
    micro = next((m for m in range(per_gpu, 0, -1) if per_gpu % m == 0
                  and _at(plan, config, shards, micro_batch=m).total <= usable), 1)
    alternatives = () if need.total <= usable else tuple(_alternatives(plan, config, need, usable))
    return Sizing(sku, layout, need, usable, effective, micro, per_gpu // micro, alternatives)


def _alternatives(plan: JobPlan, config: TrainingConfig, need: MemoryEstimate, usable: float):
    """One change at a time, each estimated: what would make the job fit."""
    tried: list[tuple[str, MemoryEstimate]] = []
    if config.method == "lora":
        qlora = build_config("qlora", {"TrainingArguments": config.training_arguments.values(),
                                       "LoraConfig": config.lora.values()})
        tried.append(("method qlora (4-bit base weights)", estimate(plan.preset, qlora, plan.max_length, need.shards)))
    if not need.gradient_checkpointing:
        tried.append(("TrainingArguments.gradient_checkpointing: true",
                      _at(plan, config, need.shards, checkpointing=True)))
    if need.batch_size > 1:
        tried.append(("TrainingArguments.per_device_train_batch_size: 1 (accumulate the rest)",
                      _at(plan, config, need.shards, micro_batch=1)))
    for length in (plan.max_length // 2, plan.max_length // 4):
        if length >= 256:
            tried.append((f"TrainingArguments.max_length: {length}", estimate(plan.preset, config, length, need.shards)))
    alternatives = [Alternative(change, e, e.total <= usable) for change, e in tried]
    bigger = smallest_with(need.total / USABLE_FRACTION)
    if bigger is not None:
        alternatives.append(Alternative(f"instance type {bigger.name} ({bigger.gpu_model}, "
                                        f"{bigger.gpu_memory_gib:g} GiB per GPU)", need, True))
    return alternatives


def _at(plan: JobPlan, config: TrainingConfig, shards: int, *, micro_batch: int | None = None,
        checkpointing: bool | None = None) -> MemoryEstimate:
    update: dict = {}
    if micro_batch is not None:
        update["per_device_train_batch_size"] = micro_batch
    if checkpointing is not None:
        update.update(activation_checkpointing=checkpointing)
    changed = dataclasses.replace(config, training_arguments=config.training_arguments.model_copy(update=update))
    return estimate(plan.preset, changed, plan.max_length, shards)
