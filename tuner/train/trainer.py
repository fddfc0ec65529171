"""LoRA / QLoRA training of a preset's base model on prepared examples."""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    PrinterCallback,
    Trainer,
    TrainingArguments,
    set_seed,
)

from tuner.data.packing import PackedDataset, PackingCollator, pack_best_fit, packing_efficiency, should_pack
from tuner.data.prepare import PreparedData
from tuner.errors import EXIT_PREEMPTED, Preempted, UserError
from tuner.observe import events
from tuner.spec.presets import Preset
from tuner.spec.training_config import TrainingConfig
from tuner.train import checkpoints, distributed, label_loss, sharding, trackers
from tuner.train.precision import Precision, choose_precision
from tuner.train.progress import ProgressEvents
from tuner.workdir import WorkDir, atomic_write_json

DEFAULT_EVAL_STEPS = 0.2  # with an eval split: evaluate at every fifth of the run (a ratio of the total)
BASE_EVAL_FILE = "base_eval.json"  # in WORK/checkpoints: the base model's eval loss, for a resumed run


@dataclass
class TrainResult:
    """What training did, for the summary and the log."""

    steps: int
    total_steps: int
    epochs: float
    train_loss: float
    final_loss: float | None
    eval_loss: float | None
    base_eval_loss: float | None  # the base model's, on the same eval rows (None: no eval split)
    tokens_seen: int
    seconds: float
    precision: str
    trainable_parameters: int
    log_history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_step: int = 0  # 0: a fresh start
    checkpoints_saved: int = 0  # by this process
    checkpoint_seconds: float = 0.0  # spent saving them (part of `seconds`)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_seen / self.seconds if self.seconds else 0.0


def train(model_dir: Path, tokenizer, data: PreparedData, config: TrainingConfig, preset: Preset,
          work: WorkDir, max_length: int, *, identity: dict[str, Any] | None = None,
          restart: bool = False, tracking: trackers.Tracking | None = None) -> TrainResult:
    """Train a LoRA adapter and save it (with the tokenizer) into WORK/adapter.

    Checkpoints go to WORK/checkpoints (see `tuner.checkpoints` for when). With an `identity`
    (see `checkpoints.job_identity`), training resumes from the latest complete checkpoint of the
    same job, refuses one of another job (UserError), or with `restart` deletes them first. On
    SIGTERM it saves a checkpoint, stops and raises `errors.Preempted` (exit 143) without
    writing the adapter. Under torchrun every rank calls this; each node's local rank 0 writes
    the checkpoints into its node's work dir, and only rank 0 writes the adapter. The trackers that
    TrainingArguments.report_to names hear of the run under `tracking`'s name (tuner.train.trackers).
    """
    precision = choose_precision(config.model.torch_dtype)
    if precision.reason:
        events.info(f"precision: {precision.reason}")
    model = load_base_model(model_dir, config, precision)
    set_seed(config.training_arguments.seed)  # the Trainer seeds only after the model exists: LoRA's A matrices too
    model = _add_lora(model, config, preset)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sharded = _sharded(config)
    if sharded:
        model = sharding.shard(model)
        events.info(f"fsdp: base model sharded over {distributed.ranks_from_env().world_size} processes "
                    f"({len(sharding.decoder_layers(model))} decoder layers and the root)")
    train_set, eval_set, collator = _datasets(data, config, tokenizer, max_length)
    checkpoint_dir = work.checkpoints
    tracking = tracking or trackers.Tracking(preset.name)
    args = _training_arguments(config, precision, checkpoint_dir, has_eval=eval_set is not None,
                               packed=isinstance(collator, PackingCollator), sharded=sharded, run_name=tracking.name)
    resume = _resume_point(checkpoint_dir, identity, restart) if identity is not None else None
    with trackers.environment(args.report_to, tracking, work, resumed=resume is not None) as run_ids:
        if args.report_to:
            events.info(trackers.describe(tuple(args.report_to)))
        return _fit(model, trainable, sharded, train_set, eval_set, collator, args, resume,
                    work, tokenizer, precision, callbacks=[trackers.RecordRunIds(work, run_ids)])


def _fit(model, trainable: int, sharded: bool, train_set, eval_set, collator, args: TrainingArguments,
         resume: Path | None, work: WorkDir, tokenizer, precision: Precision, callbacks: list) -> TrainResult:
    """Train, save the adapter, and sum up what happened."""
    checkpoint_dir = work.checkpoints
    progress = ProgressEvents()
    stop = checkpoints.StopFlag()
    saving = checkpoints.CheckpointCallback(checkpoint_dir, checkpoints.save_minutes(), stop)
    callbacks = [progress, saving, *callbacks] + ([sharding.RestoreOptimizer(resume)] if sharded else [])
    trainer = LabelLossTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                               data_collator=collator, callbacks=callbacks)
    trainer.head = None if sharded else label_loss.output_head(model)
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; ProgressEvents writes the lines
    _time_saves(trainer, saving)
    if sharded:
        sharding.save_gathered(trainer)
    resumed_from = 0
    if resume is not None:
        resumed_from = checkpoints.checkpoint_step(resume) or 0
        total = _recorded_max_steps(resume)
        events.info(f"resume: from {resume.name} (step {resumed_from} of {total if total else '?'})")
    if eval_set is not None:
        _evaluate_base(trainer, progress, checkpoint_dir, resumed=resume is not None)
    started = time.monotonic()
    with checkpoints.sigterm_stops(stop):
        output = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    seconds = time.monotonic() - started
    state = trainer.state
    if saving.saves:
        events.info(f"checkpoints: {saving.saves} saved in {saving.save_seconds:.1f}s "
                    f"({100 * saving.save_seconds / max(seconds, 1e-9):.1f}% of {seconds:.1f}s training) "
                    f"in {checkpoint_dir}")
    if saving.stopped_by_signal:
        saved = checkpoint_dir / f"checkpoint-{state.global_step}"
        events.info(f"preempted: stopped at step {state.global_step} of {state.max_steps}; {saved.name} saved; "
                    f"exiting with {EXIT_PREEMPTED} so the job is retried and resumes from it")
        raise Preempted(state.global_step, state.max_steps, saved.name)
    eval_loss = _final_eval_loss(trainer) if eval_set is not None else None
    state_dict = sharding.trainable_state(model) if sharded else None  # a collective: every rank gathers
    if trainer.is_world_process_zero():
        work.adapter.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(work.adapter, state_dict=state_dict)  # the LoRA weights only, as without FSDP
        tokenizer.save_pretrained(work.adapter)
    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    return TrainResult(
        steps=state.global_step, total_steps=state.max_steps, epochs=round(state.epoch or 0.0, 4),
        train_loss=output.training_loss, final_loss=losses[-1] if losses else None, eval_loss=eval_loss,
        base_eval_loss=progress.base_eval_loss, tokens_seen=int(state.num_input_tokens_seen), seconds=seconds, precision=precision.name,
        trainable_parameters=trainable, log_history=list(state.log_history), resumed_from_step=resumed_from,
        checkpoints_saved=saving.saves, checkpoint_seconds=round(saving.save_seconds, 3),
    )


def _resume_point(folder: Path, identity: dict[str, Any], restart: bool) -> Path | None:
    """The checkpoint to resume from, the same step on every rank (None: start fresh).

    Each node's local rank 0 checks and cleans its folder first. Under torchrun each node saves
    into its own work dir, so the ranks resume from the latest step complete on every node, and
    the node leaders delete any later checkpoint (it is about to be redone).
    """
    ranks = distributed.ranks_from_env()
    if not ranks.distributed:
        return checkpoints.prepare_resume(folder, identity, restart=restart)
    import torch.distributed as dist

    steps: list[int] = []
    error: str | None = None
    try:
        if ranks.is_node_leader:
            checkpoints.prepare_resume(folder, identity, restart=restart)
        dist.barrier()
        if not ranks.is_node_leader:
            checkpoints.prepare_resume(folder, identity, clean=False)
        steps = [checkpoints.checkpoint_step(p) for p in checkpoints.complete_checkpoints(folder)]
    except UserError as exc:
        error = str(exc)
    gathered: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(gathered, (steps, error))
    errors = [e for _, e in gathered if e]
    if errors:
        raise UserError(errors[0])
    common = set.intersection(*(set(s) for s, _ in gathered))
    step = max(common, default=None)
    if ranks.is_node_leader:
        for later in (s for s in steps if step is None or s > step):
            shutil.rmtree(folder / f"checkpoint-{later}", ignore_errors=True)
    if step is None and any(s for s, _ in gathered):
        events.warn("resume: no checkpoint is complete on every node: starting over")
    elif step is not None and step < max(max(s, default=0) for s, _ in gathered):
        events.info(f"resume: checkpoint-{step} is the latest complete on every node")
    dist.barrier()
    return folder / f"checkpoint-{step}" if step is not None else None


def _final_eval_loss(trainer: Trainer) -> float:
    """The finished adapter's eval loss: the last evaluation's when it ran at the last step, else a new one."""
    state = trainer.state
    last = next((e for e in reversed(state.log_history) if "eval_loss" in e), None)
    if last is not None and last.get("step") == state.global_step:
        return last["eval_loss"]
    return trainer.evaluate()["eval_loss"]


def _evaluate_base(trainer: Trainer, progress: ProgressEvents, checkpoint_dir: Path, resumed: bool) -> None:
    """The base model's eval loss: measured before the first step (LoRA's B matrices are still zero,
    so the model is the base model), recorded beside the checkpoints, and read back on a resume."""
    record = checkpoint_dir / BASE_EVAL_FILE
    if resumed:
        try:
            progress.base_eval_loss = float(json.loads(record.read_text())["eval_loss"])
        except (OSError, ValueError, KeyError, TypeError):
            progress.base_eval_loss = None  # this node did not record it (only rank 0's node does)
        return
    progress.phase = "base"
    try:
        loss = trainer.evaluate()["eval_loss"]
    finally:
        progress.phase = "adapter"
    if trainer.is_world_process_zero():
        atomic_write_json(record, {"eval_loss": loss})


def _recorded_max_steps(checkpoint: Path) -> int | None:
    try:
        return int(json.loads((checkpoint / "trainer_state.json").read_text())["max_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _time_saves(trainer: Trainer, saving: checkpoints.CheckpointCallback) -> None:
    """Count the seconds the Trainer spends writing checkpoints (for the overhead line)."""
    original = trainer._save_checkpoint

    def timed(*args, **kwargs):
        began = time.monotonic()
        try:
            return original(*args, **kwargs)
        finally:
            saving.last_save_seconds = time.monotonic() - began
            saving.save_seconds += saving.last_save_seconds

    trainer._save_checkpoint = timed


def _datasets(data: PreparedData, config: TrainingConfig, tokenizer, max_length: int):
    """Train/eval datasets and their collator: packed (padding-free) when asked or when it helps."""
    requested = config.training_arguments.packing
    lengths = data.train.lengths
    bins = pack_best_fit(lengths, max_length) if requested is not False else []
    batch_size = config.training_arguments.per_device_train_batch_size
    packing = should_pack(lengths, max_length, batch_size, bins=bins) if requested is None else requested
    if not packing:
        events.info(f"packing: off ({'as configured' if requested is not None else 'it would save little padding'}); "
                    f"rows are padded to the longest in each batch")
        collator = PadCollator(tokenizer.pad_token_id, config.data_collator.pad_to_multiple_of)
        return ExampleDataset(data.train), (ExampleDataset(data.eval) if len(data.eval) else None), collator

    if config.data_collator.pad_to_multiple_of:
        events.warn("DataCollator.pad_to_multiple_of is not applied: packed blocks carry no padding "
                    "(set TrainingArguments.packing: false to pad rows)")
    train_set = PackedDataset(data.train, bins)
    eval_set = PackedDataset(data.eval, pack_best_fit(data.eval.lengths, max_length)) if len(data.eval) else None
    efficiency = packing_efficiency(lengths, bins, max_length)
    events.info(f"packing: {len(data.train):,} rows into {len(train_set):,} blocks of up to {max_length:,} tokens "
                f"({efficiency:.0%} full); each sample attends only to itself")
    return train_set, eval_set, PackingCollator(tokenizer.pad_token_id)


def load_base_model(model_dir: Path, config: TrainingConfig, precision: Precision):
    """Load the base model in the training precision, quantised and prepared for k-bit training for qlora."""
    passed = {"trust_remote_code": config.model.trust_remote_code, "attn_implementation": config.model.attn_implementation}
    kwargs: dict[str, Any] = {key: value for key, value in passed.items() if value is not None}
    kwargs["dtype"] = precision.dtype
    if precision.device == "cpu":
        kwargs["device_map"] = {"": "cpu"}
    else:
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    if config.quantized:
        kwargs["quantization_config"] = quantization_config(config)
    bits = ", 4-bit" if config.quantization.load_in_4bit else ", 8-bit" if config.quantization.load_in_8bit else ""
    events.info(f"model: loading {model_dir.name} ({precision.name}{bits}) on {precision.device}")
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model.config.use_cache = False
    if config.quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.training_arguments.checkpointing)
    return model


def quantization_config(config: TrainingConfig) -> BitsAndBytesConfig:
    """QuantizationConfig as bitsandbytes takes it. The compute dtype is the configured one, adapted
    only where this device has no fast one, as torch_dtype is (and logged): bf16 compute on a CPU is
    ~9x slower, a V100 or T4 has no bf16."""
    quant = {k: v for k, v in config.quantization.values().items() if k != "quant_method"}
    if "bnb_4bit_compute_dtype" in quant:
        compute = choose_precision(quant["bnb_4bit_compute_dtype"])
        if compute.reason:
            events.info(f"precision: QuantizationConfig.bnb_4bit_compute_dtype: {compute.reason}")
        quant["bnb_4bit_compute_dtype"] = compute.dtype
    if config.training_arguments.sharded and quant.get("load_in_4bit") and "bnb_4bit_quant_storage" not in quant:
        # FSDP shards a flat buffer of one dtype: the 4-bit weights must be stored in the dtype of the rest
        quant["bnb_4bit_quant_storage"] = quant.get("bnb_4bit_compute_dtype", torch.bfloat16)
    return BitsAndBytesConfig(**quant)


def _add_lora(model, config: TrainingConfig, preset: Preset):
    lora = config.lora.values()
    lora.setdefault("target_modules", preset.lora_targets)
    try:
        return get_peft_model(model, LoraConfig(**lora))
    except (ValueError, TypeError) as exc:
        raise UserError(str(exc).splitlines()[0], where="training_config.LoraConfig",
                        fix=f"this preset's modules are {', '.join(preset.lora_target_modules)}") from None


def _sharded(config: TrainingConfig) -> bool:
    """Whether this run shards the base model (FSDP): asked for, and several processes to shard over."""
    if not config.training_arguments.sharded:
        return False
    if not distributed.ranks_from_env().distributed:
        events.warn("TrainingArguments.fsdp is not applied: one process holds the whole model "
                    "(run under torchrun, or several GPUs in the Job, to shard it)")
        return False
    if config.training_arguments.fsdp_config:
        events.warn("TrainingArguments.fsdp_config is not applied: tuner shards each decoder layer and the root "
                    "with FSDP2's defaults")
    return True


def _training_arguments(config: TrainingConfig, precision: Precision, output_dir: Path, has_eval: bool,
                        packed: bool, sharded: bool = False, run_name: str | None = None):
    # tuner applies max_length and packing itself, and FSDP by hand (tuner.train.sharding)
    applied = ("max_length", "packing", "fsdp", "fsdp_config")
    args = {k: v for k, v in config.training_arguments.values().items() if k not in applied}
    args.update(
        output_dir=str(output_dir), report_to=list(config.training_arguments.trackers), disable_tqdm=True,
        remove_unused_columns=False,
        prediction_loss_only=True,  # evaluation needs the loss alone, not every position's logits
        # packed rows have no padding (and no attention mask to find it by)
        include_num_input_tokens_seen="all" if packed else "non_padding", use_cpu=precision.device == "cpu",
    )
    if "bf16" in args or "fp16" in args:  # the user's mixed precision (or render's fp16 for a GPU without bf16)
        if precision.device == "cpu" and (args.get("bf16") or args.get("fp16")):
            events.warn("TrainingArguments bf16/fp16 on a CPU: half-precision autocast is applied as asked, "
                        "and runs slower than float32 here")
    else:
        args.update(bf16=precision.mixed_bf16, fp16=precision.mixed_fp16)
    args.update(checkpoints.save_arguments(config.training_arguments, sharded=sharded))
    if run_name:
        args.setdefault("run_name", run_name)  # the trackers' run name (transformers' default: output_dir)
    if distributed.ranks_from_env().distributed:
        args.setdefault("ddp_backend", distributed.ddp_backend())
        # every node's work dir gets its own copy, so each node can resume (one node: no change)
        args.setdefault("save_on_each_node", True)
    if not has_eval:
        args["eval_strategy"] = "no"
    elif "eval_strategy" not in args:  # an eval curve for the report: a few evaluations during the run
        args.update(eval_strategy="steps", eval_steps=args.get("eval_steps", DEFAULT_EVAL_STEPS))
    try:
        return TrainingArguments(**args)
    except (ValueError, TypeError) as exc:
        raise UserError(str(exc).splitlines()[0], where="training_config.TrainingArguments") from None


class LabelLossTrainer(Trainer):
    """The Trainer with the loss computed where the labels are only (tuner.train.label_loss); `head`
    None keeps the model's own loss."""

    head: torch.nn.Module | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.head is None or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = label_loss.label_loss(model, self.accelerator.unwrap_model(model), self.head, inputs,
                                     num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss scales the model's own loss
        return (loss, {"loss": loss}) if return_outputs else loss


class ExampleDataset:
    """A map-style dataset over prepared examples, one row per example (padded by PadCollator)."""

    def __init__(self, examples: Sequence[tuple[list[int], list[int]]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        input_ids, labels = self.examples[index]
        return {"input_ids": input_ids, "labels": labels}


class PadCollator:
    """Right-pads a batch to its longest row: pad id in input_ids, -100 in labels, 0 in the mask."""

    def __init__(self, pad_id: int, multiple_of: int | None = None):
        self.pad_id = pad_id
        self.multiple_of = multiple_of

    def __call__(self, batch: list[dict[str, list[int]]]):
        width = max(len(row["input_ids"]) for row in batch)
        if self.multiple_of:
            width = math.ceil(width / self.multiple_of) * self.multiple_of
        ids, labels, mask = [], [], []
        for row in batch:
            pad = width - len(row["input_ids"])
            ids.append(row["input_ids"] + [self.pad_id] * pad)
            labels.append(row["labels"] + [-100] * pad)
            mask.append([1] * len(row["input_ids"]) + [0] * pad)
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}
