"""Answering a prompt with a base model, optionally with a LoRA adapter on top."""

from __future__ import annotations

from pathlib import Path


def load_chat_model(base_dir: Path, adapter_dir: Path | None = None):
    """Load the base model (float32 on CPU) and, when given, the adapter; return (model, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir or base_dir)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    if torch.cuda.is_available():
        model.to("cuda")
    return model, tokenizer


def answer(model, tokenizer, prompt: str, max_new_tokens: int = 64) -> str:
    """Greedy reply to one user message, using the tokenizer's chat template."""
    import torch

    inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True).to(model.device)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
