"""The loss computed only where the labels are, in chunks: the `[tokens x vocab]` logits never exist.

For a 152k vocabulary at 4k tokens the full logits are 2.5 GB in fp32 per sequence, and again
for their gradient, though most positions of a chat carry no loss (the prompt, the padding). The
output head is made to pass its input through, so the model's own forward (through any DDP
wrapper, whose gradient hooks it arms) returns the final hidden states; the head is then applied
to the positions with a label only, a chunk of them at a time (`chunk_size`), each chunk's logits recomputed in
the backward pass (activation checkpointing) instead of kept: the pattern of torchtune's chunked
loss and Liger's fused linear cross-entropy, in plain torch so it runs on CPU and GPU alike.

The sum is divided as transformers' ForCausalLMLoss divides it (by the batch's label count, or by
the Trainer's count over the accumulated batch), so the loss and gradients equal the model's own
(tests/train/test_label_loss.py). Models whose loss does more than cross-entropy over the head's
output (Gemma's logit soft-capping, Cohere's logit scale) and FSDP runs (the head's weight is a
shard outside the model's forward) keep the model's own loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

CHUNK_BYTES = 128 << 20  # fp32 logits per chunk; the backward holds about three times this (logits, softmax, grad)
MIN_CHUNK = 64  # positions: fewer makes the head's matmul inefficient
IGNORE = -100


class PassThrough(nn.Module):
    """Stands in for the output head during the forward pass: returns the hidden states unchanged."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft one (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def output_head(model: nn.Module) -> nn.Module | None:
    """The causal LM's output head when the plain cross-entropy over its output is the model's loss."""
    base = _causal_lm(model)
    config = getattr(base, "config", None)
    if config is None or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", 1) != 1:
        return None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    return head if isinstance(head, nn.Linear) else None


def label_loss(model: nn.Module, unwrapped: nn.Module, head: nn.Linear, inputs: dict[str, Any],
               num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """Cross-entropy over the labelled positions (next-token: the label of position t+1 at t).
    `model` is what the Trainer runs (maybe DDP-wrapped), `unwrapped` the causal LM (or peft model) in it."""
    base = _causal_lm(unwrapped)
    forward = {key: value for key, value in inputs.items() if key != "labels"}
    base.set_output_embeddings(PassThrough())
    try:
        hidden = model(**forward, use_cache=False).logits
    finally:
        base.set_output_embeddings(head)
    labels = inputs["labels"][:, 1:]
    chosen = labels != IGNORE
    states, targets = hidden[:, :-1][chosen], labels[chosen]
    total = hidden.new_zeros((), dtype=torch.float32)
    size = chunk_size(head.out_features)
    for start in range(0, len(targets), size):
        total = total + checkpoint(_chunk_loss, head.weight, head.bias, states[start:start + size],
                                   targets[start:start + size], use_reentrant=False)
    count = num_items_in_batch if num_items_in_batch is not None else chosen.sum()
    return total / (count.to(total.device) if isinstance(count, torch.Tensor) else count)


def chunk_size(vocab: int) -> int:
    """Label positions per chunk: 220 for Qwen2.5's 151,936 tokens, 682 for SmolLM2's 49,152. At 4096
    tokens the bench (scripts/bench_train.py --memory) peaked at 2,529 MB with 1,024-position chunks."""
    return max(MIN_CHUNK, CHUNK_BYTES // (4 * vocab))


def _chunk_loss(weight: torch.Tensor, bias: torch.Tensor | None, states: torch.Tensor,
                targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(states, weight, bias).float()  # ForCausalLMLoss upcasts the logits the same way
    return F.cross_entropy(logits, targets, reduction="sum", ignore_index=IGNORE)
