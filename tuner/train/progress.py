"""The Trainer's progress as events: the training banner, one `train.step` per logging step and
one `eval` per evaluation (the base model's before training, the adapter's during and after)."""

from __future__ import annotations

import resource
import sys
import time

import torch
from transformers import TrainerCallback

from tuner.observe import events
from tuner.observe.events import duration

GIB = 2**30


class ProgressEvents(TrainerCallback):
    """`train.started` once, `train.step` per logging step, `eval` per evaluation.

    Set `phase` to "base" around the evaluation before training: the adapter is still zero
    there, so that evaluation is the base model's.
    """

    def __init__(self):
        self.phase = "adapter"
        self.base_eval_loss: float | None = None
        self.started = 0.0
        self.first_step: int | None = 0  # the step this process started from (a resumed run's is later)
        self.first_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.monotonic()
        self.first_step = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.first_step is not None:
            return
        # a resumed run's state is loaded after on_train_begin: start counting here
        self.started = time.monotonic()
        self.first_step, self.first_tokens = state.global_step, state.num_input_tokens_seen
        effective = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        epochs = planned_epochs(state, args, kwargs.get("train_dataloader"))
        events.emit(
            "train.started",
            f"train: {state.max_steps:,} steps, {epochs:g} epochs, effective batch {effective} "
            f"(batch {args.per_device_train_batch_size} x {args.gradient_accumulation_steps} accumulation"
            + (f" x {args.world_size} processes" if args.world_size > 1 else "") + ")",
            step=state.global_step,
            data={"total_steps": state.max_steps, "epochs": epochs, "effective_batch": effective,
                  "per_device_batch": args.per_device_train_batch_size,
                  "gradient_accumulation_steps": args.gradient_accumulation_steps, "world_size": args.world_size})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        if "eval_loss" in logs:
            self._eval(state, logs)
        elif "loss" in logs:
            self._step(state, logs)

    def _step(self, state, logs: dict) -> None:
        elapsed = time.monotonic() - self.started
        step, total = state.global_step, state.max_steps
        rate = (state.num_input_tokens_seen - self.first_tokens) / elapsed if elapsed else 0.0
        done = step - (self.first_step or 0)
        eta = elapsed / done * (total - step) if done > 0 else 0.0
        lr = logs.get("learning_rate", 0.0)
        memory_name, memory_gib = peak_memory()
        metrics = {"epoch": round(state.epoch or 0.0, 4), "loss": logs["loss"], "learning_rate": lr,
                   "tokens_per_second": round(rate, 1), "eta_seconds": round(eta, 1),
                   f"{memory_name}_memory_gib": round(memory_gib, 2)}
        if "grad_norm" in logs:
            metrics["grad_norm"] = logs["grad_norm"]
        events.emit(
            "train.step",
            f"step {step}/{total} ({100 * step // max(total, 1)}%) | epoch {state.epoch or 0:.2f} | "
            f"loss {logs['loss']:.4g} | lr {lr:.1e} | {rate:,.0f} tok/s | eta {duration(eta)} | "
            f"{memory_name} {memory_gib:.1f} GiB",
            step=step, metrics=metrics, data={"total_steps": total})

    def _eval(self, state, logs: dict) -> None:
        metrics = {k: v for k, v in logs.items() if k.startswith("eval_") and isinstance(v, (int, float))}
        loss = logs["eval_loss"]
        if self.phase == "base":
            self.base_eval_loss = loss
            message = f"eval: base model, before training | eval_loss {loss:.4f}"
        else:
            message = (f"eval: step {state.global_step}/{state.max_steps} | eval_loss {loss:.4f}"
                       + (f" (base {self.base_eval_loss:.4f})" if self.base_eval_loss is not None else ""))
        events.emit("eval", message, step=state.global_step, metrics=metrics, data={"model": self.phase})


def planned_epochs(state, args, dataloader) -> float:
    """The epochs the run will really cover: max_steps over the optimizer steps per epoch.

    `args.num_train_epochs` (3 by default) is not it when `max_steps` is set; the Trainer's own
    `state.num_train_epochs` is that rounded up, so it is the fallback without a dataloader.
    """
    try:
        batches = len(dataloader)
    except TypeError:
        return float(state.num_train_epochs)
    steps_per_epoch = max(1, -(-batches // args.gradient_accumulation_steps))  # the Trainer's ceiling division
    return round(state.max_steps / steps_per_epoch, 2)


def peak_memory() -> tuple[str, float]:
    """("gpu", peak GiB allocated on this process's GPU), or ("rss", peak resident GiB) on a CPU."""
    if torch.cuda.is_available():
        return "gpu", torch.cuda.max_memory_allocated() / GIB
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return "rss", peak_kib * (1 if sys.platform == "darwin" else 1024) / GIB
