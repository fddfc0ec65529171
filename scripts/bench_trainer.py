"""Choose the training loop by measurement: transformers' Trainer vs TRL's SFTTrainer.

Both train the same LoRA on the same pre-tokenised, masked examples (SmolLM2-135M-Instruct,
chitchat messages from ../shared/data) for the same number of steps, in one process each (run
sequentially in this script via subprocesses so peak memory is measured per loop). Reports
tokens/s, seconds, peak RSS and the final loss; ratios are against the Trainer run of the same
invocation.

Usage: python scripts/bench_trainer.py [--steps 30] [--rows 400] [--batch 4]
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


def run_loop(loop: str, steps: int, rows: int, batch: int) -> dict:
    import torch
    from datasets import Dataset

    from tuner.data import prepare
    from tuner.spec.config_sections import DatasetSection
    from tuner.spec.presets import get_preset
    from tuner.spec.training_config import build_config
    from tuner.train import base_model, trainer
    from tuner.train.base_model import resolve_base_model
    from tuner.train.precision import choose_precision

    torch.manual_seed(0)
    preset = get_preset("smollm2-135m-instruct")
    model_dir = resolve_base_model(preset)
    config = build_config("lora", {"TrainingArguments": {"max_steps": steps, "per_device_train_batch_size": batch,
                                                         "learning_rate": 2e-4, "logging_steps": steps}})
    tokenizer = base_model.load_tokenizer(model_dir, config.model)
    examples = prepare.prepare([DATA], tokenizer, max_length=512, out_dir=Path(tempfile.mkdtemp(prefix="bench-trainer-")),
                               dataset=DatasetSection(shuffle_seed=0)).train[:rows]
    model = trainer.load_base_model(model_dir, config, choose_precision("bfloat16"))
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=list(preset.lora_target_modules),
                                             task_type="CAUSAL_LM"))
    common = dict(output_dir="/tmp/bench-trainer", max_steps=steps, per_device_train_batch_size=batch,
                  learning_rate=2e-4, logging_steps=steps, report_to="none", disable_tqdm=True, use_cpu=True,
                  save_strategy="no", seed=0, include_num_input_tokens_seen="non_padding",
                  gradient_checkpointing=False)  # TRL defaults it to True; compare like with like
    if loop == "trainer":
        from transformers import Trainer, TrainingArguments

        trainer = Trainer(model=model, args=TrainingArguments(remove_unused_columns=False, **common),
                          train_dataset=trainer.ExampleDataset(examples),
                          data_collator=trainer.PadCollator(tokenizer.pad_token_id))
    else:
        from trl import SFTConfig, SFTTrainer

        dataset = Dataset.from_list([
            {"input_ids": e.input_ids, "completion_mask": [int(l != -100) for l in e.labels]} for e in examples])
        trainer = SFTTrainer(model=model, args=SFTConfig(completion_only_loss=True, max_length=512, **common),
                             train_dataset=dataset, processing_class=tokenizer)
    started = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - started
    tokens = int(trainer.state.num_input_tokens_seen)
    return {"loop": loop, "seconds": round(seconds, 2), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
            "loss": round(output.training_loss, 4),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--loop", choices=["trainer", "sft"])
    args = parser.parse_args()
    if args.loop:
        print(json.dumps(run_loop(args.loop, args.steps, args.rows, args.batch)))
        return
    results = {}
    for loop in ("trainer", "sft"):
        out = subprocess.run([sys.executable, __file__, "--loop", loop, "--steps", str(args.steps),
                              "--rows", str(args.rows), "--batch", str(args.batch)],
                             check=True, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        results[loop] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(results[loop]))
    base = results["trainer"]
    print(f"SFTTrainer / Trainer: tokens/s x{results['sft']['tokens_per_s'] / base['tokens_per_s']:.2f}, "
          f"peak RSS x{results['sft']['peak_rss_mb'] / base['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
