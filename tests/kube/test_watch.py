"""tuner.kube.watch: `tuner status` (phase, conditions, the latest progress line, the outcome read back
from termination messages) and `tuner logs` against kmock."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys

import pytest
import yaml

from kube_support import JOB, NS, WS, add_pod, job_uid, manifests, one_line
from tuner.errors import UserError
from tuner.kube import submit, watch
from tuner.observe.events import last_progress_line
from tuner.observe.termination import describe_result

PROGRESS_LOG = (
    "15:15:20 train: 40 steps, 4 epochs, batch 4 x 1 accumulation\n"
    "15:15:31 step 1/40 (2%) | epoch 0.10 | loss 4.5432 | lr 0.0e+00 | 138 tok/s | eta 1m15s\n"
    "15:15:40 step 6/40 (15%) | epoch 0.60 | loss 2.1000 | lr 1.9e-04 | 170 tok/s | eta 1m02s\n"
    "15:15:41 eval: step 6 | eval_loss 2.0100\n"
    "15:15:42 warning: something harmless\n"
)


def test_last_progress_line():
    assert last_progress_line(PROGRESS_LOG) == \
        "15:15:40 step 6/40 (15%) | epoch 0.60 | loss 2.1000 | lr 1.9e-04 | 170 tok/s | eta 1m02s"
    assert last_progress_line("15:15:41 eval: step 6 | eval_loss 2.0100\nstep 3/4 (75%)\n") is None
    assert last_progress_line("") is None


def json_event(type_: str, message: str, time_: str = "2026-11-24T20:16:31.123Z", **extra) -> str:
    return json.dumps({"type": type_, "time": time_, "level": "info", "message": message, **extra},
                      separators=(",", ":"))


STEP_4 = "step 4/40 (10%) | epoch 0.40 | loss 3.7840 | lr 1.0e-03 | 126 tok/s | eta 1m15s"
STEP_5 = "step 5/40 (12%) | epoch 0.50 | loss 3.5000 | lr 1.0e-03 | 130 tok/s | eta 1m10s"


def test_last_progress_line_of_a_json_log_is_the_latest_train_step_message():
    log = "\n".join([
        json_event("job.started", "tuner 1.0 on 1 GPU"),
        json_event("train.step", "step 1/40 (2%) | epoch 0.10 | eta 1m20s", "2026-11-24T20:16:20.000Z", step=1),
        json_event("train.step", STEP_4, step=4, metrics={"loss": 3.784}),
        json_event("eval", "eval: step 4 | eval_loss 3.5000", "2026-11-24T20:16:33.000Z"),
        json_event("message", "warning: something harmless", "2026-11-24T20:16:34.000Z"),
    ]) + "\n"
    # The same text as in text mode: the UTC clock time of the event, then its message.
    assert last_progress_line(log) == f"20:16:31 {STEP_4}"


def test_last_progress_line_of_a_mixed_log_skips_broken_json():
    log = "\n".join([
        "20:16:30 step 3/40 (7%) | epoch 0.30 | loss 3.9000 | lr 1.0e-03 | 120 tok/s | eta 1m20s",
        json_event("train.step", STEP_4, step=4),
        "Some weights of the model were not used: ['lm_head.bias']",  # library output
        json_event("train.step", STEP_5, "2026-11-24T20:16:36.500Z", step=5)[:60],  # cut short
        '{"type": "train.step", "message": 5}',
        "[1, 2, 3]",
    ])
    assert last_progress_line(log) == f"20:16:31 {STEP_4}"
    assert last_progress_line(log + "\n20:16:40 " + STEP_5 + "\n") == f"20:16:40 {STEP_5}"


SUCCEEDED = {"status": "succeeded", "steps": 40, "total_steps": 40, "epochs": 4.0, "train_loss": 0.512,
             "eval_loss": {"base": 3.21, "adapter": 0.98}, "trained_tokens": 9900,
             "image": "registry.example/team/adapter:v1@sha256:abcd", "seconds": 75.2}
FAILED = {"status": "failed", "exit_code": 2, "error": {
    "code": "user_error", "message": "tuning.input.urls[0]: not found; fix the URL", "param": "tuning.input.urls[0]"}}
PREEMPTED = {"status": "preempted", "exit_code": 143, "step": 17, "total_steps": 40, "checkpoint": "checkpoint-17"}


def compact(outcome: dict) -> str:
    return json.dumps(outcome, separators=(",", ":"))


def test_describe_result_succeeded():
    assert describe_result(compact(SUCCEEDED)) == (
        "succeeded: 40/40 steps, 4.00 epochs, 9,900 tokens | train loss 0.5120 | eval loss base 3.2100 -> "
        "adapter 0.9800 | image registry.example/team/adapter:v1@sha256:abcd | 1m15s")


def test_describe_result_succeeded_without_eval_split_or_image():
    outcome = {**SUCCEEDED, "eval_loss": None, "image": None, "seconds": 42.9}
    assert describe_result(compact(outcome)) == (
        "succeeded: 40/40 steps, 4.00 epochs, 9,900 tokens | train loss 0.5120 | 42s")


def test_describe_result_failed():
    assert describe_result(compact(FAILED)) == (
        "failed (exit 2, user_error): tuning.input.urls[0]: not found; fix the URL")
    assert describe_result(compact({**FAILED, "error": {**FAILED["error"], "param": None}})) == (
        "failed (exit 2, user_error): tuning.input.urls[0]: not found; fix the URL")


def test_describe_result_preempted():
    assert describe_result(compact(PREEMPTED)) == "preempted at step 17/40: resumes from checkpoint-17 on retry"


def test_describe_result_of_a_log_tail_or_unknown_json_is_its_last_line():
    tail = "step 3/40 (7%) | loss 3.9\nTraceback (most recent call last):\n  ...\nRuntimeError: CUDA error\n\n"
    assert describe_result(tail) == "last log lines: RuntimeError: CUDA error"
    assert describe_result('{"status":"exploded"}') == 'last log lines: {"status":"exploded"}'
    assert describe_result('{"status":"succeeded","steps":4') == 'last log lines: {"status":"succeeded","steps":4'


def terminated(outcome: dict | str, exit_code: int = 0) -> list[dict]:
    message = outcome if isinstance(outcome, str) else compact(outcome)
    return [{"name": "tuner", "state": {"terminated": {"exitCode": exit_code, "message": message}}}]


@pytest.mark.asyncio
async def test_status_result_is_the_newest_pods_termination_message(cluster, api, pod_logs):
    await asyncio.to_thread(submit.submit, api, manifests(), NS)
    add_pod(cluster, f"{JOB}-a", "2026-01-01T00:01:00Z", phase="Failed",
            containerStatuses=terminated(PREEMPTED, 143))
    add_pod(cluster, f"{JOB}-b", "2026-01-01T00:05:00Z", phase="Succeeded", containerStatuses=terminated(SUCCEEDED))
    pod_logs[f"{JOB}-b", "tuner"] = PROGRESS_LOG
    before = len(list(cluster))
    status = await asyncio.to_thread(watch.status, api, JOB, NS)

    assert status.result == (
        "succeeded: 40/40 steps, 4.00 epochs, 9,900 tokens | train loss 0.5120 | eval loss base 3.2100 -> "
        "adapter 0.9800 | image registry.example/team/adapter:v1@sha256:abcd | 1m15s")
    # No extra API call: the Job, the pod listing and one log.
    assert len(list(cluster)) - before == 3


@pytest.mark.asyncio
async def test_status_result_skips_a_newer_pod_that_is_still_running(cluster, api, pod_logs):
    await asyncio.to_thread(submit.submit, api, manifests(), NS)
    add_pod(cluster, f"{JOB}-a", "2026-01-01T00:01:00Z", phase="Failed",
            containerStatuses=terminated(PREEMPTED, 143))
    add_pod(cluster, f"{JOB}-b", "2026-01-01T00:05:00Z",
            containerStatuses=[{"name": "tuner", "state": {"running": {"startedAt": "2026-01-01T00:05:10Z"}}}])
    pod_logs[f"{JOB}-b", "tuner"] = PROGRESS_LOG
    status = await asyncio.to_thread(watch.status, api, JOB, NS)

    assert status.result == "preempted at step 17/40: resumes from checkpoint-17 on retry"


@pytest.mark.asyncio
async def test_status_result_is_none_before_any_tuner_container_terminates(cluster, api, pod_logs):
    await asyncio.to_thread(submit.submit, api, manifests(), NS)
    add_pod(cluster, f"{JOB}-a", "2026-01-01T00:01:00Z")
    pod_logs[f"{JOB}-a", "tuner"] = PROGRESS_LOG
    status = await asyncio.to_thread(watch.status, api, JOB, NS)

    assert status.result is None


@pytest.mark.asyncio
async def test_status_pending_before_any_pod_starts(cluster, api, pod_logs):
    await asyncio.to_thread(submit.submit, api, manifests(), NS)
    add_pod(cluster, f"{JOB}-a", "2026-01-01T00:01:00Z", phase="Pending", conditions=[
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}])
    cluster.objects["batch/v1/jobs", NS, JOB].patch({"status": {"active": 1}})
    status = await asyncio.to_thread(watch.status, api, JOB, NS)

    assert status.phase == "Pending" and status.active == 1 and status.retries == 0
    assert status.condition("JobStarted") == watch.Condition(
        "JobStarted", "False", "PodsPending", "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")
    assert status.condition("WorkspaceSucceeded") is None
    assert status.progress is None


@pytest.mark.asyncio
async def test_status_running_with_the_latest_progress_line(cluster, api, pod_logs):
    await asyncio.to_thread(submit.submit, api, manifests(), NS)
    uid = job_uid(cluster)
    add_pod(cluster, f"{JOB}-a", "2026-01-01T00:01:00Z", phase="Failed", uid=uid)
    add_pod(cluster, f"{JOB}-b", "2026-01-01T00:05:00Z", uid=uid)
    add_pod(cluster, "other-job-x", "2026-01-01T00:06:00Z", job="other-job")  # kmock ignores labelSelector
    pod_logs[f"{JOB}-a", "tuner"] = "15:00:00 step 9/40 (22%) | from the failed pod\n"
    pod_logs[f"{JOB}-b", "tuner"] = PROGRESS_LOG
    cluster.objects["batch/v1/jobs", NS, JOB].patch({"status": {"active": 1, "failed": 1,
                                                                "startTime": "2026-01-01T00:00:30Z"}})
    status = await asyncio.to_thread(watch.status, api, JOB, NS)

    assert status.phase == "Running"
    assert (status.active, status.retries) == (1, 1)
    assert status.pods == [f"{JOB}-a", f"{JOB}-b"]
    assert status.condition("JobStarted").status == "True"
    assert status.progress == "15:15:40 step 6/40 (15%) | epoch 0.60 | loss 2.1000 | lr 1.9e-04 | 170 tok/s | eta 1m02s"
    assert status.start_time == "2026-01-01T00:00:30Z"
    log_reads = [r for r in cluster if r.url.path.endswith("/log")]
    assert [(r.name, r.params["container"], r.params["tailLines"]) for r in log_reads] == [(f"{JOB}-b", "tuner", "200")]


@pytest.mark.asyncio
async def test_status_succeeded(cluster, api, pod_logs):
    await asyncio.to_thread(submit.submit, api, manifests(), NS)
    add_pod(cluster, f"{JOB}-a", "2026-01-01T00:01:00Z", phase="Succeeded")
    pod_logs[f"{JOB}-a", "tuner"] = PROGRESS_LOG + "15:16:27 step 40/40 (100%) | epoch 4.00 | eta 0s\n15:16:30 pushed\n"
    cluster.objects["batch/v1/jobs", NS, JOB].patch({"status": {
        "succeeded": 1, "completionTime": "2026-01-01T00:20:00Z",
        "conditions": [{"type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached"},
                       {"type": "Complete", "status": "True", "reason": "CompletionsReached"}]}})
    status = await asyncio.to_thread(watch.status, api, JOB, NS)

    assert status.phase == "Succeeded" and status.active == 0
    assert status.condition("WorkspaceSucceeded") == watch.Condition("WorkspaceSucceeded", "True", "CompletionsReached")
    assert status.progress == "15:16:27 step 40/40 (100%) | epoch 4.00 | eta 0s"
    assert status.completion_time == "2026-01-01T00:20:00Z"


@pytest.mark.asyncio
async def test_status_failed_counts_the_retries(cluster, api, pod_logs):
    await asyncio.to_thread(submit.submit, api, manifests(), NS)
    cluster.objects["batch/v1/jobs", NS, JOB].patch({"status": {"failed": 4, "conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
         "message": "Job has reached the specified backoff limit"}]}})
    status = await asyncio.to_thread(watch.status, api, JOB, NS)

    assert status.phase == "Failed" and status.retries == 4
    assert status.condition("JobStarted").status == "True"
    assert status.condition("WorkspaceSucceeded") == watch.Condition(
        "WorkspaceSucceeded", "False", "BackoffLimitExceeded", "Job has reached the specified backoff limit")


@pytest.mark.asyncio
async def test_logs_prints_each_pod_oldest_first_fetch_then_tuner(cluster, api, pod_logs):
    await asyncio.to_thread(submit.submit, api, manifests(), NS)
    add_pod(cluster, f"{JOB}-new", "2026-01-01T00:05:00Z", phase="Pending")
    add_pod(cluster, f"{JOB}-old", "2026-01-01T00:01:00Z", phase="Failed")
    add_pod(cluster, "other-job-x", "2026-01-01T00:02:00Z", job="other-job")
    pod_logs[f"{JOB}-old", "fetch"] = "fetched 3 files\n"
    pod_logs[f"{JOB}-old", "tuner"] = "train: 40 steps\nCUDA out of memory"  # no final newline
    pod_logs[f"{JOB}-new", "fetch"] = "fetching...\n"
    out = io.StringIO()
    shown = await asyncio.to_thread(watch.logs, api, JOB, NS, out=out)

    assert shown == 2
    assert out.getvalue() == (
        f"==> pod {JOB}-old container fetch <==\nfetched 3 files\n"
        f"==> pod {JOB}-old container tuner <==\ntrain: 40 steps\nCUDA out of memory\n"
        f"==> pod {JOB}-new container fetch <==\nfetching...\n"
        f"==> pod {JOB}-new container tuner <==\n"
        f'(no log: container "tuner" in pod "{JOB}-new" is waiting to start: PodInitializing)\n')


@pytest.mark.asyncio
async def test_logs_follow_streams_the_newest_pod(cluster, api, pod_logs):
    await asyncio.to_thread(submit.submit, api, manifests(), NS)
    add_pod(cluster, f"{JOB}-old", "2026-01-01T00:01:00Z", phase="Failed")
    add_pod(cluster, f"{JOB}-new", "2026-01-01T00:05:00Z")
    pod_logs[f"{JOB}-old", "fetch"] = "old fetch\n"
    pod_logs[f"{JOB}-old", "tuner"] = "old tuner\n"
    pod_logs[f"{JOB}-new", "fetch"] = ["new fetch\n"]
    pod_logs[f"{JOB}-new", "tuner"] = ["15:00:01 step 1/4 (25%) | a\n15:00:02 st", "ep 2/4 (50%) | b\n", "done"]
    out = io.StringIO()
    await asyncio.to_thread(watch.logs, api, JOB, NS, follow=True, out=out)

    assert out.getvalue() == (
        f"==> pod {JOB}-old container fetch <==\nold fetch\n==> pod {JOB}-old container tuner <==\nold tuner\n"
        f"==> pod {JOB}-new container fetch <==\nnew fetch\n==> pod {JOB}-new container tuner <==\n"
        "15:00:01 step 1/4 (25%) | a\n15:00:02 step 2/4 (50%) | b\ndone\n")
    reads = [(r.name, r.params["container"], r.params.get("follow")) for r in cluster if r.url.path.endswith("/log")]
    assert reads == [(f"{JOB}-old", "fetch", None), (f"{JOB}-old", "tuner", None),
                     (f"{JOB}-new", "fetch", "true"), (f"{JOB}-new", "tuner", "true")]


@pytest.mark.asyncio
async def test_logs_follow_waits_for_the_container_to_start(cluster, api, pod_logs):
    await asyncio.to_thread(submit.submit, api, manifests(), NS)
    add_pod(cluster, f"{JOB}-a", "2026-01-01T00:01:00Z", phase="Pending")
    pod_logs[f"{JOB}-a", "fetch"] = ["fetched\n"]
    task = asyncio.create_task(asyncio.to_thread(watch.logs, api, JOB, NS, follow=True, out=(out := io.StringIO()),
                                                 poll_interval=0.02))
    while len([r for r in cluster if r.params.get("container") == "tuner"]) < 3:  # answered 400: not started
        await asyncio.sleep(0.01)
    pod_logs[f"{JOB}-a", "tuner"] = ["started\n"]
    await asyncio.wait_for(task, 10)
    assert out.getvalue().endswith(f"==> pod {JOB}-a container tuner <==\nstarted\n")


@pytest.mark.asyncio
async def test_logs_follow_gives_up_on_a_container_that_never_starts(cluster, api, pod_logs):
    await asyncio.to_thread(submit.submit, api, manifests(), NS)
    add_pod(cluster, f"{JOB}-a", "2026-01-01T00:01:00Z", phase="Pending")
    with pytest.raises(UserError) as exc:
        await asyncio.to_thread(watch.logs, api, JOB, NS, follow=True, out=io.StringIO(), start_timeout=0.2,
                                poll_interval=0.02)
    assert f"container fetch of pod {JOB}-a did not start within 0.2s" in one_line(exc)


@pytest.mark.asyncio
async def test_logs_of_a_job_without_pods(cluster, api):
    await asyncio.to_thread(submit.submit, api, manifests(), NS)
    out = io.StringIO()
    assert await asyncio.to_thread(watch.logs, api, JOB, NS, out=out) == 0
    assert out.getvalue() == f"(Job {JOB} has no pods yet)\n"


@pytest.fixture
def failed_fetch_message(tmp_path, http_server) -> str:
    """The termination message a real `tuner fetch` writes when a dataset URL answers 404."""
    _, base = http_server
    workspace = tmp_path / "ws.yaml"
    workspace.write_text(yaml.safe_dump({
        "apiVersion": "kaito.sh/v1beta1", "kind": "Workspace", "metadata": {"name": WS},
        "tuning": {"preset": {"name": "smollm2-135m-instruct"}, "method": "lora",
                   "input": {"urls": [f"{base}/missing.parquet"]},
                   "output": {"volumeSource": {"hostPath": {"path": "out"}}}}}))
    log = tmp_path / "termination-log"
    done = subprocess.run([sys.executable, "-m", "tuner.cli", "fetch", str(workspace), "--work-dir",
                           str(tmp_path / "work"), "--allow-private-urls"], capture_output=True, text=True,
                          env={**os.environ, "TUNER_TERMINATION_LOG": str(log)}, timeout=120)
    assert done.returncode == 2, done.stderr
    return log.read_text()


def failed_init(message: str) -> dict:
    """A pod whose fetch init container failed, as the kubelet reports it: the tuner container never ran."""
    return {"initContainerStatuses": [{"name": "fetch", "state": {"terminated": {
                "exitCode": 2, "reason": "Error", "message": message}}}],
            "containerStatuses": [{"name": "tuner", "state": {"waiting": {"reason": "PodInitializing"}}}]}


@pytest.mark.asyncio
async def test_status_result_reads_a_failed_fetch_init_container(cluster, api, pod_logs, failed_fetch_message):
    await asyncio.to_thread(submit.submit, api, manifests(), NS)
    add_pod(cluster, f"{JOB}-a", "2026-01-01T00:01:00Z", phase="Failed", **failed_init(failed_fetch_message))
    status = await asyncio.to_thread(watch.status, api, JOB, NS)
    assert status.result.startswith("failed (exit 2, user_error): ")
    assert "missing.parquet" in status.result and "404" in status.result


@pytest.mark.asyncio
async def test_status_result_prefers_index_0_of_a_multi_node_job(cluster, api, pod_logs, failed_fetch_message):
    await asyncio.to_thread(submit.submit, api, manifests(), NS)
    add_pod(cluster, f"{JOB}-0-a", "2026-01-01T00:01:00Z", phase="Failed", **failed_init(failed_fetch_message))
    cluster.objects["v1/pods", NS, f"{JOB}-0-a"].patch(
        {"metadata": {"annotations": {watch.COMPLETION_INDEX: "0"}}})
    # a worker created a moment later, stopped without a message of its own
    add_pod(cluster, f"{JOB}-1-b", "2026-01-01T00:01:02Z", phase="Failed",
            containerStatuses=[{"name": "tuner", "state": {"terminated": {"exitCode": 137, "reason": "Error"}}}])
    cluster.objects["v1/pods", NS, f"{JOB}-1-b"].patch({"metadata": {"labels": {watch.COMPLETION_INDEX: "1"}}})
    status = await asyncio.to_thread(watch.status, api, JOB, NS)
    assert status.result.startswith("failed (exit 2, user_error): ") and "404" in status.result
