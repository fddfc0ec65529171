"""Trackers for real: one `tuner run` reporting to a real MLflow tracking server (SQLite backend, on
loopback), to TensorBoard and to W&B offline, drained by SIGTERM half-way and resumed; each tracker
is read back with its own reader and holds the one run with every step the job logged."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from job_support import ROWS, sha256_of
from registry_support import free_port
from test_checkpoints import MAX_STEPS, Run, drained_at_step
from tuner.train.trackers import IMAGE_TAG, TRACKERS_FILE

REPO = Path(__file__).resolve().parents[2]
MLFLOW = REPO / ".venv-mlflow" / "bin" / "mlflow"  # the server, in a venv of its own (scripts/test.sh)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    server = subprocess.Popen([str(MLFLOW), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                               "--default-artifact-root", (root / "artifacts").as_uri(), "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"],
                              stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{url}/health", timeout=5).ok:
                    break
            assert server.poll() is None and time.monotonic() < deadline, (root / "server.log").read_text()
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def tracked_job(mlflow_server, tiny_model_dir, tmp_path_factory) -> dict:
    """A 12-step job drained at step 6 and resumed, reporting to all three trackers."""
    root = tmp_path_factory.mktemp("tracked")
    (root / "data").mkdir()
    (root / "data" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (root / "workspace.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kaito.sh/v1alpha1", "kind": "Workspace", "metadata": {"name": "tracked"},
        "resource": {"instanceType": "Standard_NC6s_v3"},
        "tuning": {"preset": {"name": "smollm2-135m-instruct"}, "method": "lora",
                   "input": {"volumeSource": {"hostPath": {"path": "data"}}},
                   "output": {"image": "registry.example.com/tracked/adapter:1", "imagePushSecret": "push"}}}))
    (root / "training_config.yaml").write_text(yaml.safe_dump({"training_config": {
        "ModelConfig": {"pretrained_model_name_or_path": str(tiny_model_dir)},
        "TrainingArguments": {"max_steps": MAX_STEPS, "save_steps": 3, "logging_steps": 1, "learning_rate": 0.01,
                              "max_length": 64, "report_to": ["mlflow", "tensorboard", "wandb"]}}}))
    work = root / "work"
    args = ["run", str(root / "workspace.yaml"), "--config", str(root / "training_config.yaml"), "--work-dir",
            str(work), "--output", f"oci:{root / 'layout'}:v1"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    first = drained_at_step(args, root, 6, env=env)
    second = Run(args, root, env=env)
    assert second.finish() == 0, second.log
    return {"work": work, "root": root, "logs": (first.log, second.log),
            "result": json.loads((work / "result.json").read_text())}


def logged_losses(result: dict) -> dict[int, float]:
    return {point["step"]: point["loss"] for point in result["loss_history"]}


def mlflow_get(url: str, path: str, **params) -> dict:
    response = requests.get(f"{url}/api/2.0/mlflow/{path}", params=params, timeout=30)
    response.raise_for_status()
    return response.json()


def test_mlflow_holds_one_run_with_every_step_the_provenance_and_the_image(tracked_job, mlflow_server):
    experiment = mlflow_get(mlflow_server, "experiments/get-by-name", experiment_name="tracked")["experiment"]
    runs = requests.post(f"{mlflow_server}/api/2.0/mlflow/runs/search", timeout=30,
                         json={"experiment_ids": [experiment["experiment_id"]]}).json()["runs"]
    assert len(runs) == 1, "the resumed process continued the first process's run"
    run = runs[0]
    run_id = run["info"]["run_id"]
    assert json.loads((tracked_job["work"] / "checkpoints" / TRACKERS_FILE).read_text())["mlflow"] == run_id
    history = mlflow_get(mlflow_server, "metrics/get-history", run_id=run_id, metric_key="loss")["metrics"]
    assert {m["step"]: m["value"] for m in history} == pytest.approx(logged_losses(tracked_job["result"]))
    assert sorted(m["step"] for m in history) == list(range(1, MAX_STEPS + 1))
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    result = tracked_job["result"]
    assert tags["tuner.preset"] == "smollm2-135m-instruct" and tags["tuner.method"] == "lora"
    assert tags["tuner.config_digest"] == result["config_digest"]
    assert tags["tuner.datasets"] == sha256_of(tracked_job["root"] / "data" / "rows.jsonl")
    assert tags[IMAGE_TAG] == f"{result['image']['reference']}@{result['image']['digest']}"
    assert tags["mlflow.runName"] == "tracked"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["learning_rate"] == "0.01" and params["max_steps"] == str(MAX_STEPS)


def test_tensorboard_event_files_hold_every_logged_loss(tracked_job):
    events = EventAccumulator(str(tracked_job["work"] / "runs"))
    events.Reload()
    scalars = {e.step: e.value for e in events.Scalars("train/loss")}
    assert scalars == pytest.approx(logged_losses(tracked_job["result"]), rel=1e-6)  # stored as float32


def test_wandb_offline_keeps_one_run_id_across_the_resume(tracked_job):
    run_id = json.loads((tracked_job["work"] / "checkpoints" / TRACKERS_FILE).read_text())["wandb"]
    runs = sorted((tracked_job["work"] / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)  # one per process, one id
    # the run's records (protobuf in W&B's log format) hold each logged value as JSON text
    records = (runs[-1] / f"run-{run_id}.wandb").read_bytes()
    assert json.dumps(tracked_job["result"]["train"]["final_loss"]).encode() in records
    assert all(f"wandb (project tracked, run {run_id}, offline)" in log for log in tracked_job["logs"])


def test_no_tracker_secret_reaches_the_log_or_the_work_directory(tracked_job, mlflow_server):
    address = mlflow_server.removeprefix("http://")
    assert not any(address in log for log in tracked_job["logs"])
    for path in tracked_job["work"].rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".yaml", ".txt", ".log"):
            assert address not in path.read_text(errors="replace"), path


def test_a_users_mlflow_tags_are_kept_beside_tuners_and_bad_ones_refused(tmp_path, monkeypatch):
    from tuner.errors import UserError
    from tuner.train.trackers import Tracking, environment
    from tuner.workdir import WorkDir

    monkeypatch.setenv("MLFLOW_TAGS", '{"team": "search"}')
    with environment(("mlflow",), Tracking("ws", {"tuner.preset": "p"}), WorkDir(tmp_path), resumed=False):
        assert json.loads(os.environ["MLFLOW_TAGS"]) == {"tuner.preset": "p", "team": "search"}
        assert os.environ["MLFLOW_EXPERIMENT_NAME"] == "ws"
    assert os.environ["MLFLOW_TAGS"] == '{"team": "search"}' and "MLFLOW_EXPERIMENT_NAME" not in os.environ
    monkeypatch.setenv("MLFLOW_TAGS", "team=search")
    with pytest.raises(UserError, match=r"^MLFLOW_TAGS \(environment\): is not a JSON object"):
        with environment(("mlflow",), Tracking("ws"), WorkDir(tmp_path), resumed=False):
            pass
