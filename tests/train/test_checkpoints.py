"""Checkpoints and resume, for real: `tuner run` processes killed (SIGKILL) or drained (SIGTERM)
mid-training on the tiny model, then run again."""

from __future__ import annotations

import json
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from job_support import ROWS, workspace
from tuner.errors import EXIT_PREEMPTED, EXIT_USER_ERROR
from tuner.train.checkpoints import COMPLETE_MARKER, IDENTITY_FILE

MAX_STEPS, SAVE_STEPS = 12, 3
KILL_STEPS = sorted(random.Random(7).sample(range(4, MAX_STEPS), 3))  # fixed seed: 5, 7, 9 (each phase of 3)
STEP_RE = re.compile(r" step (\d+)/(\d+) ")


def config(tmp_path: Path, model_dir: Path, **overrides) -> Path:
    args = {"max_steps": MAX_STEPS, "save_steps": SAVE_STEPS, "logging_steps": 1, "learning_rate": 0.01,
            "max_length": 64} | overrides
    path = tmp_path / "training_config.yaml"
    path.write_text(yaml.safe_dump({"training_config": {
        "ModelConfig": {"pretrained_model_name_or_path": str(model_dir)}, "TrainingArguments": args}}))
    return path


@pytest.fixture()
def job(tmp_path, tiny_model_dir, http_server) -> list[str]:
    """`tuner run` arguments for a 12-step job on rows served over loopback, checkpointing every 3 steps."""
    root, base = http_server
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return ["run", str(workspace(tmp_path, [f"{base}/rows.jsonl"])), "--config",
            str(config(tmp_path, tiny_model_dir)), "--work-dir", str(tmp_path / "work"),
            "--output", f"oci:{tmp_path / 'layout'}:v1", "--allow-private-urls"]


class Run:
    """A `python -m tuner.cli` process (or `launcher` + `-m tuner.cli`) whose output lines are read as they come."""

    def __init__(self, args: list[str], cwd: Path, launcher: list[str] | None = None, env: dict | None = None):
        self.started = time.monotonic()
        command = [*(launcher or [sys.executable]), "-m", "tuner.cli", *args]
        self.proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     bufsize=1, env=env)
        self.lines: list[str] = []
        self.first_step_at: float | None = None  # seconds from start to the first step's line
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def _next(self, deadline: float) -> str | None:
        line = self._queue.get(timeout=max(deadline - time.monotonic(), 0.01))
        if line is not None:
            self.lines.append(line)
            if self.first_step_at is None and STEP_RE.search(line):
                self.first_step_at = time.monotonic() - self.started
        return line

    def wait_for_step(self, step: int, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while self.last_step() < step:
            if self._next(deadline) is None:
                raise AssertionError(f"exited before step {step}:\n{self.log}")

    def finish(self, timeout: float = 300) -> int:
        deadline = time.monotonic() + timeout
        while self._next(deadline) is not None:
            pass
        return self.proc.wait(timeout=max(deadline - time.monotonic(), 1))

    def last_step(self) -> int:
        steps = [int(m.group(1)) for line in self.lines if (m := STEP_RE.search(line))]
        return max(steps, default=0)

    @property
    def log(self) -> str:
        return "".join(self.lines)


def run(args: list[str], cwd: Path) -> tuple[int, Run]:
    process = Run(args, cwd)
    return process.finish(), process


def drained_at_step(args: list[str], cwd: Path, step: int, env: dict | None = None) -> Run:
    """A run sent SIGTERM once it logged `step`, checked to have exited with the retryable code."""
    first = Run(args, cwd, env=env)
    first.wait_for_step(step)
    first.proc.send_signal(signal.SIGTERM)
    assert first.finish() == EXIT_PREEMPTED, first.log
    return first


def complete_steps(work: Path) -> list[int]:
    folder = work / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*") if (p / COMPLETE_MARKER).is_file())


def resumed_from(log: str) -> tuple[int, int]:
    match = re.search(r"resume: from checkpoint-(\d+) \(step (\d+) of (\d+)\)", log)
    assert match, log
    assert match.group(1) == match.group(2)
    return int(match.group(2)), int(match.group(3))


def assert_finished(work: Path, tiny_model_dir: Path) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    summary = json.loads((work / "result.json").read_text())
    assert summary["train"]["steps"] == MAX_STEPS and summary["train"]["total_steps"] == MAX_STEPS
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), work / "adapter")
    assert any("lora_A" in name for name, _ in model.named_parameters())
    return summary


@pytest.mark.parametrize("kill_at", KILL_STEPS)
def test_sigkill_mid_run_resumes_from_the_last_checkpoint(job, tmp_path, tiny_model_dir, kill_at):
    work = tmp_path / "work"
    first = Run(job, tmp_path)
    first.wait_for_step(kill_at)
    first.proc.send_signal(signal.SIGKILL)
    assert first.finish() == -signal.SIGKILL
    killed_after = first.last_step()
    saved = complete_steps(work)
    assert not (work / "adapter").exists() and not (work / "result.json").exists()

    code, second = run(job, tmp_path)
    assert code == 0, second.log
    if saved:
        step, total = resumed_from(second.log)
        assert (step, total) == (saved[-1], MAX_STEPS)
        assert killed_after - step <= SAVE_STEPS  # at most one checkpoint interval is trained again
        assert f" step {step + 1}/{MAX_STEPS} " in second.log and f" step {step}/{MAX_STEPS} " not in second.log
    else:  # killed before the first checkpoint completed: a fresh start
        assert "resume: from" not in second.log and killed_after <= SAVE_STEPS
    summary = assert_finished(work, tiny_model_dir)
    assert summary["train"]["resumed_from_step"] == (saved[-1] if saved else 0)
    assert len(complete_steps(work)) <= 2  # save_total_limit's default


def test_sigterm_saves_where_it_stops_and_exits_retryable(job, tmp_path, tiny_model_dir):
    work = tmp_path / "work"
    first = drained_at_step(job, tmp_path, 4)
    stopped = first.last_step()
    assert stopped < MAX_STEPS
    assert complete_steps(work)[-1] == stopped
    assert f"preempted: stopped at step {stopped} of {MAX_STEPS}" in first.log
    assert not (work / "adapter").exists() and not (work / "result.json").exists()

    code, second = run(job, tmp_path)
    assert code == 0, second.log
    assert resumed_from(second.log) == (stopped, MAX_STEPS)
    assert_finished(work, tiny_model_dir)


def test_checkpoints_of_another_config_are_refused_unless_restart(job, tmp_path, tiny_model_dir):
    work = tmp_path / "work"
    drained_at_step(job, tmp_path, 4)
    config(tmp_path, tiny_model_dir, learning_rate=0.02)  # the same path, another config

    code, refused = run(job, tmp_path)
    assert code == EXIT_USER_ERROR
    errors = [line for line in refused.lines if line.startswith("error:")]
    assert len(errors) == 1 and "holds checkpoints of a different job (training config" in errors[0], refused.log
    assert "--restart" in errors[0]

    code, restarted = run([*job, "--restart"], tmp_path)
    assert code == 0, restarted.log
    assert "deleted the old checkpoints" in restarted.log and "resume: from" not in restarted.log
    assert f" step 1/{MAX_STEPS} " in restarted.log
    assert_finished(work, tiny_model_dir)
    # the record (and so the loss curve in the image) holds the restarted run alone, not the old run's tail
    recorded = [json.loads(line) for line in (work / "events.jsonl").read_text().splitlines()]
    assert [e["type"] for e in recorded].count("job.started") == 1
    assert [e["step"] for e in recorded if e["type"] == "train.step"] == list(range(1, MAX_STEPS + 1))
    assert json.loads((work / "checkpoints" / IDENTITY_FILE).read_text())["config_digest"] == \
        json.loads((work / "result.json").read_text())["config_digest"]


def test_an_incomplete_checkpoint_is_deleted_not_resumed(job, tmp_path, tiny_model_dir):
    work = tmp_path / "work"
    drained_at_step(job, tmp_path, 4)
    stopped = complete_steps(work)[-1]
    # a save cut short: a later checkpoint without the marker, with some of its files
    partial = work / "checkpoints" / f"checkpoint-{stopped + 1}"
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"truncated")

    code, second = run(job, tmp_path)
    assert code == 0, second.log
    assert f"deleted checkpoint-{stopped + 1}: its save did not complete" in second.log
    assert resumed_from(second.log) == (stopped, MAX_STEPS)
    assert not partial.exists() or (partial / COMPLETE_MARKER).is_file()  # gone, or saved anew and complete
    assert_finished(work, tiny_model_dir)


def test_a_finished_job_run_again_does_no_work_and_says_where_the_results_are(job, tmp_path, tiny_model_dir):
    code, first = run(job, tmp_path)
    assert code == 0, first.log
    work = tmp_path / "work"
    outputs = [work / "adapter" / "adapter_model.safetensors", work / "prepared" / "examples.arrow"]
    before = [path.stat().st_mtime_ns for path in outputs]
    digest = json.loads((work / "result.json").read_text())["image"]["digest"]

    code, again = run(job, tmp_path)
    assert code == 0, again.log
    assert "(fetched earlier, sha256" in again.log
    assert f"prepare: reusing the data prepared earlier in {work / 'prepared'}" in again.log
    assert "train: skipped: this job finished training on" in again.log
    assert not STEP_RE.search(again.log) and "stage train" not in again.log
    assert (f"done: nothing to redo; adapter {work / 'adapter'}, result {work / 'result.json'}, "
            f"curve {work / 'adapter' / 'loss_curve.png'}, image oci:{tmp_path / 'layout'}:v1@{digest}") in again.log
    assert [path.stat().st_mtime_ns for path in outputs] == before
    assert_finished(work, tiny_model_dir)
