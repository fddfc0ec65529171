"""The job's work directory, the one owner of its paths, and how files in it are written.

    WORK/inputs/            fetched dataset files, and .fetched.json once all of them are there
    WORK/prepared/          the tokenized example store, kept for the next run (tuner.data.prepared_cache)
    WORK/checkpoints/       resumable training state (tuner.train.checkpoints)
    WORK/adapter/           the trained adapter; training_summary.json, written last, marks it complete
    WORK/image/             the adapter image as an OCI layout, the copy a registry push is made from
    WORK/merged/            the base model with the adapter merged (`tuner run --merged-image`; tuner.train.merge)
    WORK/merged-image/      the merged model's image as an OCI layout, the copy its push is made from
    WORK/events.jsonl       every event of the job (tuner.observe.events), read by `tuner report`
    WORK/result.json        the job's summary with where its adapter went

Every file that marks something finished is written with `atomic_write`: a crash leaves the old
file or the new one, never half of one. Scratch folders (`scratch_dir`) never outlive their run:
removed on every exit path Python sees (an error, SIGTERM, which the CLI turns into an exit for the
commands that use them), and, for the one it cannot see (SIGKILL, an OOM kill), swept by the next
run: a folder is named after the process that made it, and one whose process is gone is deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ADAPTER_DIR = "adapter"
SUMMARY_FILE = "training_summary.json"  # in the adapter folder, so in the output and the image
CURVE_FILE = "loss_curve.png"  # in the adapter folder
EVENTS_FILE = "events.jsonl"


@dataclass(frozen=True)
class WorkDir:
    """Every path of one job's work directory (see the module docstring for the layout)."""

    root: Path

    @property
    def inputs(self) -> Path:
        return self.root / "inputs"

    @property
    def fetched_marker(self) -> Path:
        return self.inputs / ".fetched.json"

    @property
    def prepared(self) -> Path:
        return self.root / "prepared"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / ADAPTER_DIR

    @property
    def summary(self) -> Path:
        return self.adapter / SUMMARY_FILE

    @property
    def curve(self) -> Path:
        return self.adapter / CURVE_FILE

    @property
    def image(self) -> Path:
        return self.root / "image"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def merged_image(self) -> Path:
        return self.root / "merged-image"

    @property
    def events(self) -> Path:
        return self.root / EVENTS_FILE

    @property
    def runs(self) -> Path:
        """TensorBoard's event files (TrainingArguments.report_to: tensorboard)."""
        return self.root / "runs"

    @property
    def result(self) -> Path:
        return self.root / "result.json"


@contextmanager
def atomic_output(path: Path, *, durable: bool = True) -> Iterator[IO[bytes]]:
    """A binary file that becomes `path` when the block ends without an error: written beside it
    under a temporary name, flushed to disk (unless not `durable`: a file inside a folder that is
    itself renamed into place once complete), then renamed over it. On an error nothing changes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write `data` to `path` atomically (see atomic_output)."""
    with atomic_output(path) as handle:
        handle.write(data.encode() if isinstance(data, str) else data)


def atomic_write_json(path: Path, value: Any) -> None:
    """`value` as indented, key-sorted JSON, written atomically."""
    atomic_write(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


@contextmanager
def scratch_dir(prefix: str, parent: Path | None = None) -> Iterator[Path]:
    """A new folder `<parent>/<prefix><pid>-<random>` for the block (parent: the temporary folder)."""
    parent = Path(parent or tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    sweep(prefix, parent)
    folder = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def sweep(prefix: str, parent: Path) -> list[Path]:
    """Delete the `<prefix><pid>-*` folders in `parent` whose process no longer runs; return them."""
    swept = []
    for folder in parent.glob(f"{prefix}*"):
        pid = folder.name[len(prefix):].split("-", 1)[0]
        if folder.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            swept.append(folder)
    return swept


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, and not ours to clean
        return True
    return True
