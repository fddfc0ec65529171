"""Prepared examples on disk: an Arrow IPC file of token ids and loss masks, read memory-mapped.

Preparation streams rows in and writes them out chunk by chunk, and training reads them back
through a memory map, so neither side holds the whole dataset in Python objects: memory stays
flat as the data grows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

IGNORE = -100
SCHEMA = pa.schema([
    pa.field("input_ids", pa.list_(pa.int32())),
    pa.field("loss_mask", pa.list_(pa.uint8())),
])


class StoreWriter:
    """Appends encoded chunks (flat token arrays plus per-row lengths) to an Arrow IPC file."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_file(self._sink, SCHEMA)
        self.rows = 0

    def write(self, ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray) -> None:
        """Write rows given as flat int32 ids, flat uint8 loss mask, and each row's length."""
        if not len(lengths):
            return
        offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        batch = pa.record_batch([
            pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids.astype(np.int32, copy=False))),
            pa.ListArray.from_arrays(pa.array(offsets), pa.array(mask.astype(np.uint8, copy=False))),
        ], schema=SCHEMA)
        self._writer.write_batch(batch)
        self.rows += len(lengths)

    def close(self) -> None:
        self._writer.close()
        self._sink.close()


class ExampleStore:
    """Random access to prepared examples, memory-mapped: store[i] -> (input_ids, labels)."""

    def __init__(self, path: Path):
        self.path = path
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        self._batches = []  # zero-copy numpy views into the mapped file, one triple per record batch
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            ids, mask = batch.column("input_ids"), batch.column("loss_mask")
            self._batches.append((ids.offsets.to_numpy(), ids.values.to_numpy(), mask.values.to_numpy()))
        self._first_rows = np.cumsum([0] + [len(offsets) - 1 for offsets, _, _ in self._batches])

    def __len__(self) -> int:
        return int(self._first_rows[-1])

    @property
    def lengths(self) -> np.ndarray:
        """Token count of every example."""
        if not self._batches:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.diff(offsets) for offsets, _, _ in self._batches]).astype(np.int64)

    def __getitem__(self, index: int) -> tuple[list[int], list[int]]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        batch = int(np.searchsorted(self._first_rows, index, side="right")) - 1
        offsets, ids, mask = self._batches[batch]
        row = index - self._first_rows[batch]
        start, end = offsets[row], offsets[row + 1]
        labels = np.where(mask[start:end] == 1, ids[start:end], IGNORE)
        return ids[start:end].tolist(), labels.tolist()
