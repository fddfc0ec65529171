"""How a job spreads over its GPUs: one process; DDP, where every GPU holds a whole copy and the
LoRA gradients are averaged; or FSDP, where the base weights (and the LoRA states) are sharded over
every GPU of every node, so a model bigger than one GPU trains. `TrainingArguments.fsdp` asks for
FSDP; otherwise the cheapest mode that fits is chosen: DDP moves only the small LoRA gradients,
FSDP gathers every layer's weights in each forward and backward pass. `fsdp: no` keeps DDP."""

from __future__ import annotations

from dataclasses import dataclass

from tuner.kube.gpus import GpuSku
from tuner.kube.memory_fit import USABLE_FRACTION, MemoryEstimate, estimate
from tuner.spec.presets import Preset
from tuner.spec.training_config import TrainingConfig


@dataclass(frozen=True)
class Layout:
    mode: str  # "single", "ddp" or "fsdp"
    world_size: int  # processes, one per GPU, over every node
    estimate: MemoryEstimate  # per GPU, in this mode
    reason: str

    def describe(self) -> str:
        return f"{self.mode} over {self.world_size} GPU(s): {self.reason}"


def choose(preset: Preset, config: TrainingConfig, max_length: int, sku: GpuSku, nodes: int) -> Layout:
    """The layout of a job on `nodes` nodes of `sku` (see the module docstring)."""
    world = max(sku.gpu_count, 1) * nodes
    usable = sku.gpu_memory_gib * USABLE_FRACTION
    if config.training_arguments.sharded and world > 1:
        return Layout("fsdp", world, estimate(preset, config, max_length, shards=world),
                      "TrainingArguments.fsdp asks for it")
    whole = estimate(preset, config, max_length)
    if world == 1:
        return Layout("single", 1, whole, "one GPU")
    if whole.total <= usable:
        return Layout("ddp", world, whole, f"one GPU holds the whole job ({whole.total:.1f} GiB of {usable:.1f})")
    if (config.training_arguments.fsdp or "").strip() == "no":
        return Layout("ddp", world, whole, "TrainingArguments.fsdp is no")
    sharded = estimate(preset, config, max_length, shards=world)
    fits = "" if sharded.total <= usable else ", and does not fit even so"
    return Layout("fsdp", world, sharded, f"one GPU cannot hold {whole.total:.1f} GiB (of {usable:.1f} usable); "
                                          f"sharded, each GPU needs {sharded.total:.1f}{fits}")
