"""Scratch folders that never outlive their run: removed on every exit path Python sees (an error,
SIGTERM, which the CLI turns into an exit for the commands that use them), and, for the one it
cannot see (SIGKILL, an OOM kill), swept by the next run: a folder is named after the process that
made it, and one whose process is gone is deleted."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
