"""Training speed against the peers, in one invocation, same data, seed, LoRA and steps:

  kaito_defaults  TRL's SFTTrainer as Kaito's tuning runs it: no packing, loss on every token;
  trl_best        TRL's SFTTrainer at its best: best-fit-decreasing packing, padding-free batches,
                  the loss on every answer only (assistant_only_loss, with TRL's generation-tagged
                  ChatML template);
  tuner           `tuner run` with Kaito's LoRA defaults (tuner packs when it pays, masks the prompt,
                  computes the loss where the labels are).

Each runs in a fresh process: real (non-padding) tokens/s, label tokens/s, seconds from process start
to the start of the first training step (against a process that only imports torch, transformers and
peft and loads the model), peak RSS, the final loss; and the fp32 matmul rate measured in the same
run, with the LoRA-MFU it implies (4 FLOPs per parameter per token, tuner.kube.throughput). LoRA r=8,
alpha 8 on every linear layer, batch 1, max_length 512, the chitchat conversations of ../shared/data.

Usage: python scripts/bench_train.py [--quick] [--memory] [--json FILE] [--steps N]
  --quick   the tiny model and SmolLM2 at few steps (under 10 minutes on 2 cores)
  --memory  adds a model with a tiny hidden size and Qwen2.5's 151,936 vocabulary at 4096 tokens
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "messages" / "chitchat-messages.parquet"
VARIANTS = ("kaito_defaults", "trl_best", "tuner")


def matmul_gflops(size: int = 1024, repeats: int = 10, trials: int = 7) -> float:
    """The best of `trials` timings: fp32 on a CPU; on a GPU bf16 at 8192 (what training runs there).
    The best, because one timing on a shared 2-core machine varied from 77 to 190 GFLOP/s."""
    import torch

    cuda = torch.cuda.is_available()
    size = 8192 if cuda else size
    options = {"device": "cuda", "dtype": torch.bfloat16} if cuda else {}
    a, b = torch.randn(size, size, **options), torch.randn(size, size, **options)
    torch.matmul(a, b)
    best = 0.0
    for _ in range(trials):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            torch.matmul(a, b)
        if cuda:
            torch.cuda.synchronize()
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9)
    return best


def model_folder(kind: str, work: Path) -> Path:
    """smollm2: the embedded default; tiny: its first 2 layers; big-vocab: tiny hidden, Qwen2.5's vocabulary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tuner.spec.presets import get_preset
    from tuner.train.base_model import resolve_base_model

    smollm2 = resolve_base_model(get_preset("smollm2-135m-instruct"))
    if kind == "smollm2":
        return smollm2
    out = work / f"model-{kind}"
    if not out.is_dir():
        tokenizer = AutoTokenizer.from_pretrained(smollm2)
        if kind == "tiny":
            model = AutoModelForCausalLM.from_pretrained(smollm2, num_hidden_layers=2)
        else:
            import torch

            torch.manual_seed(0)
            model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=151936,
                                                 max_position_embeddings=8192))
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out


def rows(limit: int, max_length: int) -> list[dict]:
    """The first `limit` conversations; at max_length 4096 (the memory case) each is several chitchat
    conversations joined into one long multi-turn one that nearly fills max_length, so every variant
    computes sequences of about that length (one chitchat conversation is ~1,200 tokens)."""
    import pyarrow.parquet as pq

    table = pq.read_table(DATA).to_pylist()
    conversations = [[{"role": m["role"], "content": m["content"]} for m in row["messages"]] for row in table]
    if max_length < 4096:
        return [{"messages": c} for c in conversations[:limit]]
    joined: list[list[dict]] = [[]]
    for conversation in conversations:
        if sum(len(m["content"]) for m in joined[-1] + conversation) > 3 * max_length:  # ~3.5 characters a token
            if len(joined) == limit:
                break
            joined.append([])
        joined[-1].extend(conversation)
    return [{"messages": c} for c in joined]


def run_trl(variant: str, model_dir: Path, steps: int, max_length: int, limit: int, out: dict) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    import trl

    data = rows(limit, max_length)
    best = variant == "trl_best"
    # assistant-only loss needs {% generation %} markers, which SmolLM2's ChatML template lacks: TRL ships a
    # ChatML training template with them (Qwen2.5's, whose default system line differs from SmolLM2's)
    template = Path(trl.__file__).parent / "chat_templates" / "qwen2_5_training.jinja"
    config = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=1,
                       learning_rate=2e-4, logging_steps=1, save_strategy="no", report_to="none",
                       use_cpu=not torch.cuda.is_available(), max_length=max_length, packing=best, padding_free=best, assistant_only_loss=best,
                       chat_template_path=str(template) if best else None, packing_strategy="bfd",
                       disable_tqdm=True, seed=0)
    trainer = SFTTrainer(model=str(model_dir), args=config, train_dataset=Dataset.from_list(data),
                         processing_class=AutoTokenizer.from_pretrained(model_dir),
                         peft_config=LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    result = trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    parameters = sum(p.numel() for p in trainer.model.parameters())
    out.update(final_loss=losses[-1], train_loss=result.training_loss, parameters=parameters)


def run_tuner(model_dir: Path, steps: int, max_length: int, limit: int, out: dict, work: Path) -> None:
    import yaml

    from tuner.job import run_job
    from tuner.spec.plan import plan_job

    data = work / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(limit, max_length)))
    workspace = work / "workspace.yaml"
    workspace.write_text(yaml.safe_dump({
        "apiVersion": "kaito.sh/v1beta1", "kind": "Workspace", "metadata": {"name": "bench"},
        "tuning": {"preset": {"name": "smollm2-135m-instruct"}, "method": "lora", "config": "bench",
                   "input": {"volumeSource": {"hostPath": {"path": str(data)}}},
                   "output": {"volumeSource": {"hostPath": {"path": str(work / "out")}}}}}))
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump({"training_config": {
        "ModelConfig": {"pretrained_model_name_or_path": str(model_dir)},
        "LoraConfig": {"target_modules": "all-linear"},
        "TrainingArguments": {"max_steps": steps, "learning_rate": 2e-4, "logging_steps": 1, "seed": 0,
                              "max_length": max_length}}}))
    summary = run_job(plan_job(workspace, config_path=config, work_dir=work / "work"), restart=True)
    out.update(final_loss=summary.train.final_loss, train_loss=summary.train.train_loss, parameters=None)


def bare_load(model_dir: Path, spawned: float) -> dict:
    """The start-up floor: `import torch, transformers, peft`, load the model, add LoRA; nothing else."""
    import peft
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    return {"first_step_s": round(time.time() - spawned, 2),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def child(variant: str, kind: str, steps: int, max_length: int, limit: int, spawned: float) -> dict:
    model_dir = model_folder(kind, Path(tempfile.gettempdir()) / "tuner-bench-models")
    if variant == "bare_load":
        return bare_load(model_dir, spawned)
    work = Path(tempfile.mkdtemp(prefix=f"bench-{kind}-{variant}-"))
    out: dict = {}
    from transformers import Trainer

    training_step = Trainer.training_step
    out.update(tokens=0, label_tokens=0)

    def measured(self, model, inputs, *args, **kwargs):
        """The same marks for every variant, on the batches that are trained: when the first step
        begins, when the last one ends, the real tokens and the labelled ones. (Counting in the
        collator over-counts: the Trainer fetches batches ahead.)"""
        out.setdefault("first_step", time.time())
        mask = inputs.get("attention_mask")
        out["tokens"] += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
        out["label_tokens"] += int((inputs["labels"][:, 1:] != -100).sum())
        try:
            return training_step(self, model, inputs, *args, **kwargs)
        finally:
            out["last_step_end"] = time.time()

    Trainer.training_step = measured
    if variant == "tuner":
        run_tuner(model_dir, steps, max_length, limit, out, work)
    else:
        run_trl(variant, model_dir, steps, max_length, limit, out)
    if out.get("parameters") is None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            out["parameters"] = sum(p.numel() for p in AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(model_dir)).parameters())
    gflops = matmul_gflops()
    seconds = out["last_step_end"] - out["first_step"]
    tokens_per_s = out["tokens"] / seconds
    import torch

    gpu = {"peak_gpu_mb": torch.cuda.max_memory_allocated() // 2**20} if torch.cuda.is_available() else {}
    return {**gpu, "tokens_per_s": round(tokens_per_s, 1), "label_tokens_per_s": round(out["label_tokens"] / seconds, 1),
            "first_step_s": round(out["first_step"] - spawned, 2), "peak_rss_mb": resource.getrusage(
                resource.RUSAGE_SELF).ru_maxrss // 1024, "final_loss": round(out["final_loss"], 4),
            "matmul_gflops": round(gflops, 1), "lora_mfu": round(tokens_per_s * 4 * out["parameters"] / (gflops * 1e9), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--case", action="append", choices=("tiny", "smollm2", "big-vocab"),
                        help="run only these cases (repeatable)")
    parser.add_argument("--child", nargs=6)
    args = parser.parse_args()
    if args.child:
        variant, kind, steps, max_length, limit, spawned = args.child
        print("RESULT " + json.dumps(child(variant, kind, int(steps), int(max_length), int(limit), float(spawned))))
        return
    cases = [("tiny", args.steps or (20 if args.quick else 60), 512, 48),
             ("smollm2", args.steps or (10 if args.quick else 40), 512, 48)]
    if args.memory or "big-vocab" in (args.case or ()):
        cases.append(("big-vocab", args.steps or 3, 4096, 8))
    cases = [case for case in cases if not args.case or case[0] in args.case]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results: dict = {}
    for kind, steps, max_length, limit in cases:
        results[kind] = {}
        for variant in (*VARIANTS, "bare_load"):
            spawned = time.time()
            done = subprocess.run([sys.executable, __file__, "--child", variant, kind, str(steps), str(max_length),
                                   str(limit), str(spawned)], capture_output=True, text=True, env=env, cwd=REPO)
            line = next((line for line in done.stdout.splitlines() if line.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{kind} {variant} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            results[kind][variant] = json.loads(line[len("RESULT "):])
        print(f"\n{kind}: {steps} steps, max_length {max_length}, {limit} conversations")
        print(f"  {'':15} {'tokens/s':>9} {'labels/s':>9} {'1st step s':>10} {'peak RSS MB':>11} {'loss':>8} "
              f"{'GFLOP/s':>8} {'LoRA-MFU':>8}")
        bare = results[kind].pop("bare_load")
        for variant, r in results[kind].items():
            print(f"  {variant:15} {r['tokens_per_s']:9.1f} {r['label_tokens_per_s']:9.1f} {r['first_step_s']:10.1f} "
                  f"{r['peak_rss_mb']:11,} {r['final_loss']:8.4f} {r['matmul_gflops']:8.1f} {r['lora_mfu']:8.1%}")
        tuner, best = results[kind]["tuner"], results[kind]["trl_best"]
        print(f"  tuner / trl_best: tokens/s {tuner['tokens_per_s'] / best['tokens_per_s']:.2f}x, "
              f"peak RSS {tuner['peak_rss_mb'] / best['peak_rss_mb']:.2f}x; start-up: first step at "
              f"{tuner['first_step_s']:.1f}s, {tuner['first_step_s'] / bare['first_step_s']:.2f}x the bare imports "
              f"and model load ({bare['first_step_s']:.1f}s)")
        results[kind]["bare_load"] = bare
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
