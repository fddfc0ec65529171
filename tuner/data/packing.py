"""Sequence packing: best-fit bins of examples, each trained as one row that keeps its samples apart.

Samples packed into one row stay independent only because transformers builds a block-diagonal causal
mask from `position_ids` that restart at 0 for each sample. In transformers 5.24 that happens in
`transformers/masking_utils.py`: `_preprocess_mask_arguments` calls `find_packed_sequence_indices(position_ids)`
only when `attention_mask is None and cache is None`, and `create_causal_mask` then ANDs the causal mask with
`packed_sequence_mask_function` (sdpa and eager alike). So a packed batch must carry NO 2D attention mask and the
model must run with `use_cache=False` (a `DynamicCache` is made when `use_cache` is true): otherwise the samples
of a row silently attend to each other. sdpa and eager find the segments of every row of a batch;
flash_attention_2 detects packing from position_ids only in a batch of ONE row
(`modeling_flash_attention_utils._is_packed_sequence`), so tuner keeps sdpa/eager when packing.

Loss normalisation is unchanged: the causal-LM loss and the Trainer's `num_items_in_batch` both count the targets
`labels[..., 1:] != -100`; masking each sample's first label removes exactly the one cross-sample prediction per
boundary, so a packed batch has the same targets, and the same summed and mean loss, as the padded batch.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

IGNORE = -100
MIN_TOKEN_CUT = 0.2  # should_pack: pack when it removes at least this share of the computed tokens


class ExampleStore(Protocol):
    """Anything indexable as `store[i] -> (input_ids, labels)`: a list, a memory-mapped store."""

    def __getitem__(self, index: int) -> tuple[Sequence[int], Sequence[int]]: ...


def pack_best_fit(lengths: np.ndarray, max_length: int) -> list[np.ndarray]:
    """Best-fit decreasing: each example, longest first, goes into the open bin it fills most tightly.

    Returns bins of example indices (ascending within a bin; bins in the order they were opened) whose
    lengths sum to at most `max_length`. Deterministic. Lengths must lie in 1..max_length (ValueError).
    O(n log n): one sort, then per example a bisect over the distinct remaining capacities (<= max_length).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1:
        raise ValueError("lengths must be one-dimensional")
    if lengths.size and (lengths.min() < 1 or lengths.max() > max_length):
        raise ValueError(f"every length must lie in 1..{max_length} (truncate or drop longer examples first); "
                         f"got {lengths.min()}..{lengths.max()}")
    order = np.argsort(-lengths, kind="stable")
    capacities: list[int] = []  # sorted distinct remaining capacities (> 0) of the open bins
    bins_with: list[list[int]] = [[] for _ in range(max_length + 1)]  # capacity -> ids of open bins with it
    bin_of = [0] * len(lengths)
    opened = 0
    for index, length in zip(order.tolist(), lengths[order].tolist(), strict=True):
        at = bisect_left(capacities, length)
        if at == len(capacities):
            chosen, left = opened, max_length - length
            opened += 1
        else:
            capacity = capacities[at]
            chosen, left = bins_with[capacity].pop(), capacity - length
            if not bins_with[capacity]:
                del capacities[at]
        bin_of[index] = chosen
        if left:
            if not bins_with[left]:
                insort(capacities, left)
            bins_with[left].append(chosen)
    bin_ids = np.asarray(bin_of, dtype=np.int64)
    members = np.argsort(bin_ids, kind="stable")
    return np.split(members, np.cumsum(np.bincount(bin_ids, minlength=opened))[:-1]) if opened else []


def packing_efficiency(lengths: np.ndarray, bins: Sequence[np.ndarray], max_length: int) -> float:
    """Filled tokens / (bins x max_length); 0.0 for no bins."""
    if not bins:
        return 0.0
    filled = int(np.asarray(lengths, dtype=np.int64)[np.concatenate(bins)].sum())
    return filled / (len(bins) * max_length)


def should_pack(lengths: np.ndarray, max_length: int, batch_size: int, seed: int = 0,
                bins: list[np.ndarray] | None = None) -> bool:
    """Pack when it cuts the tokens the model computes (padding included) by at least MIN_TOKEN_CUT.

    Packing costs nothing in loss (see the module docstring), so the only question is whether it
    saves work. Unpacked, every batch is padded to its longest row; packed, bins are nearly full.
    Both are costed over the same seeded random batching: rows of similar lengths, rows near
    `max_length`, or a batch size of 1 leave little padding to save, and packing stays off.
    `bins` saves packing again when the caller already has `pack_best_fit(lengths, max_length)`.
    """
    if not len(lengths):
        return False
    bins = pack_best_fit(lengths, max_length) if bins is None else bins
    bin_lengths = np.array([int(lengths[b].sum()) for b in bins])
    return padded_tokens(bin_lengths, batch_size, seed) <= (1 - MIN_TOKEN_CUT) * padded_tokens(lengths, batch_size, seed)


def padded_tokens(lengths: np.ndarray, batch_size: int, seed: int = 0) -> int:
    """Tokens computed when rows in a seeded random order are batched and padded to each batch's longest."""
    shuffled = np.random.default_rng(seed).permutation(np.asarray(lengths))
    padded = np.pad(shuffled, (0, -len(shuffled) % batch_size)).reshape(-1, batch_size)
    return int((padded.max(axis=1) * batch_size).sum())


class PackedDataset(torch.utils.data.Dataset):
    """One item per bin: its examples concatenated, positions restarting at 0 and each first label ignored."""

    def __init__(self, examples: ExampleStore, bins: Sequence[np.ndarray]):
        self.examples = examples
        self.bins = bins

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        parts = [self.examples[int(i)] for i in self.bins[index]]
        sizes = [len(ids) for ids, _ in parts]
        if any(len(ids) != len(labels) or len(ids) == 0 for ids, labels in parts):
            raise ValueError(f"bin {index}: every example needs as many labels as input_ids, and at least one")
        starts = np.cumsum([0, *sizes[:-1]])
        labels = np.concatenate([np.asarray(labels, dtype=np.int64) for _, labels in parts])
        # a sample's first token would be predicted from the previous sample's last one: no target there
        labels[starts] = IGNORE
        positions = np.arange(sum(sizes)) - np.repeat(starts, sizes)
        return {"input_ids": np.concatenate([np.asarray(ids, dtype=np.int64) for ids, _ in parts]).tolist(),
                "labels": labels.tolist(), "position_ids": positions.tolist()}


class PackingCollator:
    """Stacks packed rows into a batch without an attention mask (see the module docstring).

    Shorter rows are filled up to the longest with pad tokens that form a segment of their own
    (positions restarting at 0, no loss), so no real token can attend to them and each row's
    attention stays within that row: cost grows with the batch, not with its square.
    """

    def __init__(self, pad_id: int = 0):
        self.pad_id = pad_id

    def __call__(self, batch: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in batch)
        fill = {"input_ids": lambda n: [self.pad_id] * n, "labels": lambda n: [IGNORE] * n,
                "position_ids": lambda n: list(range(n))}
        return {key: torch.tensor([row[key] + make(width - len(row[key])) for row in batch])
                for key, make in fill.items()}
