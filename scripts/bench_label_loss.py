"""The loss where the labels are (tuner.train.label_loss) against the model's own loss, in one run:
peak RSS and seconds per training step (forward + backward) of a model with a tiny hidden size and
Qwen2.5's 151,936-token vocabulary at 4096 tokens, a quarter of them labelled (a chat's answers),
where the logits dominate. Each variant runs in a fresh process, so its peak RSS is its own.

Usage: python scripts/bench_label_loss.py [--tokens 4096] [--labelled 0.25] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(variant: str, tokens: int, labelled: float, steps: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuner.train import label_loss

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=151936, max_position_embeddings=tokens)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, target_modules="all-linear"))
    ids = torch.randint(0, config.vocab_size, (1, tokens))
    labels = ids.clone()
    labels[:, : int(tokens * (1 - labelled))] = -100  # the prompt carries no loss
    batch = {"input_ids": ids, "labels": labels}
    head = label_loss.output_head(model)
    started = time.perf_counter()
    for _ in range(steps):
        model.zero_grad()
        loss = (model(**batch).loss if variant == "model" else label_loss.label_loss(model, model, head, batch))
        loss.backward()
    seconds = (time.perf_counter() - started) / steps
    return {"seconds_per_step": round(seconds, 3), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
            "loss": round(loss.item(), 4)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--labelled", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tokens, args.labelled, args.steps)))
        return
    results = {}
    for variant in ("model", "label_loss"):
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--tokens", str(args.tokens),
                              "--labelled", str(args.labelled), "--steps", str(args.steps)],
                             capture_output=True, text=True, check=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    base, ours = results["model"], results["label_loss"]
    print(f"{args.tokens} tokens, {args.labelled:.0%} labelled, vocabulary 151,936")
    for name, r in results.items():
        print(f"  {name:11} {r['seconds_per_step']:7.3f} s/step  peak RSS {r['peak_rss_mb']:6,} MB  loss {r['loss']}")
    print(f"  label_loss / model: time {ours['seconds_per_step'] / base['seconds_per_step']:.2f}x, "
          f"peak RSS {ours['peak_rss_mb'] / base['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
