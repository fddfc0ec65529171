"""Checkpoints in WORK/checkpoints: when to save, which are complete, resuming, and SIGTERM.

Defaults suit a preemptible GPU node: a checkpoint every `DEFAULT_SAVE_STEPS` (500) optimizer
steps and every `DEFAULT_SAVE_MINUTES` (10) minutes, whichever comes first, keeping the last two
(TrainingArguments.save_total_limit's default in tuner.spec.config_sections). TrainingArguments'
`save_steps` and `save_total_limit` replace the step interval and the count (at least 2: the
Trainer deletes old checkpoints before tuner marks the new one complete); a `save_strategy` of "steps" or "epoch" replaces the step plan with the
Trainer's own (Kaito's default "no" means "tuner's plan"). `TUNER_CHECKPOINT_MINUTES` sets the
time interval (0: none). The Trainer also saves at the last step.

A checkpoint counts only once tuner has written `COMPLETE_MARKER` into it, after the Trainer
has written everything else: a crash while saving leaves a folder without the marker, which the
next run deletes. `IDENTITY_FILE` beside the checkpoints records which job they belong to (config
digest, dataset sha256s, preset, method); a run of a different job refuses to resume from them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from tuner.errors import UserError
from tuner.observe import events
from tuner.spec.config_sections import TrainingSection
from tuner.workdir import atomic_write_json

IDENTITY_FILE = "job.json"  # in WORK/checkpoints
COMPLETE_MARKER = "tuner-complete.json"  # in each checkpoint folder, written last
DEFAULT_SAVE_STEPS = 500
DEFAULT_SAVE_MINUTES = 10.0
MINUTES_ENV = "TUNER_CHECKPOINT_MINUTES"
_CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")


def save_minutes() -> float:
    value = os.environ.get(MINUTES_ENV)
    if not value:
        return DEFAULT_SAVE_MINUTES
    try:
        return float(value)
    except ValueError:
        raise UserError(f"{MINUTES_ENV}={value!r} is not a number of minutes") from None


def save_arguments(training: TrainingSection, *, sharded: bool = False) -> dict[str, Any]:
    """The TrainingArguments keys of the checkpoint plan, the user's overriding tuner's defaults.

    Under FSDP (`sharded`) transformers checkpoints a model it did not shard itself only without the
    optimizer state (`save_only_model`); tuner.train.sharding saves and restores that state itself.
    """
    strategy = training.save_strategy
    keep = training.save_total_limit
    if keep is not None and keep < 2:
        # the Trainer deletes the older checkpoints before tuner marks the new one complete
        events.warn(f"save_total_limit {keep} raised to 2: a crash while saving would leave no complete checkpoint")
        keep = 2
    args: dict[str, Any] = {"save_total_limit": keep}
    if sharded:
        args["save_only_model"] = True
    if strategy in (None, "no"):  # Kaito's default: tuner's plan
        args.update(save_strategy="steps", save_steps=training.save_steps or DEFAULT_SAVE_STEPS)
    else:
        args["save_strategy"] = strategy
        if training.save_steps is not None:
            args["save_steps"] = training.save_steps
    return args


def job_identity(*, config_digest: str, preset: str, method: str, datasets: list[str],
                 train_rows: int, eval_rows: int) -> dict[str, Any]:
    """What makes two runs the same job: checkpoints of one may resume the other."""
    return {"config_digest": config_digest, "preset": preset, "method": method, "datasets": list(datasets),
            "prepared": {"train_rows": train_rows, "eval_rows": eval_rows}}


def difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """A short phrase naming what differs between two identities."""
    parts = []
    for key in ("preset", "method"):
        if old.get(key) != new.get(key):
            parts.append(f"{key} {old.get(key)} -> {new.get(key)}")
    if old.get("config_digest") != new.get("config_digest"):
        parts.append(f"training config {str(old.get('config_digest'))[7:19]} -> {str(new.get('config_digest'))[7:19]}")
    if old.get("datasets") != new.get("datasets"):
        parts.append("dataset files (their sha256s)")
    if old.get("prepared") != new.get("prepared"):
        parts.append("prepared rows")
    return ", ".join(parts) or "unknown"


def checkpoint_step(path: Path) -> int | None:
    match = _CHECKPOINT_RE.fullmatch(path.name)
    return int(match.group(1)) if match else None


def complete_checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoints in `folder`, oldest step first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir()
             if p.is_dir() and checkpoint_step(p) is not None and (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=checkpoint_step)


def remove_incomplete(folder: Path) -> list[Path]:
    """Delete checkpoint folders without the completion marker (a save cut short); return them."""
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        if path.is_dir() and (checkpoint_step(path) is not None or path.name.endswith(".tmp")) \
                and not (path / COMPLETE_MARKER).is_file():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def read_identity(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / IDENTITY_FILE).read_text())
    except (OSError, ValueError):
        return None


def prepare_resume(folder: Path, identity: dict[str, Any], *, restart: bool = False,
                   clean: bool = True) -> Path | None:
    """Check `folder`'s checkpoints against this job and return the latest complete one (None: start fresh).

    `restart` deletes every old checkpoint first. A checkpoint of another job is refused with a
    UserError. `clean` (the process that owns the folder) deletes incomplete checkpoints and writes
    the identity file.
    """
    if restart and clean and folder.exists():
        shutil.rmtree(folder)
        events.info(f"resume: --restart: deleted the old checkpoints in {folder}")
    complete = complete_checkpoints(folder)
    recorded = read_identity(folder)
    if complete and recorded != identity:
        what = difference(recorded or {}, identity) if recorded else f"{folder / IDENTITY_FILE} is missing"
        raise UserError(f"{folder} holds checkpoints of a different job ({what})", where="resume",
                        fix="run with --restart to delete them and start over, or use another --work-dir")
    if clean:
        for path in remove_incomplete(folder):
            events.info(f"resume: deleted {path.name}: its save did not complete")
        atomic_write_json(folder / IDENTITY_FILE, identity)
    return complete[-1] if complete else None


def mark_complete(checkpoint: Path, step: int) -> None:
    """Write the completion marker, last, after syncing the checkpoint's files to disk."""
    for path in checkpoint.rglob("*"):
        if path.is_file():
            try:
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
            except OSError:
                pass
    atomic_write_json(checkpoint / COMPLETE_MARKER, {"step": step, "saved": time.time()})


class CheckpointCallback(TrainerCallback):
    """Marks saved checkpoints complete, saves every `minutes`, and stops (after a save) on SIGTERM."""

    def __init__(self, output_dir: Path, minutes: float, stop: StopFlag):
        self.output_dir = output_dir
        self.interval = minutes * 60
        self.stop = stop
        self.last_save = time.monotonic()
        self.stopped_by_signal = False
        self.save_seconds = 0.0  # added to by whoever times the Trainer's saves
        self.last_save_seconds = 0.0
        self.saves = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_save = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        due = self.interval > 0 and time.monotonic() - self.last_save >= self.interval
        # every rank must take the same decisions: each has its own clock and its own signal
        self.stop.set, due = any_rank(args, self.stop.set, due)
        if due:
            control.should_save = True
        if self.stop.set:
            self.stopped_by_signal = True
            control.should_save = True
            control.should_training_stop = True
            events.info(f"preempted: SIGTERM received, saving a checkpoint at step {state.global_step} and stopping")
        return control

    def on_save(self, args, state, control, **kwargs):
        self.saves += 1
        self.last_save = time.monotonic()
        _wait_for_every_rank()  # each rank writes its own RNG state into the checkpoint
        if args.should_save:  # the process that writes this node's checkpoints
            checkpoint = self.output_dir / f"checkpoint-{state.global_step}"
            if checkpoint.is_dir():
                mark_complete(checkpoint, state.global_step)
                events.emit("checkpoint.saved", f"checkpoint: {checkpoint.name} saved in {self.last_save_seconds:.1f}s",
                            step=state.global_step, metrics={"seconds": round(self.last_save_seconds, 3)},
                            data={"path": str(checkpoint)})
        return control


def _wait_for_every_rank() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class StopFlag:
    """Set by the SIGTERM handler; read at each step's end."""

    def __init__(self):
        self.set = False


def any_rank(args, *flags: bool) -> tuple[bool, ...]:
    """Each flag, true if it is true on any rank (one all-reduce under DDP; as given otherwise)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flags
    import torch

    agreed = torch.tensor([int(flag) for flag in flags], device=args.device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    return tuple(bool(value) for value in agreed.tolist())


class sigterm_stops:
    """Context manager: SIGTERM sets `flag` instead of killing the process (main thread only)."""

    def __init__(self, flag: StopFlag):
        self.flag = flag
        self.previous = None
        self.installed = False

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self._handle)
            self.installed = True
        return self.flag

    def _handle(self, signum, frame) -> None:
        self.flag.set = True

    def __exit__(self, *exc) -> None:
        if self.installed:
            signal.signal(signal.SIGTERM, self.previous if self.previous is not None else signal.SIG_DFL)
