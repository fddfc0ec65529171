"""Any Hugging Face model as a preset, as Kaito accepts any `org/model` id as `tuning.preset.name`.

The architecture facts come from the model's `config.json`, read from the first place that has it:
ModelConfig.pretrained_model_name_or_path (a local folder or volume), the Hugging Face cache (once
the weights are there), or the hub (only config.json, a few kB, at ModelConfig.revision; HF_TOKEN
for a gated model). LoRA targets every linear layer but the output head, as peft's `all-linear`
does, so no per-architecture list is needed; the plan sizes the GPU with the layer shapes of the
model's family. Importing this reads no torch: `tuner render` plans with it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from tuner.errors import UserError, quote
from tuner.spec.config_sections import ModelSection
from tuner.spec.presets import Architecture, ModelSource, Preset, all_presets

ALL_LINEAR = "all-linear"
_CONFIG = "config.json"
# huggingface_hub's repo id rule (validate_repo_id): an owner and a name of letters, digits, '-', '_', '.'
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}", re.ASCII)


def is_hub_id(name: str) -> bool:
    return bool(_REPO_ID.fullmatch(name)) and ".." not in name and "--" not in name


def resolve_preset(name: str, model: ModelSection) -> Preset:
    """`tuning.preset.name` as a preset: a built-in one, else a Hugging Face id's."""
    presets = all_presets()
    if name in presets:
        return presets[name]
    if is_hub_id(name):
        return hub_preset(name, model)
    raise UserError(f"unknown preset {quote(name)}", where="tuning.preset.name",
                    fix=f"use one of: {', '.join(sorted(presets))}; or a Hugging Face model id, ORG/MODEL")


def hub_preset(name: str, model: ModelSection) -> Preset:
    """The preset of Hugging Face model `name`, from its config.json (see the module docstring)."""
    config, revision = _read_config(name, model)
    text = config.get("text_config") or config  # a multimodal config keeps the decoder's facts there
    try:
        heads = int(text["num_attention_heads"])
        hidden = int(text["hidden_size"])
        facts = {
            "model_type": str(text.get("model_type") or config["model_type"]),
            "hidden_size": hidden, "intermediate_size": int(text["intermediate_size"]),
            "num_hidden_layers": int(text["num_hidden_layers"]), "num_attention_heads": heads,
            "num_key_value_heads": int(text.get("num_key_value_heads") or heads),
            "head_dim": int(text.get("head_dim") or hidden // heads), "vocab_size": int(text["vocab_size"]),
            "max_position_embeddings": int(text.get("max_position_embeddings") or 2048),
            "tie_word_embeddings": bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            "rope_type": ((text.get("rope_scaling") or {}).get("rope_type")
                          or (text.get("rope_scaling") or {}).get("type")),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{name}'s config.json lacks the decoder fact {exc} tuner plans with", where="tuning.preset.name",
                        fix="name a causal language model (its config.json has hidden_size, num_hidden_layers, ...)"
                        ) from None
    architecture = Architecture(parameters=0, **facts)
    architecture = architecture.model_copy(update={"parameters": architecture.counted_parameters()})
    return Preset(
        name=name, description=f"Hugging Face model {name} ({architecture.model_type}, "
                               f"{architecture.parameters / 1e9:.1f}B parameters, from its config.json)",
        license="see the model card", source=ModelSource(hub_id=name, revision=revision),
        architecture=architecture, context_length=architecture.max_position_embeddings,
        lora_target_modules=(ALL_LINEAR,), chat_template_family="the model's own")


def _read_config(name: str, model: ModelSection) -> tuple[dict[str, Any], str]:
    """(config.json, the revision it belongs to) from a local folder, the cache or the hub."""
    local = model.pretrained_model_name_or_path
    if local and (Path(local) / _CONFIG).is_file():
        return _parse(Path(local) / _CONFIG, name), f"local folder {local}"
    revision = model.revision or "main"
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    cached = try_to_load_from_cache(name, _CONFIG, revision=revision, cache_dir=model.cache_dir)
    if not isinstance(cached, str):
        try:
            cached = hf_hub_download(name, _CONFIG, revision=revision, cache_dir=model.cache_dir,
                                     token=os.environ.get("HF_TOKEN"), local_files_only=bool(model.local_files_only))
        except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, OSError, ValueError) as exc:
            reason = " ".join(str(exc).split())[:200]
            raise UserError(f"cannot read the config.json of Hugging Face model {quote(name)} ({reason})",
                            where="tuning.preset.name",
                            fix="check the id (and HF_TOKEN for a gated model), or give the model as a local folder "
                                "in ModelConfig.pretrained_model_name_or_path") from None
    path = Path(cached)
    snapshot = path.parent.name  # the cache keeps files under snapshots/<commit>/
    return _parse(path, name), snapshot if re.fullmatch(r"[0-9a-f]{40}", snapshot) else revision


def _parse(path: Path, name: str) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not readable JSON ({exc})", where="tuning.preset.name",
                        fix=f"give {name} a valid config.json") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a JSON object", where="tuning.preset.name", fix=f"give {name} a valid config.json")
    return config
