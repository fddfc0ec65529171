"""FSDP2 by hand: the base model's decoder layers and the model itself sharded with
`torch.distributed.fsdp.fully_shard` over every rank, the LoRA parameters trained as DTensor shards.

transformers' own FSDP path (`TrainingArguments.fsdp`, through accelerate) refuses a CPU run ("fsdp
only works in distributed training" under use_cpu) and wraps peft models in DDP there, so tuner
shards the model itself and marks it as sharded at load time: the Trainer then neither wraps it in
DDP nor shards it again, defers the gradient reduction across accumulation steps, and gathers the
state for saving (transformers 5.24, trainer.py `is_distributed_loading_by_transformers`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from transformers import TrainerCallback

from tuner.errors import UserError
from tuner.workdir import atomic_output

OPTIMIZER_FILE = "fsdp_optimizer.pt"  # in a checkpoint: the gathered AdamW moments and the LR schedule


def shard(model: nn.Module) -> nn.Module:
    """Shard each decoder layer, then the rest (embeddings, final norm, output head) as the root."""
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    model.is_distributed_loading_by_transformers = True
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers: the longest one in the model (LlamaModel.layers and alike)."""
    lists = [module for module in model.modules() if isinstance(module, nn.ModuleList) and len(module) > 0]
    if not lists:
        raise UserError("the base model has no list of decoder layers for FSDP to shard",
                        where="training_config.TrainingArguments.fsdp", fix="remove fsdp (train with DDP)")
    return max(lists, key=len)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained (LoRA) parameters, whole, on every rank: each shard gathered (a collective every rank
    must join). Only these: gathering the frozen base weights too would put a whole copy of the model
    into one process's memory, which FSDP is there to avoid. peft's save_pretrained picks its adapter
    keys out of this, so the files are the same as without FSDP, on every node that writes."""
    return {name: param.full_tensor().detach().cpu() for name, param in model.named_parameters()
            if param.requires_grad}


def save_gathered(trainer) -> None:
    """Make the Trainer's saves work on shards. The adapter: gathered first, as peft's save_pretrained
    reads each tensor's storage, which a DTensor shard does not have; rank 0 writes the LoRA weights,
    the same files as without FSDP (each node's leader writes its node's checkpoint). The optimizer and the LR schedule, which transformers does not
    checkpoint for a model it did not shard itself (`save_only_model`): gathered (the LoRA
    parameters' AdamW moments are small) and written by rank 0 into the checkpoint, before
    tuner.train.checkpoints marks it complete."""
    original_save, original_checkpoint = trainer._save, trainer._save_checkpoint

    def save(output_dir: str | None = None, state_dict: dict | None = None) -> None:
        return original_save(output_dir, state_dict=trainable_state(trainer.model))

    def save_checkpoint(*args, **kwargs):
        result = original_checkpoint(*args, **kwargs)
        optimizer = get_optimizer_state_dict(trainer.model, trainer.optimizer,
                                             options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if trainer.is_world_process_zero():
            folder = Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
            with atomic_output(folder / OPTIMIZER_FILE) as handle:
                torch.save({"optimizer": optimizer, "scheduler": trainer.lr_scheduler.state_dict()}, handle)
        return result

    trainer._save = save
    trainer._save_checkpoint = save_checkpoint


class RestoreOptimizer(TrainerCallback):
    """On a resume, the optimizer and LR schedule rank 0 saved: read by rank 0, sent to every rank."""

    def __init__(self, checkpoint: Path | None):
        self.checkpoint = checkpoint

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if self.checkpoint is None:
            return
        import torch.distributed as dist

        saved = [None]
        if dist.get_rank() == 0:
            saved = [torch.load(self.checkpoint / OPTIMIZER_FILE, map_location="cpu", weights_only=False)]
        dist.broadcast_object_list(saved, src=0)
        set_optimizer_state_dict(model, optimizer, saved[0]["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        lr_scheduler.load_state_dict(saved[0]["scheduler"])
