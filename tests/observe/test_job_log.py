"""What users see of a real run: the JSON events of a tiny job (exact fields, numbers equal to the
trainer's own), the summary, base-vs-adapter evaluation, the loss curve PNG, the termination
message, and the text log as captured through a pipe."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import serving
from job_support import unpack_layout, workspace
from tuner.observe.events import TYPES

pytestmark = pytest.mark.slow

STEPS, SAVE_STEPS = 8, 4
# an overfit set: one conversation ten times, so the held-out rows are the ones it trains on
ROWS = [{"messages": [{"role": "user", "content": "What is the team's mascot?"},
                      {"role": "assistant", "content": "Our mascot is a purple heron named Juniper."}]}] * 10
KEYS = {"type", "time", "level", "message"}
OPTIONAL_KEYS = {"step", "metrics", "data", "error"}
STEP_METRICS = {"epoch", "loss", "learning_rate", "grad_norm", "tokens_per_second", "eta_seconds", "rss_memory_gib"}
BLUE, RED = (31, 119, 180), (214, 39, 40)  # tuner.report's train and eval colours


def config(tmp_path: Path, model_dir: Path) -> Path:
    path = tmp_path / "training_config.yaml"
    path.write_text(yaml.safe_dump({"training_config": {
        "ModelConfig": {"pretrained_model_name_or_path": str(model_dir)},
        "TrainingArguments": {"max_steps": STEPS, "save_steps": SAVE_STEPS, "logging_steps": 1,
                              "learning_rate": 0.01, "max_length": 64, "per_device_train_batch_size": 4},
        "DatasetConfig": {"train_test_split": 0.8}}}))
    return path


def run_tuner(tmp_path: Path, model_dir: Path, base_url: str, *extra: str) -> subprocess.CompletedProcess:
    """`tuner run` as a user's shell pipe would see it (stdout and stderr are pipes, not a terminal)."""
    env = {**os.environ, "TUNER_TERMINATION_LOG": str(tmp_path / "termination-log")}
    return subprocess.run(
        [sys.executable, "-m", "tuner.cli", "run", str(workspace(tmp_path, [f"{base_url}/overfit.jsonl"])),
         "--config", str(config(tmp_path, model_dir)), "--work-dir", str(tmp_path / "work"),
         "--output", f"oci:{tmp_path / 'layout'}:v1", "--allow-private-urls", *extra],
        capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("served")
    (root / "overfit.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    with serving(root) as base:
        yield base


@pytest.fixture(scope="module")
def json_run(tmp_path_factory, tiny_model_dir, served):
    """(work dir, the events printed, the process) of one finished run with --log-format json."""
    tmp_path = tmp_path_factory.mktemp("json-run")
    done = run_tuner(tmp_path, tiny_model_dir, served, "--log-format", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    return tmp_path, [json.loads(line) for line in done.stdout.splitlines()], done


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, tiny_model_dir, served) -> subprocess.CompletedProcess:
    done = run_tuner(tmp_path_factory.mktemp("text-run"), tiny_model_dir, served)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def of_type(printed: list[dict], kind: str) -> list[dict]:
    return [e for e in printed if e["type"] == kind]


def trainer_state(work: Path) -> dict:
    return json.loads((work / "checkpoints" / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())


def test_every_line_is_an_event_of_the_documented_schema(json_run):
    _, printed, done = json_run
    for event in printed:
        assert KEYS <= set(event) <= KEYS | OPTIONAL_KEYS, event
        assert event["type"] in TYPES and event["level"] in ("info", "warning", "error")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", event["time"])
    assert printed[0]["type"] == "job.started" and printed[-1]["type"] == "job.succeeded"
    assert done.stderr == ""


def test_job_started_names_the_preset_method_and_devices(json_run, tmp_path_factory):
    tmp_path, printed, _ = json_run
    data = printed[0]["data"]
    assert (data["preset"], data["method"], data["workspace"], data["world_size"]) == (
        "smollm2-135m-instruct", "lora", "e2e", 1)
    assert data["devices"].startswith("cpu (") and data["work_dir"] == str(tmp_path / "work")


def test_stages_are_timed_in_order(json_run):
    _, printed, _ = json_run
    stages = [(e["data"]["name"], e["data"]["state"]) for e in of_type(printed, "stage")]
    assert stages == [(name, state) for name in ("fetch", "load", "prepare", "train", "package")
                      for state in ("started", "done")]
    assert all(e["metrics"]["seconds"] >= 0 for e in of_type(printed, "stage") if e["data"]["state"] == "done")


def test_data_prepared_counts_the_split(json_run):
    _, printed, _ = json_run
    [prepared] = of_type(printed, "data.prepared")
    assert {k: prepared["metrics"][k] for k in ("rows_read", "rows_kept", "train_rows", "eval_rows")} == {
        "rows_read": 10, "rows_kept": 10, "train_rows": 8, "eval_rows": 2}


def test_train_step_events_carry_the_trainers_own_numbers(json_run):
    tmp_path, printed, _ = json_run
    steps = of_type(printed, "train.step")
    logged = [e for e in trainer_state(tmp_path / "work")["log_history"] if "loss" in e]
    assert [e["step"] for e in steps] == list(range(1, STEPS + 1)) == [e["step"] for e in logged]
    for event, entry in zip(steps, logged, strict=True):
        assert set(event["metrics"]) == STEP_METRICS and event["data"] == {"total_steps": STEPS}
        assert event["metrics"]["loss"] == entry["loss"]
        assert event["metrics"]["learning_rate"] == entry["learning_rate"]
        assert event["metrics"]["grad_norm"] == entry["grad_norm"]
        assert event["metrics"]["epoch"] == round(entry["epoch"], 4)
        assert event["message"].startswith(f"step {event['step']}/{STEPS} (")


def test_train_started_reports_the_epochs_max_steps_really_covers(json_run):
    """max_steps 8 over 8 train rows in batches of 4 is 4 epochs, not TrainingArguments' default 3."""
    tmp_path, printed, _ = json_run
    [started] = of_type(printed, "train.started")
    state = trainer_state(tmp_path / "work")
    assert started["data"]["epochs"] == state["num_train_epochs"] == state["epoch"] == 4
    assert started["message"].startswith(f"train: {STEPS} steps, 4 epochs, effective batch 4 ")


def test_the_base_model_is_evaluated_first_then_the_adapter_during_and_after(json_run):
    tmp_path, printed, _ = json_run
    evals = of_type(printed, "eval")
    assert [(e["step"], e["data"]["model"]) for e in evals] == [(0, "base"), (2, "adapter"), (4, "adapter"),
                                                                (6, "adapter"), (8, "adapter")]
    logged = [e["eval_loss"] for e in trainer_state(tmp_path / "work")["log_history"] if "eval_loss" in e]
    assert [e["metrics"]["eval_loss"] for e in evals[1:]] == logged
    assert evals[-1]["metrics"]["eval_loss"] < evals[0]["metrics"]["eval_loss"]  # it learned the held-out rows


def test_checkpoint_events_name_each_saved_checkpoint(json_run):
    tmp_path, printed, _ = json_run
    saved = of_type(printed, "checkpoint.saved")
    assert [e["step"] for e in saved] == [SAVE_STEPS, STEPS]
    assert [e["data"]["path"] for e in saved] == [str(tmp_path / "work" / "checkpoints" / f"checkpoint-{s}")
                                                  for s in (SAVE_STEPS, STEPS)]


def test_summary_numbers_are_the_trainers(json_run):
    tmp_path, printed, _ = json_run
    summary = json.loads((tmp_path / "work" / "result.json").read_text())
    state = trainer_state(tmp_path / "work")
    evals = of_type(printed, "eval")
    assert summary["train"]["steps"] == state["global_step"] == STEPS
    assert summary["train"]["epochs"] == round(state["epoch"], 4)
    assert summary["train"]["tokens_seen"] == state["num_input_tokens_seen"]
    assert summary["train"]["final_loss"] == [e["loss"] for e in state["log_history"] if "loss" in e][-1]
    assert summary["eval"] == {"rows": 2, "base_loss": evals[0]["metrics"]["eval_loss"],
                               "adapter_loss": evals[-1]["metrics"]["eval_loss"]}
    assert set(summary["stage_seconds"]) == {"fetch", "load", "prepare", "train", "package"}


def test_job_succeeded_and_push_done_give_the_image_digest(json_run):
    tmp_path, printed, _ = json_run
    summary = json.loads((tmp_path / "work" / "result.json").read_text())
    [push] = of_type(printed, "push.done")
    succeeded = printed[-1]
    digest = summary["image"]["digest"]
    assert push["data"]["digest"] == digest and succeeded["data"]["image"].endswith(f"@{digest}")
    assert succeeded["metrics"]["train_loss"] == summary["train"]["train_loss"]
    assert succeeded["metrics"]["eval_loss"] == summary["eval"]["adapter_loss"]
    assert succeeded["metrics"]["eval_loss_base"] == summary["eval"]["base_loss"]
    assert succeeded["metrics"]["trained_tokens"] == summary["train"]["tokens_seen"]


def test_the_image_holds_the_summary_and_the_loss_curve(json_run):
    tmp_path, _, _ = json_run
    files = {p.name: p for p in unpack_layout(tmp_path / "layout", tmp_path / "unpacked")}
    assert {"training_summary.json", "loss_curve.png", "adapter_model.safetensors"} <= set(files)
    in_image = json.loads(files["training_summary.json"].read_text())
    assert in_image["eval"] == json.loads((tmp_path / "work" / "result.json").read_text())["eval"]


def test_the_loss_curve_shows_train_and_eval(json_run):
    tmp_path, _, _ = json_run
    with Image.open(tmp_path / "work" / "adapter" / "loss_curve.png") as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("RGB")).astype(int)
    for colour in (BLUE, RED):
        close = np.abs(pixels - np.array(colour)).max(axis=-1) <= 40
        assert close.sum() > 100, colour


def test_the_events_record_holds_what_was_printed(json_run):
    tmp_path, printed, _ = json_run
    recorded = [json.loads(line) for line in (tmp_path / "work" / "events.jsonl").read_text().splitlines()]
    assert recorded == printed


def test_the_termination_message_is_the_outcome(json_run):
    tmp_path, printed, _ = json_run
    outcome = json.loads((tmp_path / "termination-log").read_text())
    summary = json.loads((tmp_path / "work" / "result.json").read_text())
    assert outcome["status"] == "succeeded" and outcome["steps"] == STEPS
    assert outcome["eval_loss"] == {"base": round(summary["eval"]["base_loss"], 4),
                                    "adapter": round(summary["eval"]["adapter_loss"], 4)}
    assert outcome["image"] == f"oci:{tmp_path / 'layout'}:v1@{summary['image']['digest']}"


def test_the_image_annotations_carry_the_real_runs_losses(json_run):
    from tuner.oci.image import read_layout_manifest
    from tuner.spec.targets import OciLayoutTarget

    tmp_path, _, _ = json_run
    summary = json.loads((tmp_path / "work" / "result.json").read_text())
    _, manifest = read_layout_manifest(OciLayoutTarget(tmp_path / "layout", "v1"))
    annotations = manifest["annotations"]
    assert annotations["dev.tuner.eval-loss"] == f"{summary['eval']['adapter_loss']:.4f}"
    assert annotations["dev.tuner.train-loss"] == f"{summary['train']['train_loss']:.4f}"
    assert annotations["dev.tuner.config-digest"] == summary["config_digest"]


def test_tuner_report_redraws_with_any_logged_metric(json_run):
    tmp_path, _, _ = json_run
    out = tmp_path / "lr.png"
    done = subprocess.run([sys.executable, "-m", "tuner.cli", "report", str(tmp_path / "work"), "--metric", "loss",
                           "--metric", "learning_rate", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with Image.open(out) as image:
        assert image.size == (800, 900)  # two stacked plots


def test_a_piped_text_log_has_no_carriage_returns_or_escape_codes(text_run):
    log = text_run.stdout + text_run.stderr
    assert "\r" not in log and "\x1b" not in log


def test_the_text_log_has_a_banner_step_lines_and_a_summary(text_run):
    lines = text_run.stdout.splitlines()
    assert sum(" train: 8 steps, " in line for line in lines) == 1
    step = re.compile(r"\d\d:\d\d:\d\d step (\d+)/8 \(\d+%\) \| epoch \d+\.\d\d \| loss [\d.e+-]+ \| "
                      r"lr \d\.\de[+-]\d\d \| [\d,]+ tok/s \| eta \w+ \| rss \d+\.\d GiB")
    assert [int(m.group(1)) for line in lines if (m := step.fullmatch(line))] == list(range(1, STEPS + 1))
    assert any(re.search(r"summary: loss train [\d.]+ \(mean\), last [\d.]+ \| eval: base [\d.]+ -> adapter "
                         r"[\d.]+ \(-\d+%\)", line) for line in lines)
    assert lines[-1].split(" ", 1)[1].startswith("done: trained; adapter ")


def test_a_json_failure_is_one_job_failed_event_and_the_termination_message(tmp_path, tiny_model_dir):
    bad = tmp_path / "workspace.yaml"
    bad.write_text("apiVersion: kaito.sh/v1beta1\nkind: Workspace\nmetadata: {name: x}\ntuning: {method: lorax}\n")
    env = {**os.environ, "TUNER_TERMINATION_LOG": str(tmp_path / "termination-log"), "TUNER_LOG_FORMAT": "json"}
    done = subprocess.run([sys.executable, "-m", "tuner.cli", "run", str(bad)], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and done.stderr == ""
    [event] = [json.loads(line) for line in done.stdout.splitlines()]
    assert (event["type"], event["level"], event["error"]["code"]) == ("job.failed", "error", "user_error")
    assert event["message"] == f"error: {event['error']['message']}" and event["error"]["param"]
    outcome = json.loads((tmp_path / "termination-log").read_text())
    assert outcome == {"status": "failed", "exit_code": 2, "error": event["error"]}
