"""The container's termination message: the job's outcome as one compact JSON object, which
Kubernetes shows in `kubectl describe pod` and `tuner status` reads back.

The Job template points `TUNER_TERMINATION_LOG` at the pod's termination message path; without
it (a run on a laptop) nothing is written. Kubernetes keeps at most `LIMIT` bytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

PATH_ENV = "TUNER_TERMINATION_LOG"
LIMIT = 4096


def succeeded(summary: dict[str, Any]) -> dict[str, Any]:
    """The outcome of a finished job, from its summary."""
    train, evaluation, image = summary["train"], summary.get("eval") or {}, summary.get("image")
    return {
        "status": "succeeded", "steps": train["steps"], "total_steps": train["total_steps"],
        "epochs": train["epochs"], "train_loss": _rounded(train["train_loss"]),
        "eval_loss": ({"base": _rounded(evaluation.get("base_loss")), "adapter": _rounded(evaluation.get("adapter_loss"))}
                      if evaluation.get("adapter_loss") is not None else None),
        "trained_tokens": train["tokens_seen"],
        "image": f"{image['reference']}@{image['digest']}" if image else None,
        "seconds": round(sum(summary.get("stage_seconds", {}).values()), 1),
    }


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


def _compact(outcome: dict[str, Any]) -> str:
    return json.dumps(outcome, separators=(",", ":"), default=str)


def _rounded(value: float | None) -> float | None:
    return round(value, 4) if value is not None else None
