"""tuner.train.label_loss: the loss over the labelled positions only, in chunks, equals the model's own
loss and its gradients (padded and packed batches, LoRA and QLoRA), without the full logits."""

from __future__ import annotations

import json

import pytest
import torch

from job_support import ROWS
from tuner.data import prepare
from tuner.data.packing import PackedDataset, PackingCollator, pack_best_fit
from tuner.spec.presets import get_preset
from tuner.spec.training_config import build_config
from tuner.train import base_model, label_loss, trainer
from tuner.train.precision import choose_precision

EQUAL = 1e-5


def model_and_batches(model_dir, method: str, tmp_path):
    config = build_config(method)
    tokenizer = base_model.load_tokenizer(model_dir, config.model)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    data = prepare.prepare([path], tokenizer, max_length=64, out_dir=tmp_path / "prepared")
    padded = trainer.PadCollator(tokenizer.pad_token_id)([trainer.ExampleDataset(data.train)[i] for i in range(4)])
    bins = pack_best_fit(data.train.lengths, 64)
    packed_set = PackedDataset(data.train, bins)
    packed = PackingCollator(tokenizer.pad_token_id)([packed_set[i] for i in range(min(2, len(packed_set)))])
    torch.manual_seed(0)
    model = trainer.load_base_model(model_dir, config, choose_precision("float32"))
    model = trainer._add_lora(model, config, get_preset("smollm2-135m-instruct"))
    for name, param in model.named_parameters():  # B starts at zero: move it, so every LoRA weight has a gradient
        if "lora_B" in name:
            param.data.normal_(0, 0.02)
    return model, {"padded": padded, "packed": packed}


def loss_and_grads(model, compute) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = compute()
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["lora", "qlora"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_the_label_loss_and_its_gradients_equal_the_models_own(method, layout, tiny_model_dir, tmp_path,
                                                              monkeypatch):
    monkeypatch.setattr(label_loss, "chunk_size", lambda vocab: 7)  # several chunks, the last one short
    model, batches = model_and_batches(tiny_model_dir, method, tmp_path)
    batch = batches[layout]
    head = label_loss.output_head(model)
    assert head is not None and (batch["labels"][:, 1:] != -100).sum() > 7
    own, own_grads = loss_and_grads(model, lambda: model(**batch).loss)
    ours, our_grads = loss_and_grads(model, lambda: label_loss.label_loss(model, model, head, batch))
    assert ours == pytest.approx(own, abs=EQUAL)
    assert max((our_grads[k] - own_grads[k]).abs().max().item() for k in own_grads) < EQUAL
    count = int((batch["labels"][:, 1:] != -100).sum()) * 3  # the Trainer's count over an accumulated batch
    assert label_loss.label_loss(model, model, head, batch, count).item() == pytest.approx(
        model(**batch, num_items_in_batch=count).loss.item(), abs=EQUAL)


def test_the_forward_pass_returns_hidden_states_not_logits(tiny_model_dir, tmp_path):
    model, batches = model_and_batches(tiny_model_dir, "lora", tmp_path)
    head = label_loss.output_head(model)
    seen = []
    hook = head.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    label_loss.label_loss(model, model, head, batches["padded"]).backward()
    hook.remove()
    labelled = int((batches["padded"]["labels"][:, 1:] != -100).sum())
    assert seen == [] and model.get_output_embeddings() is head  # the head ran only inside the chunks
    assert labelled < batches["padded"]["input_ids"].numel()  # the prompt and padding carried no logits


def test_a_soft_capped_model_keeps_its_own_loss(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.final_logit_softcapping = 30.0
    assert label_loss.output_head(model) is None


def test_a_chunk_holds_about_128_mib_of_logits_whatever_the_vocabulary():
    assert label_loss.chunk_size(151_936) * 151_936 * 4 <= label_loss.CHUNK_BYTES
    assert (label_loss.chunk_size(151_936) + 1) * 151_936 * 4 > label_loss.CHUNK_BYTES
    assert label_loss.chunk_size(49_152) > label_loss.chunk_size(151_936)
    assert label_loss.chunk_size(10**9) == label_loss.MIN_CHUNK
