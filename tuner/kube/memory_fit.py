"""How much memory one GPU needs to LoRA/QLoRA-train a preset, derived from its architecture.

The estimate is the sum of four parts, in GiB:

* base weights: every parameter at 2 bytes (bfloat16/float16; 4 for float32) for lora. For qlora
  the linear layers are 4-bit (NF4/FP4) plus quantisation constants (one absmax per 64 weights:
  fp32 = 0.5 bit/param, or with double quantisation 8-bit absmax + one fp32 per 256 blocks =
  0.127 bit/param), or 1 byte/param at 8-bit. The rest (embeddings, lm_head, norms) is NOT kept
  at 16 bits: tuner calls peft's `prepare_model_for_kbit_training`, which casts every
  non-quantised parameter to float32, so it is counted at 4 bytes (0.73 GiB for Phi-3-mini).
* LoRA weights + grads + optimizer: r x (in + out) per targeted linear per layer (fused Phi-3
  `qkv_proj`/`gate_up_proj` included; k/v use `num_key_value_heads`). peft keeps adapters in
  float32: 4 bytes weight + 4 grad + the optimizer's states (AdamW: 2 x 4; 8-bit optimizers
  2 x 1) + 2 for the bfloat16 copy autocast caches during the step.
* activations: what autograd keeps for the backward pass, per token per decoder layer, measured
  on the real transformers/peft modules (saved-tensor hooks, CPU, bf16 autocast, SDPA attention):
  24*hidden + 8*intermediate + 4*kv_dim bytes for lora (the fp32 RMSNorm internals, the q/k/v/o
  and SwiGLU tensors); for qlora the MLP term is 14*intermediate, because the upcast norms make
  bitsandbytes return float32 outputs. Eager attention adds ~6*heads*seq bytes (the score
  matrix). With gradient checkpointing only each layer's input is kept (2*hidden bytes, 4 for
  qlora's float32 residual stream), and during backward one layer recomputed plus its gradients
  (two layers' worth; one without checkpointing). The loss holds batch*seq*vocab*16 bytes (bf16
  logits, the fp32 upcast, log-softmax and its gradient), freed before the layers' backward starts,
  so the larger of the two peaks counts; with `use_liger_kernel` the logits never exist. Every row
  counts as `max_length` tokens: packed blocks and the longest padded batch reach it.
* overhead: 1 GiB for the CUDA context, cuBLAS workspaces and kernels, plus 10% of the rest for
  allocator fragmentation and transient buffers (bitsandbytes' dequantised weight tiles, DDP's
  gradient buckets).

Gradient checkpointing is off unless `TrainingArguments.gradient_checkpointing` (or its new name
`activation_checkpointing`) is true: tuner builds transformers' `TrainingArguments`, whose default
is False, not TRL's `SFTConfig` (whose default is True).

Validation. The activation coefficients were fitted to the saved-tensor bytes of llama and phi3
decoder layers of several widths and reproduce them within 4% (a full-size Phi-3-mini layer keeps
146 kB/token, estimated 152 kB/token); tests/kube/test_memory_fit.py re-measures a layer for lora
and for qlora. LoRA parameter counts equal what peft reports for the same LoraConfig. The totals
are checked against published peak memory of the same stack (transformers + peft, bitsandbytes)
within +-25%: LLaMA-Factory's performance comparison, Unsloth's "HF + FA2" column, PEFT's
MetaMathQA benchmark (the test cites each). torchtune's figures (compile, chunked loss, activation
offloading, bf16 embeddings) are far below any HF-stack run: a lower bound, not a target.

Data parallelism does not split the model: with N GPUs every GPU holds the whole estimate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tuner.errors import UserError
from tuner.kube.gpus import GpuSku, smallest_with
from tuner.spec.config_sections import LoraSection
from tuner.spec.presets import Architecture, Preset
from tuner.spec.training_config import TrainingConfig

GIB = 1024 ** 3
USABLE_FRACTION = 0.95  # of the memory CUDA reports: the estimate's margin of error
CUDA_CONTEXT_GIB = 1.0
FRAGMENTATION = 0.10
# per token per vocabulary entry: bf16 logits from autocast, the loss's fp32 upcast, fp32 log-softmax and its
# gradient (12 put Unsloth's measured longest rows 7% under their GPUs; 16 leaves them just over, the safe side)
LOGITS_BYTES = 16

_FUSED = {"phi3"}  # model types with qkv_proj / gate_up_proj


@dataclass(frozen=True)
class MemoryEstimate:
    """Memory one GPU needs, in GiB, by part."""

    method: str
    base_weights: float
    lora_weights_grads_optimizer: float
    activations: float
    overhead: float
    total: float
    lora_parameters: int
    batch_size: int
    max_length: int
    gradient_checkpointing: bool
    shards: int = 1  # GPUs the weights are sharded over (FSDP); 1: every GPU holds them all

    def describe(self) -> str:
        """One line: the total and its parts."""
        checkpointing = "with" if self.gradient_checkpointing else "no"
        sharded = f" (sharded over {self.shards} GPUs)" if self.shards > 1 else ""
        return (f"{self.total:.1f} GiB = weights {self.base_weights:.1f}{sharded} + LoRA weights/grads/optimizer "
                f"{self.lora_weights_grads_optimizer:.1f} ({self.lora_parameters:,} params) + activations "
                f"{self.activations:.1f} (batch {self.batch_size} x {self.max_length} tokens, {checkpointing} "
                f"gradient checkpointing) + overhead {self.overhead:.1f}")


def linear_shapes(arch: Architecture) -> dict[str, tuple[str, int, int]]:
    """Each decoder layer's linear modules: name -> (parent, in_features, out_features)."""
    h, i = arch.hidden_size, arch.intermediate_size
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
    if arch.model_type in _FUSED:
        return {"qkv_proj": ("self_attn", h, q + 2 * kv), "o_proj": ("self_attn", q, h),
                "gate_up_proj": ("mlp", h, 2 * i), "down_proj": ("mlp", i, h)}
    return {"q_proj": ("self_attn", h, q), "k_proj": ("self_attn", h, kv), "v_proj": ("self_attn", h, kv),
            "o_proj": ("self_attn", q, h), "gate_proj": ("mlp", h, i), "up_proj": ("mlp", h, i),
            "down_proj": ("mlp", i, h)}


def linear_parameters(arch: Architecture) -> int:
    """Parameters in the decoder layers' linear modules (what bitsandbytes quantises)."""
    return arch.num_hidden_layers * sum(n_in * n_out for _, n_in, n_out in linear_shapes(arch).values())


def lora_parameters(preset: Preset, lora: LoraSection) -> int:
    """Trainable parameters peft adds for this LoraConfig (target_modules default: the preset's)."""
    arch = preset.architecture
    targets = lora.target_modules or preset.lora_targets
    layers = lora.layers_to_transform
    layers = {layers} if isinstance(layers, int) else set(layers) if layers is not None else None
    rank_pattern = lora.rank_pattern or {}
    total = 0
    for layer in range(arch.num_hidden_layers):
        if layers is not None and layer not in layers:
            continue
        for name, (parent, n_in, n_out) in linear_shapes(arch).items():
            key = f"model.layers.{layer}.{parent}.{name}"
            if not _targeted(key, targets):
                continue
            rank = next((int(r) for pattern, r in rank_pattern.items()
                         if re.match(rf"(.*\.)?({pattern})$", key)), lora.r)
            total += rank * (n_in + n_out) + (n_out if lora.use_dora else 0)
    for module in lora.modules_to_save or ():
        if module in ("lm_head", "embed_tokens"):
            total += arch.vocab_size * arch.hidden_size
    return total


def _targeted(key: str, targets) -> bool:
    if isinstance(targets, str):
        if targets == "all-linear":
            return True
        return re.fullmatch(targets, key) is not None
    return any(key == target or key.endswith(f".{target}") for target in targets)


def activation_bytes_per_token_layer(arch: Architecture, config: TrainingConfig, max_length: int) -> float:
    """Bytes autograd keeps per token per decoder layer without gradient checkpointing."""
    h, i = arch.hidden_size, arch.intermediate_size
    kv = arch.num_key_value_heads * arch.head_dim
    per_layer = 24 * h + (14 if config.quantized else 8) * i + 4 * kv
    if config.model.attn_implementation == "eager":
        per_layer += 6 * arch.num_attention_heads * max_length
    return per_layer * _precision_scale(config)


def estimate(preset: Preset, config: TrainingConfig, max_length: int, shards: int = 1) -> MemoryEstimate:
    """Memory per GPU for training `preset` with `config` on rows of up to `max_length` tokens.

    With `shards` > 1 (FSDP) each GPU keeps 1/shards of the weights and of the LoRA states, plus the
    units FSDP gathers whole for their forward and backward: two decoder layers (the one computing
    and the next, prefetched) or the root's embeddings and output head, whichever is larger.
    """
    arch = preset.architecture
    args = config.training_arguments
    batch = args.per_device_train_batch_size
    checkpointing = args.checkpointing
    half = _precision_scale(config) == 1

    linear = linear_parameters(arch)
    other = arch.parameters - linear
    q = config.quantization
    if q.load_in_4bit:
        constants = 0.127 if q.bnb_4bit_use_double_quant else 0.5
        base = linear * (4 + constants) / 8 + other * 4
    elif q.load_in_8bit:
        base = linear * 1 + other * 4
    else:
        base = arch.parameters * (2 if half else 4)

    trainable = lora_parameters(preset, config.lora)
    per_param = 4 + 4 + _optimizer_bytes(args.optim) + (2 if half else 0)
    lora = trainable * per_param / shards
    if shards > 1:
        per_weight = base / arch.parameters
        layer_weights = linear / arch.num_hidden_layers * per_weight
        root = arch.vocab_size * arch.hidden_size * (1 if arch.tie_word_embeddings else 2) * per_weight
        base = base / shards + max(2 * layer_weights, root)

    tokens = batch * max_length
    layer = activation_bytes_per_token_layer(arch, config, max_length)
    if checkpointing:
        kept = arch.num_hidden_layers * arch.hidden_size * (4 if config.quantized else 2) * _precision_scale(config)
        stored, in_flight = kept, 2 * layer  # layer inputs; the layer recomputed and its gradients
    else:
        stored, in_flight = arch.num_hidden_layers * layer, layer
    # the loss's tensors are freed before the layers' backward pass starts: the larger of the two peaks counts;
    # Liger's fused linear cross-entropy never holds the logits
    logits = 0 if config.training_arguments.values().get("use_liger_kernel") else arch.vocab_size * LOGITS_BYTES
    activations = tokens * (stored + max(in_flight, logits))

    parts = [base / GIB, lora / GIB, activations / GIB]
    overhead = CUDA_CONTEXT_GIB + FRAGMENTATION * sum(parts)
    return MemoryEstimate(
        method=config.method, base_weights=parts[0], lora_weights_grads_optimizer=parts[1], activations=parts[2],
        overhead=overhead, total=sum(parts) + overhead, lora_parameters=trainable, batch_size=batch,
        max_length=max_length, gradient_checkpointing=checkpointing, shards=shards)


def smallest_gpu(preset: Preset, config: TrainingConfig, max_length: int) -> tuple[MemoryEstimate, GpuSku | None]:
    """The estimate, and the smallest known GPU type that holds it (None: no single GPU does)."""
    need = estimate(preset, config, max_length)
    return need, smallest_with(need.total / USABLE_FRACTION)


def check_fits(sku: GpuSku, estimate: MemoryEstimate, preset_name: str) -> None:
    """UserError when the estimate exceeds 95% of one GPU's memory (each GPU holds a whole replica)."""
    usable = sku.gpu_memory_gib * USABLE_FRACTION
    if estimate.total <= usable:
        return
    fixes = []
    if estimate.method == "lora":
        fixes.append("use method qlora (4-bit base weights)")
    if estimate.batch_size > 1:
        fixes.append("lower TrainingArguments.per_device_train_batch_size (raise gradient_accumulation_steps "
                     "to keep the effective batch)")
    fixes.append(f"lower TrainingArguments.max_length (now {estimate.max_length})")
    if not estimate.gradient_checkpointing:
        fixes.append("set TrainingArguments.gradient_checkpointing: true")
    bigger = smallest_with(estimate.total / USABLE_FRACTION)
    fixes.append(f"use an instance type with more memory per GPU (e.g. {bigger.name}: {bigger.gpu_model}, "
                 f"{bigger.gpu_memory_gib:g} GiB)" if bigger else "use an instance type with more memory per GPU")
    if sku.gpu_count == 1 and estimate.shards == 1:
        gpus = f"{sku.name}'s {sku.gpu_model} ({sku.gpu_memory_gib:g} GiB)"
    elif estimate.shards > 1:
        gpus = (f"each of the {estimate.shards} {sku.gpu_model} GPUs ({sku.gpu_memory_gib:g} GiB each) the weights "
                "are sharded over (FSDP)")
    else:
        gpus = (f"each of {sku.name}'s {sku.gpu_count} {sku.gpu_model} GPUs ({sku.gpu_memory_gib:g} GiB each; "
                f"every data-parallel GPU holds the whole model)")
    raise UserError(
        f"{preset_name} {estimate.method} needs about {estimate.total:.1f} GiB per GPU, more than the "
        f"{usable:.1f} GiB usable ({USABLE_FRACTION:.0%}) of {gpus}; need: {estimate.describe()}",
        where="resource.instanceType", fix="; or ".join(fixes))


def _optimizer_bytes(optim: str) -> float:
    """Optimizer state bytes per trainable parameter for a TrainingArguments `optim` name."""
    name = optim.lower()
    if "adafactor" in name:
        return 0.0  # factored second moments: negligible for LoRA matrices
    states = 1 if any(word in name for word in ("lion", "sgd", "rmsprop", "adagrad")) else 2
    width = 1 if "8bit" in name else 0.5 if "4bit" in name else 4
    return states * width


def _precision_scale(config: TrainingConfig) -> int:
    """1 when training computes in 16 bits, 2 when everything stays float32."""
    dtype = config.model.torch_dtype
    compute = config.quantization.bnb_4bit_compute_dtype
    if config.quantization.load_in_4bit:
        return 2 if compute == "float32" else 1
    return 2 if dtype == "float32" else 1
