"""Progress lines for `kubectl logs`: one plain line per event, flushed at once, no carriage returns."""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings


def info(message: str) -> None:
    """Print one timestamped progress line to stdout."""
    stamp = time.strftime("%H:%M:%S", time.gmtime())
    sys.stdout.write(f"{stamp} {message}\n")
    sys.stdout.flush()


def warn(message: str) -> None:
    """Print one timestamped warning line to stdout (same stream, so ordering is kept)."""
    info(f"warning: {message}")


def quiet_libraries() -> None:
    """Keep library chatter out of the job log: progress bars (carriage returns garble
    `kubectl logs`), deprecation notes, and warnings about optional kernels. Errors still show.

    Call before the ML libraries are imported: some read these settings at import time.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in ("bitsandbytes", "transformers", "peft", "accelerate", "huggingface_hub", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(transformers|peft|torch|bitsandbytes|accelerate)\b")
