"""Choosing the dtype training really runs in, for the device the process really landed on.

bfloat16 needs compute capability 8.0 (Ampere) or newer. A V100 or T4 only emulates it (slowly),
so Kaito's bfloat16 defaults become float16 there: in the rendered config (tuner.kube.sku_precision)
and again here, at run time, for whatever GPU the pod really lands on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
        return self.device == "cuda" and self.name == "bfloat16"

    @property
    def mixed_fp16(self) -> bool:
        return self.device == "cuda" and self.name == "float16"


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
        if _cuda_has_bf16():
            return Precision(requested, torch.bfloat16, "cuda")
        return Precision(requested, torch.float16, "cuda",
                         f"{requested} requested, but {torch.cuda.get_device_name()} has no bfloat16: training in float16")
    return Precision(requested, getattr(torch, requested), "cuda")


def _cuda_has_bf16() -> bool:
    """Native bfloat16 on the current GPU; emulation (what a V100 or T4 offers) does not count."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # a torch without the keyword
        return bool(torch.cuda.is_bf16_supported())
