"""The container's termination message: the job's outcome as one compact JSON object, which
Kubernetes shows in `kubectl describe pod` and `tuner status` reads back (`describe_result`).

The Job template points `TUNER_TERMINATION_LOG` at the pod's termination message path; without
it (a run on a laptop) nothing is written. Kubernetes keeps at most `LIMIT` bytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tuner.observe.events import duration

PATH_ENV = "TUNER_TERMINATION_LOG"
LIMIT = 4096


def failed(exit_code: int, error: dict[str, Any]) -> dict[str, Any]:
    """The outcome of a failed job: `error` is the job.failed event's {code, message, param}."""
    return {"status": "failed", "exit_code": exit_code, "error": error}


def preempted(exit_code: int, step: int, total_steps: int, checkpoint: str) -> dict[str, Any]:
    return {"status": "preempted", "exit_code": exit_code, "step": step, "total_steps": total_steps,
            "checkpoint": checkpoint}


def write(outcome: dict[str, Any]) -> None:
    """Write `outcome` to the termination message file, if the Job gave one (shortening a long error)."""
    path = os.environ.get(PATH_ENV)
    if not path:
        return
    text = _compact(outcome)
    while len(text.encode()) > LIMIT and len((outcome.get("error") or {}).get("message", "")) > 3:
        message = outcome["error"]["message"]
        keep = max(len(message) - (len(text.encode()) - LIMIT) - 3, 0)
        outcome = outcome | {"error": outcome["error"] | {"message": message[:keep] + "..."}}
        text = _compact(outcome)
    try:
        Path(path).write_text(text)
    except OSError:
        pass  # no termination message is no reason to fail: the log has the same lines


def describe_result(message: str) -> str:
    """One line for a tuner container's termination message.

    tuner writes its outcome there as one JSON object (`status` succeeded / failed / preempted); when
    it could not, Kubernetes puts the log's last lines there (FallbackToLogsOnError), shown as
    `last log lines: <the last non-empty line>`, as is any JSON tuner does not know.
    """
    try:
        outcome = json.loads(message)
    except ValueError:
        outcome = None
    if isinstance(outcome, dict):
        try:
            described = _describe_outcome(outcome)
        except (TypeError, ValueError, AttributeError):  # a field of an unexpected type
            described = None
        if described:
            return described
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return f"last log lines: {lines[-1]}" if lines else "empty termination message"


def _describe_outcome(outcome: dict) -> str | None:
    state = outcome.get("status")
    if state == "succeeded":
        counts = []
        if outcome.get("steps") is not None:
            total = outcome.get("total_steps")
            counts.append(f"{int(outcome['steps'])}/{int(total)} steps" if total is not None
                          else f"{int(outcome['steps'])} steps")
        if outcome.get("epochs") is not None:
            counts.append(f"{float(outcome['epochs']):.2f} epochs")
        if outcome.get("trained_tokens") is not None:
            counts.append(f"{int(outcome['trained_tokens']):,} tokens")
        parts = ["succeeded" + (f": {', '.join(counts)}" if counts else "")]
        if outcome.get("train_loss") is not None:
            parts.append(f"train loss {float(outcome['train_loss']):.4f}")
        eval_loss = outcome.get("eval_loss") or {}
        losses = [f"{key} {float(eval_loss[key]):.4f}" for key in ("base", "adapter") if eval_loss.get(key) is not None]
        if losses:
            parts.append("eval loss " + " -> ".join(losses))
        if outcome.get("image"):
            parts.append(f"image {outcome['image']}")
        if outcome.get("seconds") is not None:
            parts.append(duration(float(outcome["seconds"])))
        return " | ".join(parts)
    if state == "failed":
        error = outcome.get("error") or {}
        details = [f"exit {outcome['exit_code']}"] if outcome.get("exit_code") is not None else []
        details += [str(error["code"])] if error.get("code") else []
        text = " ".join(str(error.get("message") or "").split())
        return "failed" + (f" ({', '.join(details)})" if details else "") + (f": {text}" if text else "")
    if state == "preempted":
        step, total = outcome.get("step"), outcome.get("total_steps")
        where = f" at step {int(step)}/{int(total)}" if step is not None and total is not None else (
            f" at step {int(step)}" if step is not None else "")
        checkpoint = outcome.get("checkpoint")
        return (f"preempted{where}: resumes from {checkpoint} on retry" if checkpoint
                else f"preempted{where}: no checkpoint yet, starts over on retry")
    return None


def _compact(outcome: dict[str, Any]) -> str:
    return json.dumps(outcome, separators=(",", ":"), default=str)


def rounded(value: float | None) -> float | None:
    return round(value, 4) if value is not None else None
