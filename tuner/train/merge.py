"""`tuner merge` and the job's merge stage: the base model with a LoRA adapter merged into its
weights, saved as a plain transformers model folder (safetensors shards, config, generation config,
tokenizer) that `AutoModelForCausalLM.from_pretrained` loads without peft.

- The base model is found as training found it: `--base-model DIR` when given; else the folder the
  adapter's adapter_config.json names (base_model_name_or_path: the exact folder training loaded)
  when it is here; else the preset and ModelConfig in tuner's training_summary.json, through
  `base_model.model_folder` (the GGUF a package ships, a weights image, the hub); else, for an
  adapter without tuner's summary, base_model_name_or_path as a preset's or a hub model's id.
- The dtype: `--dtype`, else the dtype training ran in (the summary's train.precision: the weights
  the adapter was trained against), else bfloat16 (an adapter without tuner's summary).
- A QLoRA adapter is merged into the unquantised base in that dtype, not into the 4-bit weights it
  trained against: 4-bit weights cannot hold the merged sums, and a 4-bit merge would round the
  adapter away. The merge runs on the CPU (it needs the model's size in memory, no GPU).
- Written atomically: the folder is built beside OUT under a scratch name, MERGE_MARKER written
  last, then renamed to OUT; a failed or killed merge never leaves a half folder at OUT. A folder
  whose marker names the same adapter weights and dtype is a finished merge and is reused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tuner import __version__
from tuner.errors import UserError, quote
from tuner.observe import events
from tuner.observe.summary import JobSummary
from tuner.oci.publish import adapter_dir_of
from tuner.spec.config_sections import ModelSection
from tuner.spec.hub_models import is_hub_id, resolve_preset
from tuner.spec.presets import all_presets
from tuner.spec.targets import RegistryOptions
from tuner.workdir import SUMMARY_FILE, atomic_write_json, scratch_dir

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # --dtype's names -> torch's
DEFAULT_DTYPE = "bfloat16"  # an adapter without tuner's summary: what Kaito's presets train in
MERGE_MARKER = "merge_summary.json"  # written last into the merged folder: it marks the folder complete
MAX_SHARD_SIZE = "5GB"  # the hub's usual shard size (transformers' own default is one 50 GB file)
_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class Merged:
    folder: Path
    dtype: str  # torch's name: bfloat16, float16, float32
    base_model: Path
    reused: bool  # a finished merge of the same adapter and dtype was already there


def merge(source: Path, out: Path, *, dtype: str | None = None, base_model: Path | None = None,
          registry: RegistryOptions | None = None, replace: bool = False) -> Merged:
    """Merge the adapter of `source` (a `tuner run` work directory or an adapter folder) into its base
    model and save the result as the model folder `out` (see the module docstring).

    `out` must not exist, be empty, or hold a finished merge of the same adapter and dtype (reused);
    with `replace` (the job's own WORK/merged) any other content is replaced instead of refused.
    """
    adapter_dir = adapter_dir_of(source)
    weights = next((adapter_dir / name for name in _WEIGHTS if (adapter_dir / name).is_file()), None)
    if weights is None or not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir} holds no finished adapter (adapter_config.json and {_WEIGHTS[0]})", where=str(source),
                        fix="pass the work directory of a finished `tuner run` (training writes them last)")
    summary = JobSummary.read(adapter_dir / SUMMARY_FILE)
    dtype_name = _dtype(dtype, summary)
    identity = {"adapter_sha256": _sha256(weights), "adapter_config_sha256": _sha256(adapter_dir / "adapter_config.json"),
                "dtype": dtype_name}
    _check_out(out, adapter_dir)
    done = _finished(out, identity)
    if done is not None:
        events.info(f"merge: skipped: {out} already holds this adapter merged in {dtype_name}")
        return Merged(out, dtype_name, Path(done.get("base_model", "")), reused=True)
    if out.is_dir() and any(out.iterdir()) and not replace:
        raise UserError(f"{out} is not empty (and holds no merge of this adapter in {dtype_name})", where="OUT",
                        fix="name a new or empty folder, or remove this one")
    base = find_base_model(adapter_dir, summary, base_model, registry)
    if summary is not None and summary.method == "qlora":
        events.info(f"merge: a qlora adapter: merged into the {dtype_name} base weights, not the 4-bit ones it "
                    "trained against (4-bit weights cannot hold the merged sums)")
    events.info(f"merge: {adapter_dir} into {base} ({dtype_name}, on the CPU) -> {out}")
    started = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    with scratch_dir(f".{out.name}-merging-", out.parent) as staging:
        _merge_into(base, adapter_dir, staging, dtype_name, _trust_remote_code(summary))
        atomic_write_json(staging / MERGE_MARKER, identity | {
            "adapter": str(adapter_dir.resolve()), "base_model": str(base), "tuner_version": __version__,
            "preset": summary.preset if summary else None, "method": summary.method if summary else None,
            "config_digest": summary.config_digest if summary else None})
        if out.is_dir() and replace:
            shutil.rmtree(out)
        elif out.is_dir():
            out.rmdir()  # empty: checked above
        staging.rename(out)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    events.info(f"merge: done in {time.monotonic() - started:.1f}s: {size / 1e6:,.1f} MB of {dtype_name} weights in "
                f"{out} (loads with AutoModelForCausalLM.from_pretrained, no peft)")
    return Merged(out, dtype_name, base, reused=False)


def find_base_model(adapter_dir: Path, summary: JobSummary | None, override: Path | None = None,
                    registry: RegistryOptions | None = None) -> Path:
    """The folder of the base model the adapter was trained on (the order is the module docstring's)."""
    fix = "pass --base-model DIR: the folder of the model it was trained on (config.json and weights)"
    if override is not None:
        if not (override / "config.json").is_file():
            raise UserError(f"{override} is not a model folder (no config.json)", where="--base-model",
                            fix="point it at a Hugging Face model directory")
        return override
    config_file = adapter_dir / "adapter_config.json"
    try:
        adapter_config = json.loads(config_file.read_text())
        recorded = adapter_config.get("base_model_name_or_path") if isinstance(adapter_config, dict) else None
    except (OSError, ValueError) as exc:
        raise UserError(f"is not readable JSON ({exc})", where=str(config_file),
                        fix="pass an adapter folder written by peft's save_pretrained") from None
    if isinstance(recorded, str) and recorded and (Path(recorded) / "config.json").is_file():
        return Path(recorded)
    from tuner.train import base_model

    if summary is not None:
        model = ModelSection.model_validate(summary.config.get("ModelConfig") or {})
        try:
            return base_model.model_folder(resolve_preset(summary.preset, model), model, registry)
        except UserError as exc:
            raise UserError(f"cannot find base model {quote(summary.preset)} the adapter was trained on ({exc})",
                            where=str(adapter_dir / SUMMARY_FILE), fix=fix) from None
    if isinstance(recorded, str) and recorded:
        by_hub_id = [p for p in all_presets().values() if p.source.hub_id == recorded]
        try:
            if by_hub_id:
                return base_model.resolve_base_model(by_hub_id[0])
            if is_hub_id(recorded):
                model = ModelSection(revision=adapter_config.get("revision"))
                return base_model.model_folder(resolve_preset(recorded, model), model, registry)
        except UserError as exc:
            raise UserError(f"cannot find base model {quote(recorded)} ({exc})", where=str(config_file), fix=fix) from None
    raise UserError(f"base_model_name_or_path {quote(recorded)} is neither a model folder here nor a model id",
                    where=str(config_file), fix=fix)


def _merge_into(base: Path, adapter_dir: Path, out: Path, dtype_name: str, trust_remote_code: bool) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype_name),
                                                 trust_remote_code=trust_remote_code)
    try:
        merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload(safe_merge=True)
    except (RuntimeError, ValueError, KeyError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]  # torch's: a header, then the first
        first = " ".join(lines[:2])[:300] or type(exc).__name__
        raise UserError(f"cannot merge the adapter into the base model {base} ({first})",
                        where=str(adapter_dir / "adapter_config.json"),
                        fix="pass --base-model DIR: the folder of the model it was trained on") from None
    merged.save_pretrained(out, max_shard_size=MAX_SHARD_SIZE)
    # training saved the tokenizer it used (pad token, chat template) beside the adapter
    tokenizer_dir = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base
    AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code).save_pretrained(out)


def _dtype(requested: str | None, summary: JobSummary | None) -> str:
    if requested:
        name = DTYPES.get(requested, requested)
        if name not in DTYPES.values():
            raise UserError(f"unknown dtype {quote(requested)}", where="--dtype", fix=f"use one of {', '.join(DTYPES)}")
        return name
    trained = summary.train.precision if summary is not None else None
    return trained if trained in DTYPES.values() else DEFAULT_DTYPE


def _trust_remote_code(summary: JobSummary | None) -> bool:
    return bool(summary is not None and (summary.config.get("ModelConfig") or {}).get("trust_remote_code"))


def _check_out(out: Path, adapter_dir: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder", where="OUT", fix="name a new or empty folder")
    resolved, adapter = out.resolve(), adapter_dir.resolve()
    if resolved == adapter or adapter in resolved.parents:
        raise UserError(f"{out} is inside the adapter folder {adapter_dir}", where="OUT",
                        fix="name a folder outside it (the adapter image would carry the merged model)")


def _finished(out: Path, identity: dict) -> dict | None:
    """The marker of a finished merge of this adapter and dtype in `out`, else None."""
    try:
        marker = json.loads((out / MERGE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or any(marker.get(key) != value for key, value in identity.items()):
        return None
    return marker


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
