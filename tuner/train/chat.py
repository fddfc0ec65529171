"""Answering a prompt with a base model, optionally with a LoRA adapter on top (`tuner chat`)."""

from __future__ import annotations

from pathlib import Path

from tuner.errors import UserError


def load_chat_model(base_dir: Path, adapter_dir: Path | None = None):
    """Load the base model (float32 on CPU) and, when given, the adapter; return (model, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    has_tokenizer = adapter_dir is not None and (adapter_dir / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir if has_tokenizer else base_dir)
    if adapter_dir is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, adapter_dir)
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"the adapter in {adapter_dir} does not fit the base model in {base_dir} "
                            f"({str(e).splitlines()[0][:200]})",
                            fix="pass the --preset the adapter was trained on") from None
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


def chat(preset_name: str, adapter_dir: Path | None, prompt: str, max_new_tokens: int = 128) -> str:
    """`tuner chat`: the preset's base model, plus the adapter when given, answers one prompt."""
    from tuner.observe.summary import JobSummary
    from tuner.oci.image import REQUIRED_ADAPTER_FILES
    from tuner.spec.config_sections import ModelSection
    from tuner.spec.hub_models import resolve_preset
    from tuner.train.base_model import resolve_base_model
    from tuner.workdir import SUMMARY_FILE

    preset = resolve_preset(preset_name, ModelSection())
    if adapter_dir is not None:
        missing = [name for name in REQUIRED_ADAPTER_FILES if not (adapter_dir / name).is_file()]
        if missing:
            raise UserError(f"{adapter_dir} is not an adapter folder: {', '.join(missing)} missing",
                            where="--adapter", fix="pass a folder written by `tuner pull` or `tuner run`")
        summary = JobSummary.read(adapter_dir / SUMMARY_FILE)
        trained_on = summary.preset if summary else None
        if trained_on and trained_on != preset.name:
            raise UserError(f"the adapter was trained on preset {trained_on}, not {preset.name}",
                            where="--preset", fix=f"pass --preset {trained_on}")
    model, tokenizer = load_chat_model(resolve_base_model(preset), adapter_dir)
    return answer(model, tokenizer, prompt, max_new_tokens=max_new_tokens)
