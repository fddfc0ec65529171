"""FSDP2 by hand: the base model's decoder layers and the model itself sharded with
`torch.distributed.fsdp.fully_shard` over every rank, the LoRA parameters trained as DTensor shards.

transformers' own FSDP path (`TrainingArguments.fsdp`, through accelerate) refuses a CPU run ("fsdp
only works in distributed training" under use_cpu) and wraps peft models in DDP there, so tuner
shards the model itself and marks it as sharded at load time: the Trainer then neither wraps it in
DDP nor shards it again, defers the gradient reduction across accumulation steps, and gathers the
state for saving (transformers 5.24, trainer.py `is_distributed_loading_by_transformers`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tuner.errors import UserError


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


def full_state(model: nn.Module) -> dict[str, Any]:
    """The whole model's state, gathered from every rank's shards: every rank must call this; rank 0
    gets the tensors (on the CPU), the others an empty dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_gathered(trainer) -> None:
    """Make the Trainer's checkpoint saves gather the shards first: peft's save_pretrained reads each
    tensor's storage, which a DTensor shard does not have. Every rank gathers (a collective); rank 0
    writes the LoRA weights, the same files as without FSDP."""
    original = trainer._save

    def save(output_dir: str | None = None, state_dict: dict | None = None) -> None:
        return original(output_dir, state_dict=full_state(trainer.model))

    trainer._save = save
