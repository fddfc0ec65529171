"""Choosing the dtype training really runs in: at render time for the SKU, at run time for the device.

bfloat16 needs compute capability 8.0 (Ampere) or newer. A V100 or T4 only emulates it (slowly),
so Kaito's bfloat16 defaults become float16 there: in the rendered config (`for_sku`) and again at
run time (`choose_precision`) for whatever GPU the pod really lands on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from tuner.gpus import GpuSku
    from tuner.training_config import TrainingConfig


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
    import torch  # here, not at the top: `tuner render` uses for_sku and must not import torch

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
    import torch

    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # a torch without the keyword
        return bool(torch.cuda.is_bf16_supported())


def for_sku(config: TrainingConfig, sku: GpuSku) -> tuple[TrainingConfig, list[str]]:
    """The config as it should train on `sku`, and one note per change.

    On a GPU without bfloat16 the half-precision settings move to float16: ModelConfig.torch_dtype
    and QuantizationConfig.bnb_4bit_compute_dtype bfloat16 -> float16, and TrainingArguments gets
    fp16: true instead of bf16 (unless the config trains in float32). Otherwise nothing changes.
    """
    if sku.bf16:
        return config, []
    model, quantization, args = dict(config.model), dict(config.quantization), dict(config.training_arguments)
    gpu = f"{sku.name} ({sku.gpu_model})"
    notes = []
    if model.get("torch_dtype") == "bfloat16":
        model["torch_dtype"] = "float16"
        notes.append(f"precision: {gpu} has no bf16: ModelConfig.torch_dtype bfloat16 -> float16")
    if quantization.get("bnb_4bit_compute_dtype") == "bfloat16":
        quantization["bnb_4bit_compute_dtype"] = "float16"
        notes.append(f"precision: {gpu} has no bf16: QuantizationConfig.bnb_4bit_compute_dtype bfloat16 -> float16")
    half = model.get("torch_dtype") in (None, "auto", "float16") or args.get("bf16") or args.get("fp16")
    if half and (args.get("bf16") or not args.get("fp16")):
        change = "bf16 true -> fp16 true" if args.get("bf16") else "fp16 true"
        args.pop("bf16", None)
        args["fp16"] = True
        notes.append(f"precision: {gpu} has no bf16: TrainingArguments.{change} (float16 mixed precision)")
    if not notes:
        return config, []
    return dataclasses.replace(config, model=model, quantization=quantization, training_arguments=args), notes
