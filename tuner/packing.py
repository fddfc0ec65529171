"""Padding-free sequence packing: best-fit bins of examples, trained as one row that keeps samples apart.

Samples packed into one row stay independent only because transformers builds a block-diagonal causal
mask from `position_ids` that restart at 0 for each sample. In transformers 5.24 that happens in
`transformers/masking_utils.py`: `_preprocess_mask_arguments` calls `find_packed_sequence_indices(position_ids)`
only when `attention_mask is None and cache is None`, and `create_causal_mask` then ANDs the causal mask with
`packed_sequence_mask_function` (sdpa and eager alike). So a packed batch must carry NO 2D attention mask and the
model must run with `use_cache=False` (a `DynamicCache` is made when `use_cache` is true): otherwise the samples
of a row silently attend to each other. flash_attention_2 detects packing from position_ids only in a batch of
ONE row (`modeling_flash_attention_utils._is_packed_sequence`); sdpa/eager take any shape: so one row per batch.

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
MIN_ROW_CUT = 0.25  # should_pack: pack when it removes at least this share of the rows (forward passes)


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
    for index, length in zip(order.tolist(), lengths[order].tolist()):
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


def should_pack(lengths: np.ndarray, max_length: int) -> bool:
    """Pack when best-fit packing cuts the number of rows (forward passes) by at least MIN_ROW_CUT (25%).

    Packing costs nothing in loss (see the module docstring), so the only question is whether it saves
    work: rows near `max_length` (or ones too long to pair up) leave nothing to gain.
    """
    rows = len(lengths)
    return rows > 0 and len(pack_best_fit(lengths, max_length)) <= (1 - MIN_ROW_CUT) * rows


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
    """Concatenates a batch of packed rows into ONE padding-free row, with no attention_mask (see module doc)."""

    def __call__(self, batch: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return {key: torch.tensor([[value for row in batch for value in row[key]]])
                for key in ("input_ids", "labels", "position_ids")}
