"""`tuner run --metrics-port`: the job's metrics fed by its events, scraped over HTTP and parsed with
prometheus_client's own parsers; a port in use fails before any work; and a real Prometheus server
(Debian's `prometheus`, installed by scripts/test.sh) scraping a real training job on the tiny model
holds the loss the run logged."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_prometheus

from job_support import ROWS, configmap, workspace
from registry_support import free_port
from tuner import cli
from tuner.errors import EXIT_USER_ERROR
from tuner.observe import events, metrics
from tuner.observe.metrics import FINAL_SCRAPE_ENV, JobMetrics

LABELS = {"workspace": "ws", "preset": "smollm2-135m-instruct", "method": "lora"}
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def scrape(port: int, accept: str | None = None) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return answer.read().decode()


def samples(text: str, parse=parse_prometheus) -> dict[tuple[str, frozenset], float]:
    """{(sample name, its labels): value} of an exposition."""
    return {(s.name, frozenset(s.labels.items())): s.value for family in parse(text) for s in family.samples}


def value(found: dict, name: str, **extra: str) -> float:
    return found[name, frozenset({**LABELS, **extra}.items())]


@pytest.fixture()
def served():
    """A JobMetrics on a free loopback port, listening to the events; yields (metrics, port)."""
    job = JobMetrics(**LABELS)
    server = job.serve(0, "127.0.0.1")
    stop = events.listen(job.observe)
    yield job, server.server_address[1]
    stop()
    server.shutdown()
    server.server_close()


def a_short_job() -> None:
    """The events a two-step job logs, in their order."""
    for name in ("fetch", "load", "prepare"):
        events.emit("stage", f"stage {name}: started", data={"name": name, "state": "started"})
        events.emit("stage", f"stage {name}: done", metrics={"seconds": 0.5}, data={"name": name, "state": "done"})
    events.emit("stage", "stage train: started", data={"name": "train", "state": "started"})
    events.emit("eval", "eval: base", step=0, metrics={"eval_loss": 3.25}, data={"model": "base"})
    events.emit("train.started", "train: 2 steps", step=0, data={"total_steps": 2})
    for step, loss in ((1, 2.5), (2, 1.75)):
        events.emit("train.step", f"step {step}/2", step=step, data={"total_steps": 2}, metrics={
            "epoch": step / 2, "loss": loss, "learning_rate": 0.01 / step, "grad_norm": 0.75,
            "tokens_per_second": 1234.5, "eta_seconds": 2.0 - step, "rss_memory_gib": 1.5})
    events.emit("checkpoint.saved", "checkpoint: checkpoint-2 saved", step=2, metrics={"seconds": 0.25})
    events.emit("eval", "eval: step 2/2", step=2, metrics={"eval_loss": 1.5, "eval_runtime": 0.1},
                data={"model": "adapter"})


def test_a_scrape_shows_what_the_events_said(served):
    job, port = served
    a_short_job()
    found = samples(scrape(port))
    assert value(found, "tuner_train_step") == 2 and value(found, "tuner_train_max_steps") == 2
    assert value(found, "tuner_train_loss") == 1.75 and value(found, "tuner_train_learning_rate") == 0.005
    assert value(found, "tuner_train_epoch") == 1.0 and value(found, "tuner_train_grad_norm") == 0.75
    assert value(found, "tuner_tokens_per_second") == 1234.5 and value(found, "tuner_train_eta_seconds") == 0.0
    assert value(found, "tuner_peak_memory_bytes", memory="rss") == 1.5 * 2**30
    assert value(found, "tuner_eval_loss", model="base") == 3.25
    assert value(found, "tuner_eval_loss", model="adapter") == 1.5
    assert [value(found, "tuner_stage_active", stage=s) for s in ("fetch", "load", "prepare", "train")] == [0, 0, 0, 1]
    assert value(found, "tuner_stage_duration_seconds", stage="prepare") == 0.5
    assert ("tuner_stage_duration_seconds", frozenset({**LABELS, "stage": "train"}.items())) not in found
    assert value(found, "tuner_checkpoints_saved_total") == 1
    assert value(found, "tuner_checkpoint_save_duration_seconds") == 0.25
    assert 0 <= value(found, "tuner_checkpoint_age_seconds") < 60
    assert value(found, "tuner_last_checkpoint_timestamp_seconds") == pytest.approx(time.time(), abs=60)
    assert value(found, "tuner_events_total", type="train.step") == 2
    assert value(found, "tuner_events_total", type="stage") == 7
    assert found["process_resident_memory_bytes", frozenset()] > 0  # the live RSS, beside the logged peak
    # and the same numbers in the OpenMetrics form, which Prometheus asks for first
    assert samples(scrape(port, OPENMETRICS), parse_openmetrics)["tuner_train_loss", frozenset(LABELS.items())] == 1.75


def test_nothing_is_made_up_before_its_first_event(served):
    job, port = served
    events.emit("stage", "stage fetch: started", data={"name": "fetch", "state": "started"})
    names = {name for name, _ in samples(scrape(port))}
    assert "tuner_stage_active" in names
    assert not names & {"tuner_train_loss", "tuner_train_step", "tuner_eval_loss", "tuner_checkpoint_age_seconds"}
    # a loss that was not a finite number (the event holds null) is NaN, not the last good value
    events.emit("train.step", "step 1/2", step=1, metrics={"loss": math.inf}, data={"total_steps": 2})
    assert math.isnan(value(samples(scrape(port)), "tuner_train_loss"))


def test_the_checkpoint_age_is_worked_out_when_scraped():
    now = [1000.0]
    job = JobMetrics(**LABELS, clock=lambda: now[0])
    job.observe({"type": "checkpoint.saved", "step": 5, "metrics": {"seconds": 1.0}})
    now[0] = 1042.5
    text = json.dumps([s.value for f in job.registry.collect() if f.name == "tuner_checkpoint_age_seconds"
                       for s in f.samples])
    assert text == "[42.5]"


def test_an_event_a_metric_cannot_read_never_reaches_the_job(capsys):
    job = JobMetrics(**LABELS)
    job.observe({"no": "type"})
    job.observe({"no": "type"})
    assert capsys.readouterr().err.count("warning: metrics: skipped") == 1  # said once
    job.observe({"type": "train.step", "step": 3, "metrics": {"loss": 0.5}})
    assert job.registry.get_sample_value("tuner_train_loss", LABELS) == 0.5


def test_the_final_wait_ends_at_the_first_scrape_that_saw_the_last_event(served):
    job, port = served
    events.emit("train.step", "step 1/2", step=1, metrics={"loss": 2.0}, data={"total_steps": 2})
    assert job.wait_for_scrape(0.05) is False  # nobody scraped
    scrape(port)
    assert job.wait_for_scrape(0) is True
    events.emit("train.step", "step 2/2", step=2, metrics={"loss": 1.0}, data={"total_steps": 2})
    assert job.wait_for_scrape(0) is False  # the scrape before it does not count


def test_the_server_never_keeps_the_process_alive():
    code = ("from tuner.observe.metrics import JobMetrics\n"
            "JobMetrics(workspace='w', preset='p', method='lora').serve(0, '127.0.0.1')\n"
            "print('served')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, "served\n"), done.stderr


def test_a_port_in_use_is_one_error_line_before_any_work(tmp_path, tiny_model_dir, capsys):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = cli.main(["run", str(workspace(tmp_path, ["https://datasets.example.com/rows.jsonl"])),
                         "--config", str(configmap(tmp_path, tiny_model_dir)), "--work-dir", str(tmp_path / "work"),
                         "--output", f"oci:{tmp_path / 'layout'}:v1", "--metrics-port", str(port)])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR
    assert err == f"error: --metrics-port: cannot serve metrics on 0.0.0.0:{port}: Address already in use; " \
                  "choose a free port\n"
    assert not (tmp_path / "work").exists()  # nothing fetched, no work dir


@pytest.mark.parametrize(("rank", "serves"), [("0", True), ("1", False)])
def test_under_torchrun_only_rank_0_serves(tmp_path, tiny_model_dir, monkeypatch, rank, serves):
    from tuner.cli import commands
    from tuner.spec.plan import plan_job

    plan = plan_job(workspace(tmp_path, ["https://datasets.example.com/rows.jsonl"]),
                    config_path=configmap(tmp_path, tiny_model_dir))
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("LOCAL_RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    port = free_port()
    with commands._metrics(argparse.Namespace(metrics_port=port), plan) as job:
        assert (job is not None) == serves
        if serves:
            assert job.labels == {"workspace": "e2e", "preset": "smollm2-135m-instruct", "method": "lora"}
            scrape(port)
        else:
            with pytest.raises(OSError):
                scrape(port)


def test_the_final_scrape_wait_is_checked_before_any_work(monkeypatch):
    monkeypatch.setenv(FINAL_SCRAPE_ENV, "soon")
    with pytest.raises(metrics.UserError, match=r"TUNER_METRICS_FINAL_SCRAPE_SECONDS='soon' is not a number"):
        with metrics.serving(free_port(), address="127.0.0.1", **LABELS):
            raise AssertionError("not reached")


# ------------------------------------------------------------ a real Prometheus scraping a real job


class Prometheus:
    """Debian's prometheus on 127.0.0.1, scraping `target` every second, its data in a scratch folder."""

    def __init__(self, folder: Path, target: str):
        binary = shutil.which("prometheus")
        assert binary is not None, "prometheus is not installed (scripts/test.sh installs it)"
        self.port = free_port()
        config = folder / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [{"job_name": "tuner", "static_configs": [{"targets": [target]}]}]}))
        self.log = open(folder / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not self._ready():
            assert self.proc.poll() is None, (folder / "prometheus.log").read_text()
            assert time.monotonic() < deadline, "prometheus did not get ready in 60 s"
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    def query(self, promql: str) -> list[dict]:
        """The instant vector /api/v1/query answers."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as answer:
            body = json.loads(answer.read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.mark.slow
def test_prometheus_scrapes_the_loss_the_run_logged(tmp_path, tiny_model_dir, http_server):
    root, base = http_server
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    port = free_port()
    prometheus = Prometheus(tmp_path, f"127.0.0.1:{port}")
    try:
        # the job waits, at its end, for one scrape that saw its last values (at most 60 s, not a sleep)
        env = {**os.environ, FINAL_SCRAPE_ENV: "60"}
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "tuner.cli", "run", str(workspace(tmp_path, [f"{base}/rows.jsonl"])),
             "--config", str(configmap(tmp_path, tiny_model_dir)), "--work-dir", str(tmp_path / "work"),
             "--output", f"oci:{tmp_path / 'layout'}:v1", "--allow-private-urls", "--metrics-port", str(port)],
            capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        assert time.monotonic() - started < 300
        result = json.loads((tmp_path / "work" / "result.json").read_text())
        logged = [json.loads(line) for line in (tmp_path / "work" / "events.jsonl").read_text().splitlines()]
        steps = [e for e in logged if e["type"] == "train.step"]
        assert steps[-1]["metrics"]["loss"] == result["train"]["final_loss"]  # one number, two records
        selector = '{job="tuner",workspace="e2e",preset="smollm2-135m-instruct",method="lora"}'

        def latest(name: str) -> list[dict]:
            # the target is gone once the job ended: its series are stale, so ask for their last sample
            return prometheus.query(f"last_over_time({name}{selector}[10m])")

        deadline = time.monotonic() + 30  # the last scrape is sent before the job exits; wait for its ingestion
        while [float(s["value"][1]) for s in latest("tuner_train_step")] != [result["train"]["steps"]]:
            assert time.monotonic() < deadline, latest("tuner_train_step")
            time.sleep(0.5)
        [loss] = latest("tuner_train_loss")
        assert float(loss["value"][1]) == result["train"]["final_loss"]
        assert loss["metric"]["instance"] == f"127.0.0.1:{port}"
        [max_steps] = latest("tuner_train_max_steps")
        assert float(max_steps["value"][1]) == result["train"]["total_steps"]
        [saved] = latest("tuner_checkpoints_saved_total")
        assert float(saved["value"][1]) == result["train"]["checkpoints_saved"] >= 1
        stages = {s["metric"]["stage"]: float(s["value"][1]) for s in latest("tuner_stage_duration_seconds")}
        assert set(stages) == {"fetch", "load", "prepare", "train", "package"}
        # the job was scraped while it ran, not only at its end: a scrape saw the train stage active (it lasts
        # seconds: the model load, the Trainer, the steps), where a loss count depends on how fast 6 steps run
        [training] = prometheus.query('max_over_time(tuner_stage_active{job="tuner",stage="train"}[10m])')
        assert float(training["value"][1]) == 1
    finally:
        prometheus.stop()
