"""Progress lines for `kubectl logs`: one plain line per event, flushed at once, no carriage returns."""

from __future__ import annotations

import sys
import time


def info(message: str) -> None:
    """Print one timestamped progress line to stdout."""
    stamp = time.strftime("%H:%M:%S", time.gmtime())
    sys.stdout.write(f"{stamp} {message}\n")
    sys.stdout.flush()


def warn(message: str) -> None:
    """Print one timestamped warning line to stdout (same stream, so ordering is kept)."""
    info(f"warning: {message}")
