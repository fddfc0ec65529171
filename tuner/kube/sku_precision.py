"""The training config as it should train on an instance type: bfloat16 settings become float16 on
GPUs without native bfloat16 (compute capability below 8.0: V100, T4), at render time, so the
rendered ConfigMap says what will really run. tuner.train.precision makes the same choice again at
run time for the GPU the pod really lands on."""

from __future__ import annotations

import dataclasses

from tuner.kube.gpus import GpuSku
from tuner.spec.training_config import TrainingConfig


def for_sku(config: TrainingConfig, sku: GpuSku) -> tuple[TrainingConfig, list[str]]:
    """The config as it should train on `sku`, and one note per change.

    On a GPU without bfloat16 the half-precision settings move to float16: ModelConfig.torch_dtype
    and QuantizationConfig.bnb_4bit_compute_dtype bfloat16 -> float16, and TrainingArguments gets
    fp16: true instead of bf16 (unless the config trains in float32). Otherwise nothing changes.
    """
    if sku.bf16:
        return config, []
    gpu = f"{sku.name} ({sku.gpu_model})"
    model, quantization, args = {}, {}, {}
    notes = []
    if config.model.torch_dtype == "bfloat16":
        model["torch_dtype"] = "float16"
        notes.append(f"precision: {gpu} has no bf16: ModelConfig.torch_dtype bfloat16 -> float16")
    if config.quantization.bnb_4bit_compute_dtype == "bfloat16":
        quantization["bnb_4bit_compute_dtype"] = "float16"
        notes.append(f"precision: {gpu} has no bf16: QuantizationConfig.bnb_4bit_compute_dtype bfloat16 -> float16")
    training = config.training_arguments
    dtype = model.get("torch_dtype", config.model.torch_dtype)
    half = dtype in (None, "auto", "float16") or training.bf16 or training.fp16
    if half and (training.bf16 or not training.fp16):
        change = "bf16 true -> fp16 true" if training.bf16 else "fp16 true"
        args.update(bf16=None, fp16=True)
        notes.append(f"precision: {gpu} has no bf16: TrainingArguments.{change} (float16 mixed precision)")
    if not notes:
        return config, []
    return dataclasses.replace(config, model=config.model.model_copy(update=model),
                               quantization=config.quantization.model_copy(update=quantization),
                               training_arguments=training.model_copy(update=args)), notes
