"""GPU memory estimate: derived from the architecture, checked against peft, autograd and published figures."""

from __future__ import annotations

from functools import cache

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tuner.errors import UserError
from tuner.kube import memory_fit
from tuner.kube.gpus import lookup
from tuner.kube.memory_fit import GIB, check_fits, estimate, lora_parameters
from tuner.spec.config_sections import LoraSection
from tuner.spec.plan import effective_max_length
from tuner.spec.presets import Preset, get_preset
from tuner.spec.training_config import build_config

PHI3 = "phi-3-mini-4k-instruct"
SMOL = "smollm2-135m-instruct"


def hf_config(name: str, **changes):
    arch = get_preset(name).architecture.model_dump(exclude={"parameters", "rope_type"}) | changes
    return AutoConfig.for_model(arch.pop("model_type"), **arch)


@cache
def meta_model(name: str):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config(name))


def at_defaults(name: str, method: str, **training_arguments):
    preset = get_preset(name)
    config = build_config(method, {"TrainingArguments": training_arguments} if training_arguments else None)
    return estimate(preset, config, effective_max_length(config, preset))


@pytest.mark.parametrize("name", [SMOL, PHI3])
def test_linear_parameters_are_the_networks_nn_linear_weights(name):
    model = meta_model(name)
    linear = sum(module.weight.numel() for path, module in model.named_modules()
                 if isinstance(module, torch.nn.Linear) and path != "lm_head")
    assert memory_fit.linear_parameters(get_preset(name).architecture) == linear


@pytest.mark.parametrize(("name", "lora"), [
    (SMOL, {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0}),
    (PHI3, {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0}),
    (SMOL, {"r": 16, "target_modules": "all-linear"}),
    (SMOL, {"r": 4, "target_modules": ["o_proj"], "use_dora": True}),
    (SMOL, {"r": 8, "layers_to_transform": [0, 1], "rank_pattern": {"o_proj": 32}}),
], ids=["smollm2-kaito-default", "phi3-kaito-default", "smollm2-all-linear", "smollm2-dora", "smollm2-rank-pattern"])
def test_lora_parameter_count_equals_what_peft_reports(name, lora):
    from peft import LoraConfig, get_peft_model

    preset = get_preset(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(name))
    options = {"target_modules": list(preset.lora_target_modules)} | lora
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **options))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert lora_parameters(preset, LoraSection(**lora)) == trainable


def saved_activation_bytes(shape: dict, layers: int, method: str, seq: int, tmp_path) -> int:
    """Bytes autograd keeps in one forward of a SmolLM2-style model with LoRA, as tuner trains it on a GPU
    (bf16 autocast, SDPA; for qlora NF4 double-quant weights and prepare_model_for_kbit_training)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    torch.manual_seed(0)
    config = hf_config(SMOL, num_hidden_layers=layers, vocab_size=512, **shape)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    if method == "qlora":
        model.save_pretrained(tmp_path / str(layers))
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(tmp_path / str(layers), dtype=torch.bfloat16, device_map={"": "cpu"},
                                                     attn_implementation="sdpa", quantization_config=quantization)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=8, target_modules=list(get_preset(SMOL).lora_target_modules)))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def keep(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    ids = torch.randint(0, 512, (1, seq))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.autocast("cpu", torch.bfloat16):
        model(input_ids=ids, labels=ids)
    return sum(size for ptr, size in storages.items() if ptr not in params)


# qlora runs at a quarter of SmolLM2's width: bitsandbytes' 4-bit matmuls are slow on a CPU
@pytest.mark.parametrize(("method", "shape"), [
    ("lora", {}),
    ("qlora", {"hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 4, "num_key_value_heads": 2}),
])
def test_activation_bytes_match_what_autograd_keeps_per_layer(method, shape, tmp_path):
    seq = 256
    one, two = (saved_activation_bytes(shape, layers, method, seq, tmp_path) for layers in (1, 2))
    arch = get_preset(SMOL).architecture.model_copy(update=shape)
    estimated = memory_fit.activation_bytes_per_token_layer(arch, build_config(method), seq)
    assert estimated == pytest.approx((two - one) / seq, rel=0.05)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_estimate_grows_with_batch_size(method):
    totals = [at_defaults(PHI3, method, per_device_train_batch_size=b).total for b in (1, 2, 4)]
    assert totals == sorted(totals) and len(set(totals)) == 3


def test_estimate_grows_with_max_length():
    preset, config = get_preset(PHI3), build_config("qlora")
    totals = [estimate(preset, config, length).total for length in (256, 1024, 4096)]
    assert totals == sorted(totals) and len(set(totals)) == 3


def test_qlora_needs_less_than_lora_for_phi3():
    qlora, lora = at_defaults(PHI3, "qlora"), at_defaults(PHI3, "lora")
    assert qlora.base_weights < lora.base_weights / 2.5
    assert qlora.total < lora.total


def test_gradient_checkpointing_lowers_activations():
    off, on = at_defaults(PHI3, "lora"), at_defaults(PHI3, "lora", gradient_checkpointing=True)
    assert on.gradient_checkpointing and not off.gradient_checkpointing
    assert on.activations < off.activations / 4
    assert on.base_weights == off.base_weights


def test_an_8bit_optimizer_shrinks_the_lora_part():
    adamw, eight_bit = at_defaults(PHI3, "lora"), at_defaults(PHI3, "lora", optim="paged_adamw_8bit")
    assert eight_bit.lora_weights_grads_optimizer < adamw.lora_weights_grads_optimizer
    assert adamw.lora_weights_grads_optimizer == pytest.approx(12_582_912 * 18 / GIB)


def test_double_quantisation_saves_about_0_37_bits_per_linear_weight():
    preset = get_preset(PHI3)
    double = estimate(preset, build_config("qlora"), 1024)
    single = estimate(preset, build_config("qlora", {"QuantizationConfig": {"bnb_4bit_use_double_quant": False}}), 1024)
    saved_bits = (single.base_weights - double.base_weights) * GIB * 8
    assert saved_bits / memory_fit.linear_parameters(preset.architecture) == pytest.approx(0.5 - 0.127)


def test_phi3_qlora_at_kaito_defaults_fits_a_v100_with_room():
    need = at_defaults(PHI3, "qlora")
    assert (need.batch_size, need.max_length, need.gradient_checkpointing) == (1, 1024, False)
    check_fits(lookup("Standard_NC6s_v3"), need, PHI3)
    assert need.total < 0.8 * lookup("Standard_NC6s_v3").gpu_memory_gib


def test_phi3_lora_weights_alone_are_over_7_6_gb():
    need = at_defaults(PHI3, "lora")
    assert need.base_weights * GIB > 7.6e9
    assert need.total > 9


def test_a_clearly_too_big_job_is_refused_with_the_numbers():
    need = at_defaults(PHI3, "lora", per_device_train_batch_size=16, max_length=4096, gradient_checkpointing=False)
    with pytest.raises(UserError) as caught:
        check_fits(lookup("g4dn.xlarge"), need, PHI3)
    message = str(caught.value)
    assert message.startswith(f"resource.instanceType: {PHI3} lora needs about {need.total:.1f} GiB per GPU")
    assert "14.2 GiB usable (95%) of g4dn.xlarge's T4 (15 GiB)" in message and "batch 16 x 4096 tokens" in message
    assert "use method qlora" in message and "gradient_checkpointing: true" in message


def test_more_gpus_do_not_help_a_model_that_does_not_fit_one():
    need = at_defaults(PHI3, "lora", per_device_train_batch_size=8, max_length=4096)
    with pytest.raises(UserError, match="every data-parallel GPU holds the whole model"):
        check_fits(lookup("p3.16xlarge"), need, PHI3)


def test_the_refusal_names_an_instance_type_that_would_fit():
    need = at_defaults(PHI3, "lora", per_device_train_batch_size=2)
    with pytest.raises(UserError, match=r"e\.g\. Standard_NV36ads_A10_v5: A10, 22\.5 GiB"):
        check_fits(lookup("g4dn.xlarge"), need, PHI3)


def llama(name: str, **facts) -> Preset:
    """A Llama-family shape; the facts are torchtune's model builders (torchtune/models/llama2,
    llama3_1 _model_builders.py), the counts equal their published parameter counts."""
    architecture = {"model_type": "llama", "head_dim": facts["hidden_size"] // facts["num_attention_heads"],
                    "max_position_embeddings": 131072, "parameters": 0, **facts}
    preset = Preset.model_validate({
        "name": name, "description": name, "license": "other", "context_length": 131072,
        "source": {"hub_id": f"meta-llama/{name}", "revision": "0" * 40}, "architecture": architecture,
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "chat_template_family": "llama"})
    counted = preset.architecture.counted_parameters()
    return preset.model_copy(update={"architecture": preset.architecture.model_copy(update={"parameters": counted})})


LLAMA2_7B = llama("Llama-2-7b", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
LLAMA31_8B = llama("Llama-3.1-8B", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
LLAMA_FACTORY = "LLaMA-Factory wiki, Performance-comparison (2024-04-15): LLaMA-2-7B, LoRA r8 on all linears"
UNSLOTH = ("unslothai/unsloth README.md @0acd1c7e lines 398-407 (unsloth.ai/blog/llama3-3), 'HF + FA2' column: "
           "Llama-3.1-8B QLoRA r32 on all linears, batch 1, the longest rows that fit the GPU")


@pytest.mark.parametrize("preset,method,batch,length,rank,measured,source", [
    (LLAMA2_7B, "lora", 4, 1024, 8, 18, LLAMA_FACTORY + ", bf16, batch 4"),
    (LLAMA2_7B, "qlora", 4, 1024, 8, 9, LLAMA_FACTORY + ", 4-bit, batch 4"),
    (LLAMA2_7B, "qlora", 1, 1024, 8, 6, LLAMA_FACTORY + ", 4-bit, batch 1, FlashAttention-2"),
    (LLAMA2_7B, "qlora", 1, 4096, 8, 9, LLAMA_FACTORY + ", 4-bit, batch 1, FlashAttention-2"),
    (LLAMA2_7B, "qlora", 1, 8192, 8, 12, LLAMA_FACTORY + ", 4-bit, batch 1, FlashAttention-2"),
    (LLAMA2_7B, "qlora", 1, 16384, 8, 19, LLAMA_FACTORY + ", 4-bit, batch 1, FlashAttention-2"),
    (LLAMA31_8B, "qlora", 1, 5789, 32, 24, UNSLOTH + ": 5,789 tokens on 24 GB"),
    (LLAMA31_8B, "qlora", 1, 12264, 32, 40, UNSLOTH + ": 12,264 tokens on 40 GB"),
    (LLAMA31_8B, "qlora", 1, 28454, 32, 80, UNSLOTH + ": 28,454 tokens on 80 GB"),
], ids=["lf-lora-b4", "lf-qlora-b4", "lf-qlora-1k", "lf-qlora-4k", "lf-qlora-8k", "lf-qlora-16k",
        "unsloth-24gb", "unsloth-40gb", "unsloth-80gb"])
def test_the_estimate_is_within_25_percent_of_published_peaks(preset, method, batch, length, rank, measured, source):
    """Peak GPU memory of the same stack (transformers + peft + bitsandbytes, gradient checkpointing on).
    Left out, and why: LLaMA-Factory's 32k row (1.30x: its QLoRA keeps norms in bf16, tuner's
    prepare_model_for_kbit_training upcasts them to fp32, so tuner really holds more); PEFT's
    MetaMathQA Llama-3.2-3B run (the longest batch is not published: 1.03x at 550 tokens, 1.29x at
    the 768 cap); torchtune's README table (compile, chunked loss, activation offloading and bf16
    embeddings: 1.7-5.6x, a lower bound for a different stack)."""
    config = build_config(method, {"TrainingArguments": {"per_device_train_batch_size": batch,
                                                         "gradient_checkpointing": True},
                                   "LoraConfig": {"r": rank, "lora_alpha": 2 * rank,
                                                  "target_modules": list(preset.lora_target_modules)}})
    assert estimate(preset, config, length).total == pytest.approx(measured, rel=0.25), source


def test_the_parameter_counts_of_the_validation_shapes_are_the_published_ones():
    assert LLAMA2_7B.architecture.parameters == 6_738_415_616
    assert LLAMA31_8B.architecture.parameters == 8_030_261_248


