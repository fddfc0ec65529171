"""Choosing the dtype training really runs in on this device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_NAMES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Precision:
    """What the config asked for, what runs, and why they differ (empty when they don't)."""

    requested: str
    dtype: torch.dtype
    device: str
    reason: str = ""

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def mixed_bf16(self) -> bool:
        return self.device == "cuda" and self.dtype == torch.bfloat16

    @property
    def mixed_fp16(self) -> bool:
        return self.device == "cuda" and self.dtype == torch.float16


def choose_precision(requested: str | None) -> Precision:
    """Map a requested dtype to one the device runs fast.

    A CPU has no fast half precision (bf16 matmuls ran ~9x slower than float32 here), so half
    precision becomes float32 there; a GPU without bf16 (V100, T4) gets float16 instead.
    """
    requested = requested or "auto"
    if not torch.cuda.is_available():
        if requested in ("bfloat16", "float16"):
            return Precision(requested, torch.float32, "cpu",
                             f"{requested} requested, but this CPU has no fast {requested}: training in float32")
        return Precision(requested, torch.float32, "cpu")
    if requested in ("bfloat16", "auto"):
        if torch.cuda.is_bf16_supported():
            return Precision(requested, torch.bfloat16, "cuda")
        return Precision(requested, torch.float16, "cuda",
                         f"{requested} requested, but {torch.cuda.get_device_name()} has no bfloat16: training in float16")
    return Precision(requested, _NAMES[requested], "cuda")
