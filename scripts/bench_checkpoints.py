"""Checkpoint overhead at tuner's default interval, and how long a resume takes to train again.

On the embedded default (SmolLM2-135M-Instruct, the demo data, its batch and max_length), all
in one invocation:
1. a fresh run of `--steps` (default 1000) with the default checkpoint plan (every 500 steps or
   10 minutes, last 2 kept): the share of training time spent saving checkpoints, as tuner itself
   measures it (the seconds inside the Trainer's save against the training seconds, from
   result.json);
2. the same job in a new work dir, stopped with SIGTERM at step 20 (a checkpoint where it stops),
   then run again and stopped at its first step: the time from process start to the first step,
   resumed against fresh.

Usage: HF_HUB_OFFLINE=1 python scripts/bench_checkpoints.py [--steps 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "tuner" / "demo"
STEP_RE = re.compile(r" step (\d+)/\d+ ")
STOP_AT = 20


def job_files(scratch: Path, steps: int) -> list[str]:
    """`tuner run` arguments for the demo job with `steps` optimizer steps."""
    workspace = yaml.safe_load((DEMO / "workspace.yaml").read_text())
    workspace["tuning"]["input"]["volumeSource"]["hostPath"]["path"] = str(DEMO / "data")
    ws_path = scratch / "workspace.yaml"
    ws_path.write_text(yaml.safe_dump(workspace))
    config = yaml.safe_load((DEMO / "training-config.yaml").read_text())
    body = yaml.safe_load(config["data"]["training_config.yaml"])
    body["training_config"]["TrainingArguments"].update(max_steps=steps, logging_steps=1)
    config["data"]["training_config.yaml"] = yaml.safe_dump(body)
    config_path = scratch / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    return ["run", str(ws_path), "--config", str(config_path)]


def run(args: list[str], work: Path, stop_at: int | None = None) -> tuple[str, float]:
    """Run tuner, optionally SIGTERM it once it logs `stop_at`; (its log, seconds to its first step)."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "tuner.cli", *args, "--work-dir", str(work), "--output",
                             f"oci:{work.parent / 'layout'}:v1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines, first_step = [], None
    for line in proc.stdout:
        lines.append(line)
        match = STEP_RE.search(line)
        if match and first_step is None:
            first_step = time.monotonic() - started
        if match and stop_at is not None and int(match.group(1)) >= stop_at and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            stop_at = None
    code = proc.wait()
    log = "".join(lines)
    if code not in (0, 143):
        raise SystemExit(f"tuner exited {code}:\n{log}")
    return log, first_step or float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tuner-bench-ckpt-") as folder:
        scratch = Path(folder)
        args = job_files(scratch, options.steps)
        run(args, scratch / "long" / "work")
        train = json.loads((scratch / "long" / "work" / "result.json").read_text())["train"]
        print(f"default plan, {options.steps} steps: {train['checkpoints_saved']} checkpoints, "
              f"{train['checkpoint_seconds']:.3f}s saving of {train['seconds']:.1f}s training = "
              f"{100 * train['checkpoint_seconds'] / train['seconds']:.3f}% overhead", flush=True)
        _, fresh_first = run(args, scratch / "resumed" / "work", stop_at=STOP_AT)
        log, resume_first = run(args, scratch / "resumed" / "work", stop_at=0)  # stopped at its first step
        resumed = re.search(r"resume: from (checkpoint-\d+)", log)
        if not resumed:
            raise SystemExit(f"the second run did not resume:\n{log[-2000:]}")
        print(f"start to first step: fresh {fresh_first:.1f}s, resumed from {resumed.group(1)} {resume_first:.1f}s "
              f"(x{resume_first / fresh_first:.2f})")


if __name__ == "__main__":
    main()
