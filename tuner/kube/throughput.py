"""Training throughput per GPU, for `tuner plan`'s duration estimate: a FLOPs model with measured factors.

    tokens/s per GPU = MFU x peak dense fp16/bf16 FLOP/s / (4 x parameters)

Four FLOPs per parameter per token: the forward pass (2N) and the input gradients (2N); LoRA skips
the frozen base's weight gradients (another 2N), as NVIDIA's NeMo performance summary counts it
(663 model TFLOP/s at 24,824 tokens/s for Llama-2-7B LoRA, 3.96 N per token; NVIDIA/NeMo
docs/source/performance/performance_summary.md at e2de75c). Gradient checkpointing's recompute is
folded into the MFU.

MFU (model FLOPs utilisation) 0.33 for LoRA reproduces, within +-25% for 15 of 17 figures
(geometric mean of measured/predicted 1.03), the A100 measurements of current stacks:
torchtune's README (Llama-3.2-3B, 2x4096 packed: 8,210 tokens/s), Unsloth's README quoting
LLaMA-Factory (Llama-2-7B rank 8, 4x1024: 2,954 with FlashAttention-2), QwenLM/Qwen's README
(Qwen-7B 1x2048: 3,151; Qwen-14B: 1,950), foundation-model-stack/fms-acceleration
scripts/benchmarks/refs/a100_80gb.csv (Mistral-7B r16, 4x4096: 3,324) and VectorInstitute/vectorlm
docs/reference_throughput.md (Llama-3-8B, 8x2048: 4,079). QLoRA's dequantisation costs a share
of that: 0.82 x on an A100 (torchtune 0.98, LLaMA-Factory 1.01, fms-acceleration 0.87, Qwen
0.71-0.96), 0.65 x on A10G/L4-class GPUs (litgpt config_hub/finetune/README.md runtimes: 0.49-0.84).
V100 and T4 (fp16, no FlashAttention-2) and H100 (bf16) have no published LoRA figures found:
their MFU is a guess, said so in the basis.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuner.kube.gpus import GpuSku
from tuner.spec.presets import Preset

FLOPS_PER_PARAMETER_TOKEN = 4
# Dense fp16/bf16 tensor TFLOP/s (NVIDIA datasheets advertise twice these, with sparsity): V100 SXM2,
# T4, A10, A100 from the datasheets as pytorch-lightning's fabric/utilities/throughput.py lists them;
# H100 SXM/NVL from pytorch/torchtitan tools/utils.py get_peak_flops; A10G measured (69.5 TFLOP/s bf16
# matmul, zzc0721/torch-performance-test-data issue 126: AWS publishes none); L4 (242 with sparsity)
# and L40S (733 with sparsity) from NVIDIA's product pages; H200 has H100 SXM's compute.
PEAK_TFLOPS = {"T4": 65, "V100": 125, "V100-32GB": 125, "A10": 125, "A10G": 70, "L4": 121, "L40S": 362,
               "A100-40GB": 312, "A100-80GB": 312, "H100-80GB": 989, "H100-NVL": 835, "H200": 989}
_MEASURED = {"A10", "A10G", "L4", "A100-40GB", "A100-80GB"}  # GPU types the factors were measured on (or alike)
LORA_MFU = 0.33
_GUESSED_MFU = {"T4": 0.2, "V100": 0.2, "V100-32GB": 0.2, "H100-80GB": 0.27, "H100-NVL": 0.27, "H200": 0.27}
_QLORA_SHARE = {"A100-40GB": 0.82, "A100-80GB": 0.82}
_QLORA_SHARE_SMALL_GPU = 0.65  # A10G, L4 and alike (litgpt)


@dataclass(frozen=True)
class Throughput:
    per_gpu: float  # tokens per second
    basis: str  # what the number rests on


def tokens_per_second(preset: Preset, sku: GpuSku, method: str) -> Throughput:
    """The expected training throughput of one GPU of `sku` for `preset` (see the module docstring)."""
    peak = PEAK_TFLOPS.get(sku.gpu_model)
    if peak is None:  # a GPU type given by --gpus/--gpu-memory: size it like an A10
        peak, model = PEAK_TFLOPS["A10"], "an A10-class GPU (unknown type)"
    else:
        model = sku.gpu_model
    mfu = _GUESSED_MFU.get(sku.gpu_model, LORA_MFU)
    if method == "qlora":
        mfu *= _QLORA_SHARE.get(sku.gpu_model, _QLORA_SHARE_SMALL_GPU)
    rate = mfu * peak * 1e12 / (FLOPS_PER_PARAMETER_TOKEN * preset.architecture.parameters)
    measured = "measured LoRA/QLoRA throughput on A100s" if sku.gpu_model in _MEASURED else (
        "a guessed MFU: no published LoRA figures for this GPU")
    return Throughput(rate, f"{mfu:.0%} of {model}'s {peak} TFLOP/s at {FLOPS_PER_PARAMETER_TOKEN} FLOPs per "
                            f"parameter and token; {measured}")
