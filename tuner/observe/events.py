"""What a job tells its watchers: every progress line is an event.

Text (the default): one `HH:MM:SS message` line per event on stdout, flushed at once, with no
carriage returns or escape codes, for `kubectl logs`. On a terminal the training steps drive a
live progress bar instead of a line each.

JSON (`--log-format json`, or `TUNER_LOG_FORMAT=json`): one object per line with the keys `type`,
`time`, `level` and `message`, and where they apply `step`, `metrics`, `data` and `error` (the
README documents the schema). While a job runs, every event is also appended to
WORK/events.jsonl in the JSON form, whatever the log format, for `tuner report`.
`last_progress_line` reads either form back (for `tuner status`). `listen` hands every event, as
the dict `emit` returns, to a function of the caller's (the job's Prometheus metrics,
tuner.observe.metrics), so no stage needs to know who watches.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from tuner.errors import UserError

FORMAT_ENV = "TUNER_LOG_FORMAT"
FORMATS = ("text", "json")
TYPES = ("job.started", "stage", "data.prepared", "train.started", "train.step", "checkpoint.saved", "eval",
         "push.done", "job.succeeded", "job.preempted", "job.failed", "message")

# Text form's stamp + the trainer's progress line: "15:15:31 step 6/40 (15%) | epoch ... | eta 1m15s".
PROGRESS_LINE = re.compile(r"^\d{2}:\d{2}:\d{2} step \d+/\d+ \(\d+%\)")
# The UTC clock time of a JSON event's `time` ("2026-11-24T20:16:31.123Z"): the text mode's stamp.
_EVENT_CLOCK = re.compile(r"T(\d{2}:\d{2}:\d{2})")
_BAR_ENDS = ("stage", "job.succeeded", "job.preempted", "job.failed")  # events after the training steps


@dataclass
class _Log:
    format: str = "text"
    record: TextIO | None = None  # WORK/events.jsonl while a job runs
    bar: Any = None  # the live progress bar (tqdm) on a terminal, while training
    listeners: tuple[Callable[[dict[str, Any]], None], ...] = ()  # see `listen`


_log = _Log()


def configure(log_format: str | None = None) -> None:
    """Choose the log format: the flag's value, else `TUNER_LOG_FORMAT`, else text."""
    chosen = (log_format or os.environ.get(FORMAT_ENV) or "text").strip().lower()
    if chosen not in FORMATS:
        where = "--log-format" if log_format else FORMAT_ENV
        raise UserError(f"{chosen!r} is not a log format", where=where, fix=f"use one of {', '.join(FORMATS)}")
    _log.format = chosen


def json_format() -> bool:
    return _log.format == "json"


def record_to(path: Path | None, *, fresh: bool = False) -> None:
    """Append every event to `path` (JSON lines) from now on (`fresh`: empty it first); None stops."""
    if _log.record is not None:
        _log.record.close()
        _log.record = None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _log.record = open(path, "w" if fresh else "a", buffering=1)


def emit(type: str, message: str, *, level: str = "info", step: int | None = None,
         metrics: dict[str, float] | None = None, data: dict[str, Any] | None = None,
         error: dict[str, Any] | None = None, stream: TextIO | None = None, stamp: bool = True) -> dict[str, Any]:
    """Log one event (see the module docstring for the forms); returns it as a JSON-ready dict.

    In text form it goes to `stream` (default stdout), after a time stamp unless `stamp` is False;
    JSON always goes to stdout.
    """
    event: dict[str, Any] = {"type": type, "time": _timestamp(), "level": level, "message": message}
    if step is not None:
        event["step"] = step
    if metrics:
        event["metrics"] = {k: _finite(v) for k, v in metrics.items()}
    if data:
        event["data"] = data
    if error:
        event["error"] = error
    line = json.dumps(event, default=str)
    if _log.record is not None:
        _log.record.write(line + "\n")
    for listener in _log.listeners:
        listener(event)
    out = sys.stdout if _log.format == "json" or stream is None else stream
    if _log.format == "json":
        _write(out, line)
    elif type == "train.step" and out.isatty():
        _advance_bar(out, message, step, (data or {}).get("total_steps"))
    else:
        if type in _BAR_ENDS:
            _close_bar()
        _write(out, f"{time.strftime('%H:%M:%S', time.gmtime())} {message}" if stamp else message)
    return event


def listen(listener: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
    """Hand every event from now on to `listener` (which must not raise); returns what stops it."""
    _log.listeners = (*_log.listeners, listener)

    def stop() -> None:
        _log.listeners = tuple(x for x in _log.listeners if x is not listener)

    return stop


def info(message: str) -> None:
    """Log one plain progress line."""
    emit("message", message)


def warn(message: str) -> None:
    """Log one warning line (same stream as the progress lines, so ordering is kept)."""
    emit("message", f"warning: {message}", level="warning")


def duration(seconds: float) -> str:
    """`42s`, `3m05s`, `2h07m`."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def last_progress_line(log: str) -> str | None:
    """The last progress line of a tuner log, if any, as `HH:MM:SS step N/M (P%) | ...`.

    Text logs (`TUNER_LOG_FORMAT=text`) print it as is. JSON logs print one object per line; a
    `train.step` event gives its `message`, stamped with the UTC clock time of its `time` as the text
    mode does. Both kinds may be mixed (library output); lines that are neither, or broken JSON, are skipped.
    """
    for line in reversed(log.splitlines()):
        line = line.strip()
        if PROGRESS_LINE.match(line):
            return line
        if line.startswith("{"):
            progress = _json_progress(line)
            if progress:
                return progress
    return None


def _json_progress(line: str) -> str | None:
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("type") != "train.step":
        return None
    message = event.get("message")
    if not isinstance(message, str) or not message.strip():
        return None
    message = " ".join(message.split())
    clock = _EVENT_CLOCK.search(event["time"]) if isinstance(event.get("time"), str) else None
    return f"{clock.group(1)} {message}" if clock else message


def _write(out: TextIO, line: str) -> None:
    if _log.bar is not None:
        _log.bar.write(line, file=out)
    else:
        out.write(line + "\n")
    out.flush()


def _advance_bar(out: TextIO, message: str, step: int | None, total: int | None) -> None:
    from tqdm import tqdm

    if _log.bar is None:
        _log.bar = tqdm(total=total, unit="step", dynamic_ncols=True, disable=False, file=out)
    if step is not None:
        _log.bar.update(step - _log.bar.n)
    _log.bar.set_postfix_str(message.split(" | ", 1)[-1], refresh=True)


def _close_bar() -> None:
    if _log.bar is not None:
        _log.bar.close()
        _log.bar = None


def _timestamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such values become null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def quiet_libraries() -> None:
    """Keep library chatter out of the job log: progress bars (carriage returns garble
    `kubectl logs`), deprecation notes, and warnings about optional kernels. Errors still show.

    Call before the ML libraries are imported: some read these settings at import time.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # transformers sets its loggers' level from this when it is imported, over any level set before:
    # without it, warnings such as checkpoint sorting's "mtime may not be reliable" reach stderr
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("bitsandbytes", "transformers", "peft", "accelerate", "huggingface_hub", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(transformers|peft|torch|bitsandbytes|accelerate)\b")
