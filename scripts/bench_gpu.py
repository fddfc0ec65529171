"""LoRA and QLoRA on a GPU at Phi-3-mini's size: tokens/s, peak GPU memory, LoRA-MFU (issue 16, item 6).

A randomly initialised model with Phi-3-mini-4k-instruct's configuration (the preset's architecture
facts, 3.8B parameters), bf16, sdpa attention, TF32 matmuls, sequence length 2048, batch 1, LoRA
r=8 alpha 8 on the preset's target modules, the loss through tuner's label loss on the second half
of each sequence. QLoRA loads the same weights as 4-bit NF4 (bitsandbytes) with bf16 compute. The
bf16 matmul rate is measured in the same process (8192^3 products), and LoRA-MFU is tokens/s x 4 x
parameters / that rate, as in bench_train.py. Targets: >= 40% LoRA-MFU; QLoRA under 16 GiB (Kaito
asks 72 Gi for this model).

Usage (on a CUDA machine): python scripts/bench_gpu.py [--steps 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def bf16_tflops(size: int = 8192, repeats: int = 10) -> float:
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12


def phi3_folder() -> Path:
    """Phi-3-mini's configuration with random bf16 weights, saved once (the 4-bit load reads a folder)."""
    from transformers import AutoModelForCausalLM, Phi3Config

    from tuner.spec.presets import get_preset

    out = Path(tempfile.gettempdir()) / "tuner-bench-phi3-mini"
    if (out / "config.json").is_file():
        return out
    facts = get_preset("phi-3-mini-4k-instruct").architecture
    config = Phi3Config(hidden_size=facts.hidden_size, intermediate_size=facts.intermediate_size,
                        num_hidden_layers=facts.num_hidden_layers, num_attention_heads=facts.num_attention_heads,
                        num_key_value_heads=facts.num_key_value_heads, vocab_size=facts.vocab_size,
                        max_position_embeddings=facts.max_position_embeddings, torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def run(method: str, folder: Path, steps: int, length: int) -> dict:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tuner.spec.presets import get_preset
    from tuner.train import label_loss

    torch.cuda.reset_peak_memory_stats()
    kwargs = {"dtype": torch.bfloat16, "attn_implementation": "sdpa", "device_map": {"": 0}}
    if method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    model.config.use_cache = False
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    preset = get_preset("phi-3-mini-4k-instruct")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=preset.lora_targets,
                                             task_type="CAUSAL_LM"))
    head = label_loss.output_head(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator(device="cuda").manual_seed(0)
    seconds, losses = [], []
    for _ in range(steps + 2):  # two warm-up steps
        ids = torch.randint(0, preset.architecture.vocab_size, (1, length), device="cuda", generator=generator)
        labels = ids.clone()
        labels[:, : length // 2] = -100
        torch.cuda.synchronize()
        started = time.perf_counter()
        loss = label_loss.label_loss(model, model, head, {"input_ids": ids, "labels": labels})
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
        losses.append(float(loss))
    timed = seconds[2:]
    tokens_per_s = length * len(timed) / sum(timed)
    parameters = preset.architecture.parameters
    result = {"tokens_per_s": round(tokens_per_s, 1), "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
              "final_loss": round(losses[-1], 4), "parameters": parameters}
    del model, optimizer
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    folder = phi3_folder()
    rate = bf16_tflops()
    results = {"bf16_matmul_tflops": round(rate, 1), "device": torch.cuda.get_device_name()}
    for method in ("lora", "qlora"):
        r = run(method, folder, args.steps, args.length)
        r["lora_mfu"] = round(r["tokens_per_s"] * 4 * r.pop("parameters") / (rate * 1e12), 3)
        results[method] = r
        print(f"{method:6} {r['tokens_per_s']:9.1f} tokens/s  peak {r['peak_gpu_gib']:6.2f} GiB  "
              f"LoRA-MFU {r['lora_mfu']:.1%}  loss {r['final_loss']:.4f}", flush=True)
    print(f"bf16 matmul rate {rate:.1f} TFLOP/s on {results['device']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
