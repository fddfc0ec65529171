"""The job's stages as `stage` events (started, done in N s), and how long each took."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from tuner.observe import events


class Stages:
    """The durations of the stages that finished, in the order they ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage and log its start and, when it succeeds, its duration."""
        started = time.monotonic()
        events.emit("stage", f"stage {name}: started", data={"name": name, "state": "started"})
        yield
        self.seconds[name] = time.monotonic() - started
        events.emit("stage", f"stage {name}: done in {self.seconds[name]:.1f}s",
                    metrics={"seconds": round(self.seconds[name], 3)}, data={"name": name, "state": "done"})
