"""Packing: best-fit bins, and proof that a padding-free packed row trains exactly like separate samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tuner.data.packing import (
    IGNORE,
    PackedDataset,
    PackingCollator,
    pack_best_fit,
    packing_efficiency,
    padded_tokens,
    should_pack,
)
from tuner.spec.presets import get_preset

# (prompt, answer): an answer trains on its tokens only (chat-like); None trains on every token (plain text)
TEXTS = [
    ("What is the capital of France?", " The capital of France is Paris."),
    ("The quick brown fox jumps over the lazy dog. " * 3, None),
    ("Hi", None),  # one token: no target of its own, but it must still not leak into its neighbours
    ("List three primes.", " Two, three and five are the first three primes; seven comes next."),
    ("Rivers flow downhill because gravity pulls water toward the lowest ground it can reach.", None),
    ("Translate 'cat' to German.", " Katze"),
]
SUM_RTOL = 1e-4  # relative, on float64 sums of float32 per-target losses (measured: ~1e-8)


def examples(tokenizer) -> list[tuple[list[int], list[int]]]:
    out = []
    for prompt, answer in TEXTS:
        ids = tokenizer(prompt)["input_ids"]
        if answer is None:
            out.append((ids, list(ids)))
        else:
            tail = tokenizer(answer)["input_ids"]
            out.append((ids + tail, [IGNORE] * len(ids) + tail))
    return out


def token_losses(model, input_ids: torch.Tensor, labels: torch.Tensor, **kwargs) -> torch.Tensor:
    """Per-target cross-entropy (float64) of each row in turn, labels shifted as the causal-LM loss shifts them."""
    input_ids, labels = input_ids.reshape(-1, input_ids.shape[-1]), labels.reshape(-1, labels.shape[-1])
    with torch.no_grad():
        logits = model(input_ids=input_ids, **kwargs).logits.double()
    losses = []
    for row_logits, row_labels in zip(logits, labels, strict=True):
        targets = row_labels[1:]
        keep = targets != IGNORE
        losses.append(F.cross_entropy(row_logits[:-1][keep], targets[keep], reduction="none"))
    return torch.cat(losses)


def separate_and_packed(model, tokenizer, all_ones_mask: bool = False, **packed_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-target losses of every sample run alone, and of the same samples as one packed row."""
    data = examples(tokenizer)
    separate = torch.cat([token_losses(model, torch.tensor(ids), torch.tensor(labels)) for ids, labels in data])
    # two bins of different lengths, collated into one batch, as training would see them
    rows = PackedDataset(data, [np.array([0, 1, 2]), np.array([3, 4, 5])])
    batch = PackingCollator()([rows[0], rows[1]])
    if all_ones_mask:
        packed_kwargs["attention_mask"] = torch.ones_like(batch["input_ids"])
    packed = token_losses(model, batch["input_ids"], batch["labels"], position_ids=batch["position_ids"],
                          **packed_kwargs)
    return separate, packed


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module", params=["sdpa", "eager", "sdpa+lora", "eager+lora"])
def model(request, tiny_model_dir):
    """The 2-layer model in float32 eval mode, no cache; '+lora' wraps it with a non-zero LoRA adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    attn, _, lora = request.param.partition("+")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = False
    if lora:
        targets = list(get_preset("smollm2-135m-instruct").lora_target_modules)
        torch.manual_seed(0)  # peft draws lora_A at random
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
        for name, param in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero, which would make the adapter a no-op
                torch.nn.init.normal_(param, std=0.1)
    return model.eval()


@pytest.mark.slow
def test_packed_row_loss_equals_sum_of_separate_losses(model, tokenizer):
    separate, packed = separate_and_packed(model, tokenizer)
    assert len(packed) == len(separate) > 50
    torch.testing.assert_close(packed, separate, rtol=0, atol=1e-4)  # target by target
    assert packed.sum().item() == pytest.approx(separate.sum().item(), rel=SUM_RTOL)
    if hasattr(model, "disable_adapter"):  # the adapter really changes the loss being compared
        with model.disable_adapter():
            base, _ = separate_and_packed(model, tokenizer)
        assert abs(base.sum() - separate.sum()) > 1.0


@pytest.mark.slow
@pytest.mark.parametrize("leak", ["attention_mask", "use_cache"])
def test_mask_or_cache_lets_packed_samples_see_each_other(model, tokenizer, leak):
    """Negative control: with a 2D mask or a KV cache transformers falls back to one causal mask over the row."""
    kwargs = {"use_cache": True} if leak == "use_cache" else {"all_ones_mask": True}
    separate, packed = separate_and_packed(model, tokenizer, **kwargs)
    assert abs(packed.sum().item() - separate.sum().item()) > 1.0


@pytest.mark.slow
def test_mean_loss_and_token_count_match_the_padded_batch(model, tokenizer):
    """What the Trainer optimises: the model's mean loss, normalised by the targets in labels[..., 1:]."""
    data = examples(tokenizer)
    pad, width = 0, max(len(ids) for ids, _ in data)  # any pad id: masked out and ignored
    padded = {"input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in data]),
              "labels": torch.tensor([labels + [IGNORE] * (width - len(labels)) for _, labels in data]),
              "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in data])}
    rows = PackedDataset(data, pack_best_fit(np.array([len(ids) for ids, _ in data]), 64))
    packed = PackingCollator()([rows[i] for i in range(len(rows))])
    assert "attention_mask" not in packed
    assert packed["labels"][..., 1:].ne(IGNORE).sum() == padded["labels"][..., 1:].ne(IGNORE).sum()
    with torch.no_grad():
        assert model(**packed).loss.item() == pytest.approx(model(**padded).loss.item(), rel=SUM_RTOL)


def test_packed_row_restarts_positions_and_ignores_first_labels():
    data = [([1, 2, 3], [IGNORE, 12, 13]), ([4, 5], [14, 15]), ([6], [16])]
    row = PackedDataset(data, [np.array([0, 1, 2])])[0]
    assert row == {"input_ids": [1, 2, 3, 4, 5, 6], "labels": [IGNORE, 12, 13, IGNORE, 15, IGNORE],
                   "position_ids": [0, 1, 2, 0, 1, 0]}
    batch = PackingCollator(pad_id=99)([row, PackedDataset(data, [np.array([1])])[0]])
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6], [4, 5, 99, 99, 99, 99]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 2, 3]]  # padding: its own segment
    assert batch["labels"].tolist() == [[IGNORE, 12, 13, IGNORE, 15, IGNORE], [IGNORE, 15] + [IGNORE] * 4]


def test_best_fit_exact_bins():
    bins = pack_best_fit(np.array([7, 5, 4, 3, 2, 1]), 10)
    # 7 opens a bin (room 3); 5 opens one (room 5); 4 fits the room-5 bin best; 3 the room-3 one; 2 opens a
    # third bin (room 8); 1 goes to the tightest room left, the 5+4 bin's 1
    assert [b.tolist() for b in bins] == [[0, 3], [1, 2, 5], [4]]
    perfect = np.array([9, 1, 8, 2, 7, 3, 6, 4, 5, 5])
    assert len(pack_best_fit(perfect, 10)) == 5
    assert packing_efficiency(perfect, pack_best_fit(perfect, 10), 10) == 1.0


def test_rejects_lengths_outside_one_to_max():
    with pytest.raises(ValueError, match="1..8"):
        pack_best_fit(np.array([3, 9]), 8)
    with pytest.raises(ValueError):
        pack_best_fit(np.array([0, 3]), 8)
    assert pack_best_fit(np.array([], dtype=np.int64), 8) == []


def test_should_pack_only_when_it_cuts_computed_tokens():
    varied = np.random.default_rng(0).integers(10, 500, 1000)
    assert should_pack(varied, 1024, batch_size=4)  # padding to each batch's longest wastes ~40%
    assert not should_pack(varied, 1024, batch_size=1)  # nothing is padded at batch size 1
    assert not should_pack(np.full(100, 67), 256, batch_size=4)  # equal rows: no padding to save
    assert not should_pack(np.full(100, 1024), 1024, batch_size=4)  # already full rows
    assert not should_pack(np.array([], dtype=np.int64), 1024, batch_size=4)


def test_padded_tokens_pads_each_batch_to_its_longest():
    assert padded_tokens(np.array([5, 5, 5]), batch_size=3) == 15
    assert padded_tokens(np.array([1, 9]), batch_size=2) == 18
    assert padded_tokens(np.array([1, 9, 4]), batch_size=1) == 14


def test_million_lengths_pack_tightly_and_deterministically():
    lengths = np.random.default_rng(0).integers(1, 2049, 1_000_000)
    bins = pack_best_fit(lengths, 2048)
    members = np.concatenate(bins)
    assert np.array_equal(np.sort(members), np.arange(len(lengths)))  # every example exactly once
    sums = np.add.reduceat(lengths[members], np.cumsum([0] + [len(b) for b in bins[:-1]]))
    assert sums.max() <= 2048
    assert len(bins) <= 1.01 * np.ceil(lengths.sum() / 2048)  # within 1% of the lower bound
    assert packing_efficiency(lengths, bins, 2048) > 0.99
    again = pack_best_fit(lengths, 2048)
    assert len(again) == len(bins) and all(np.array_equal(a, b) for a, b in zip(again, bins, strict=True))
