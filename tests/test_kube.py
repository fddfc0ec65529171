"""tuner/kube.py against kmock, a stateful Kubernetes API mock server (real HTTP on 127.0.0.1).

kmock runs in pytest-asyncio's event loop; the synchronous `kubernetes` client runs in a worker
thread (`asyncio.to_thread`), so the server keeps answering while the client blocks. Between calls
the tests read and change kmock's stored objects (`kmock.objects`) and its request log.

What kmock does not do as an API server would, and the smallest stand-in used here (`cluster`):
- it stores created objects as sent, with no uid / creationTimestamp: a low-priority create reaction
  stamps them (the ownerReference test needs the Job's uid);
- it lists only resources it has seen: pods are declared, so an empty listing is `[]`, not 404;
- it ignores labelSelector: kube.py checks the pod labels itself too (tested with a foreign pod);
- it has no pod logs (GET .../pods/NAME/log answers the pod object): `pod_logs` serves canned logs per
  (pod, container), honouring tailLines and answering 400 for a container that has not started;
- it has no garbage collector and deletes at once (no foreground wait): tests that need a lingering
  object keep answering it from a reaction.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import kmock as kmocklib
import pytest
import yaml
from kubernetes import client

from tuner.errors import UserError
from tuner.kube import api as kube_api
from tuner.kube import submit, watch
from tuner.observe.events import last_progress_line
from tuner.observe.termination import describe_result

NS = "tuning"
WS = "demo"
JOB = f"{WS}-tuning"
IMAGE = "registry.example/tuner:1"
MUTATING = {"POST", "PUT", "PATCH", "DELETE"}


def manifests(*, lr: str = "2e-4", service: bool = True, pvc: bool = True) -> list[dict]:
    labels = {"app.kubernetes.io/name": "tuner", "app.kubernetes.io/instance": WS, "kaito.sh/workspace": WS}
    objects = [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": JOB, "labels": labels},
         "data": {"training_config.yaml": f"learning_rate: {lr}\n"}},
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": JOB, "labels": labels},
         "spec": {"backoffLimit": 3, "template": {"metadata": {"labels": labels}, "spec": {
             "restartPolicy": "Never",
             "initContainers": [{"name": "fetch", "image": IMAGE, "args": ["fetch"]}],
             # An integer quantity: valid for the API server, rejected by the client's own models.
             "containers": [{"name": "tuner", "image": IMAGE, "args": ["run"],
                             "resources": {"limits": {"nvidia.com/gpu": 1}}}]}}}},
    ]
    if service:
        objects.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": JOB, "labels": labels},
                        "spec": {"clusterIP": "None", "selector": {"job-name": JOB}}})
    if pvc:
        objects.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                        "metadata": {"name": f"{WS}-work", "labels": labels,
                                     "annotations": {submit.OWNED_BY_JOB: "true"}},
                        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "50Gi"}}}})
    return objects


@pytest.fixture
def cluster(kmock):
    """kmock, plus what an API server does that kmock does not (see the module docstring)."""
    counter = itertools.count(1)

    def stamp(request):
        metadata = request.data["metadata"]
        obj = kmock.objects[request.resource, request.namespace or metadata.get("namespace"), metadata["name"]]
        obj.patch({"metadata": {"uid": str(uuid.uuid4()), "resourceVersion": str(next(counter)),
                                "creationTimestamp": f"2026-01-01T00:00:{next(counter):02d}Z"}})
        return obj.raw

    # Below the tests' own reactions (priority 0), above kmock's built-in fallbacks (-inf).
    (kmock ** -1)[kmock.action.CREATE] << 201 << stamp
    kmock.resources["v1/pods"] = {}
    return kmock


@pytest.fixture
def api(kmock) -> client.ApiClient:
    return client.ApiClient(client.Configuration(host=str(kmock.url).rstrip("/")))


@pytest.fixture
def pod_logs(kmock):
    """Canned container logs: {(pod, container): text, or a list of chunks streamed with follow=true}."""
    store: dict[tuple[str, str], str | list[str]] = {}

    def serve(request):
        log = store.get((request.name, request.params.get("container")))
        if log is None:
            # Raised, not returned as kmock.Response(status=400): a returned Response's status sticks to
            # the reaction and would answer every later request 400 too.
            raise kmocklib.KubernetesError(400, "BadRequest", f'container "{request.params.get("container")}" '
                                                              f'in pod "{request.name}" is waiting to start: '
                                                              "PodInitializing")
        if isinstance(log, list):
            if request.params.get("follow") == "true":
                return tuple(chunk.encode() for chunk in log)  # a tuple is streamed chunk by chunk
            log = "".join(log)
        if "tailLines" in request.params:
            log = "".join(log.splitlines(keepends=True)[-int(request.params["tailLines"]):])
        return log.encode()

    kmock["get", kmock.resource("v1/pods"), kmock.subresource("log")] << serve
    return store


def add_pod(kmock, name: str, created: str, *, phase: str = "Running", job: str = JOB, uid: str | None = None,
            **status) -> None:
    labels = {"batch.kubernetes.io/job-name": job, "job-name": job}
    if uid:
        labels["batch.kubernetes.io/controller-uid"] = uid
    kmock.objects["v1/pods", NS, name] = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": labels, "creationTimestamp": created},
        "spec": {"initContainers": [{"name": "fetch"}], "containers": [{"name": "tuner"}]},
        "status": {"phase": phase, **status}}


def job_uid(kmock) -> str:
    return kmock.objects["batch/v1/jobs", NS, JOB]["metadata"]["uid"]


def mutations(kmock, since: int = 0) -> list[str]:
    return [f"{r.method.value} {r.url.path}" for r in list(kmock)[since:] if r.method.value in MUTATING]


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and "Traceback" not in text
    return text


# ---------------------------------------------------------------------------------------------------- submit


@pytest.mark.asyncio
async def test_submit_creates_configmap_service_job_then_owned_pvc(cluster, api):
    given = manifests()
    result = await asyncio.to_thread(submit.submit, api, given, NS)

    assert result.created == [f"ConfigMap/{JOB}", f"Service/{JOB}", f"Job/{JOB}", f"PersistentVolumeClaim/{WS}-work"]
    assert result.unchanged == [] and result.replaced == [] and result.changed
    assert mutations(cluster) == [f"POST /api/v1/namespaces/{NS}/configmaps", f"POST /api/v1/namespaces/{NS}/services",
                                  f"POST /apis/batch/v1/namespaces/{NS}/jobs",
                                  f"POST /api/v1/namespaces/{NS}/persistentvolumeclaims"]
    job = cluster.objects["batch/v1/jobs", NS, JOB]
    assert job["metadata"]["annotations"] == {submit.SPEC_DIGEST: result.digest}
    assert dict(job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]) == {"nvidia.com/gpu": 1}
    pvc = cluster.objects["v1/persistentvolumeclaims", NS, f"{WS}-work"]
    assert pvc["metadata"]["ownerReferences"] == [{"apiVersion": "batch/v1", "kind": "Job", "name": JOB,
                                                   "uid": job_uid(cluster), "blockOwnerDeletion": False,
                                                   "controller": False}]
    assert pvc["metadata"]["namespace"] == NS
    assert given == manifests()  # the caller's dicts are not modified


@pytest.mark.asyncio
async def test_resubmitting_the_same_spec_changes_nothing(cluster, api):
    first = await asyncio.to_thread(submit.submit, api, manifests(), NS)
    before = len(list(cluster))
    again = await asyncio.to_thread(submit.submit, api, manifests(), NS)

    assert again.digest == first.digest and not again.changed
    assert again.unchanged == first.created
    assert mutations(cluster, before) == []


@pytest.mark.asyncio
async def test_a_changed_spec_needs_replace(cluster, api):
    await asyncio.to_thread(submit.submit, api, manifests(), NS)
    before = len(list(cluster))
    with pytest.raises(UserError) as exc:
        await asyncio.to_thread(submit.submit, api, manifests(lr="1e-4"), NS)
    text = one_line(exc)
    assert f"Job {JOB} in namespace {NS} exists with a different spec" in text and "--replace" in text
    assert mutations(cluster, before) == []


@pytest.mark.asyncio
async def test_replace_deletes_the_old_job_and_its_pvc_then_creates_the_new_spec(cluster, api):
    await asyncio.to_thread(submit.submit, api, manifests(), NS)
    old_uid = job_uid(cluster)
    before = len(list(cluster))
    result = await asyncio.to_thread(submit.submit, api, manifests(lr="1e-4"), NS, replace=True, poll_interval=0.01)

    assert sorted(result.replaced) == sorted([f"ConfigMap/{JOB}", f"Service/{JOB}", f"Job/{JOB}",
                                              f"PersistentVolumeClaim/{WS}-work"])
    assert result.created == [] and result.unchanged == []
    deletes = [r for r in list(cluster)[before:] if r.method.value == "DELETE"]
    assert deletes[0].url.path == f"/apis/batch/v1/namespaces/{NS}/jobs/{JOB}"
    assert deletes[0].params["propagationPolicy"] == "Foreground"
    assert deletes[0].data["preconditions"] == {"uid": old_uid}  # only the Job it compared against
    assert deletes[1].url.path == f"/api/v1/namespaces/{NS}/persistentvolumeclaims/{WS}-work"
    new_uid = job_uid(cluster)
    assert new_uid != old_uid
    assert cluster.objects["batch/v1/jobs", NS, JOB]["metadata"]["annotations"][submit.SPEC_DIGEST] == result.digest
    assert cluster.objects["v1/configmaps", NS, JOB]["data"]["training_config.yaml"] == "learning_rate: 1e-4\n"
    pvc = cluster.objects["v1/persistentvolumeclaims", NS, f"{WS}-work"]
    assert [ref["uid"] for ref in pvc["metadata"]["ownerReferences"]] == [new_uid]


@pytest.mark.asyncio
async def test_replace_gives_up_when_the_old_job_is_not_deleted_in_time(cluster, api):
    await asyncio.to_thread(submit.submit, api, manifests(), NS)
    lingering = dict(cluster.objects["batch/v1/jobs", NS, JOB].raw)
    # A Job whose pods do not terminate: it stays (with a deletionTimestamp) however often it is read.
    cluster["get", cluster.resource("batch/v1/jobs"), cluster.name(JOB)] << lingering
    with pytest.raises(UserError) as exc:
        await asyncio.to_thread(submit.submit, api, manifests(lr="1e-4"), NS, replace=True,
                                wait_timeout=0.3, poll_interval=0.05)
    assert f"Job {JOB} in namespace {NS} is still being deleted after 0.3s" in one_line(exc)
    assert len([r for r in cluster if r.method.value == "GET" and r.url.path.endswith(f"/jobs/{JOB}")]) > 2


@pytest.mark.asyncio
async def test_submit_after_cancel_recreates_the_pvc_left_for_the_garbage_collector(cluster, api):
    await asyncio.to_thread(submit.submit, api, manifests(), NS)
    await asyncio.to_thread(submit.cancel, api, JOB, NS)
    # kmock has no garbage collector: the PVC owned by the deleted Job is still there, as right after a
    # real `cancel`. The same spec again must not keep it (it would be collected under the new Job).
    result = await asyncio.to_thread(submit.submit, api, manifests(), NS, poll_interval=0.01)

    assert result.created == [f"Job/{JOB}"]
    assert sorted(result.unchanged) == [f"ConfigMap/{JOB}", f"Service/{JOB}"]
    assert result.replaced == [f"PersistentVolumeClaim/{WS}-work"]
    pvc = cluster.objects["v1/persistentvolumeclaims", NS, f"{WS}-work"]
    assert [ref["uid"] for ref in pvc["metadata"]["ownerReferences"]] == [job_uid(cluster)]


@pytest.mark.asyncio
async def test_a_job_not_made_by_tuner_is_never_replaced(cluster, api):
    cluster.objects["batch/v1/jobs", NS, JOB] = {"metadata": {"name": JOB, "namespace": NS, "uid": "u1"}}
    with pytest.raises(UserError) as exc:
        await asyncio.to_thread(submit.submit, api, manifests(), NS, replace=True)
    assert f"Job {JOB} in namespace {NS} exists and was not created by tuner" in one_line(exc)
    assert mutations(cluster) == []


@pytest.mark.asyncio
async def test_a_foreign_configmap_of_the_same_name_is_refused(cluster, api):
    cluster.objects["v1/configmaps", NS, JOB] = {"metadata": {"name": JOB, "namespace": NS}, "data": {}}
    with pytest.raises(UserError) as exc:
        await asyncio.to_thread(submit.submit, api, manifests(), NS)
    assert f"ConfigMap {JOB} in namespace {NS} exists and was not created by tuner" in one_line(exc)
    assert mutations(cluster) == []


def test_spec_digest_ignores_order_and_its_own_annotation():
    objects = manifests()
    digest = submit.spec_digest(objects)
    assert submit.spec_digest(list(reversed(objects))) == digest
    annotated = manifests()
    annotated[0]["metadata"]["annotations"] = {submit.SPEC_DIGEST: "stale"}
    assert submit.spec_digest(annotated) == digest
    assert submit.spec_digest(manifests(lr="1e-4")) != digest


# ---------------------------------------------------------------------------------------------------- status

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


# ---------------------------------------------------------------------------------------------------- logs


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


# ---------------------------------------------------------------------------------------------------- cancel


@pytest.mark.asyncio
async def test_cancel_deletes_the_job_in_the_background(cluster, api):
    await asyncio.to_thread(submit.submit, api, manifests(), NS)
    uid = job_uid(cluster)
    await asyncio.to_thread(submit.cancel, api, JOB, NS)

    assert cluster.objects["batch/v1/jobs", NS, JOB].deleted
    (delete,) = [r for r in cluster if r.method.value == "DELETE"]
    assert delete.url.path == f"/apis/batch/v1/namespaces/{NS}/jobs/{JOB}"
    assert delete.params["propagationPolicy"] == "Background"
    assert delete.data == {"preconditions": {"uid": uid}, "propagationPolicy": "Background"}


# ---------------------------------------------------------------------------------------------------- errors


@pytest.mark.asyncio
@pytest.mark.parametrize("call", ["status", "logs", "cancel"])
async def test_a_missing_job_is_one_line(cluster, api, call):
    with pytest.raises(UserError) as exc:
        await asyncio.to_thread({"status": watch.status, "logs": watch.logs, "cancel": submit.cancel}[call], api, "nope", NS)
    assert one_line(exc).startswith(f"no tuning job nope in namespace {NS}; check the name and --namespace")


def forbidden(verb: str, resource: str, group: str = "") -> dict:
    return {"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "Forbidden", "code": 403,
            "message": f'{resource}{"." + group if group else ""} is forbidden: User "alice" cannot {verb} '
                       f'resource "{resource}" in API group "{group}" in the namespace "{NS}"'}


@pytest.mark.asyncio
async def test_forbidden_create_names_verb_resource_namespace_and_the_rbac_fix(cluster, api):
    cluster["post", cluster.resource("v1/configmaps")] << 403 << forbidden("create", "configmaps")
    with pytest.raises(UserError) as exc:
        await asyncio.to_thread(submit.submit, api, manifests(), NS)
    text = one_line(exc)
    assert text.startswith(f"not allowed to create configmaps in namespace {NS}: configmaps is forbidden: "
                           'User "alice" cannot create resource "configmaps"')
    assert f"kubectl auth can-i create configmaps -n {NS}" in text


@pytest.mark.asyncio
async def test_forbidden_read_of_jobs(cluster, api):
    cluster["get", cluster.resource("batch/v1/jobs")] << 403 << forbidden("get", "jobs", "batch")
    with pytest.raises(UserError) as exc:
        await asyncio.to_thread(watch.status, api, JOB, NS)
    text = one_line(exc)
    assert text.startswith(f"not allowed to get jobs.batch in namespace {NS}: ")
    assert f"granting 'get' on 'jobs.batch' in namespace {NS}" in text


@pytest.mark.asyncio
async def test_a_conflict_is_one_line(cluster, api):
    # Another client creates the Job between tuner's read and its create.
    cluster["post", cluster.resource("batch/v1/jobs")] << 409 << {
        "apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "AlreadyExists", "code": 409,
        "message": f'jobs.batch "{JOB}" already exists'}
    with pytest.raises(UserError) as exc:
        await asyncio.to_thread(submit.submit, api, manifests(), NS)
    assert one_line(exc) == (f'conflict on jobs.batch {JOB} in namespace {NS}: jobs.batch "{JOB}" already exists; '
                             "something else changed it at the same moment; run the command again")


@pytest.mark.asyncio
async def test_an_invalid_manifest_is_one_line(cluster, api):
    cluster["post", cluster.resource("batch/v1/jobs")] << 422 << {
        "apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "Invalid", "code": 422,
        "message": f'Job.batch "{JOB}" is invalid: spec.template.spec.containers[0].image: Required value'}
    with pytest.raises(UserError) as exc:
        await asyncio.to_thread(submit.submit, api, manifests(), NS)
    assert one_line(exc).startswith(f"the API server refused to create jobs.batch {JOB} in namespace {NS}: "
                                    f'Job.batch "{JOB}" is invalid')


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_server_names_the_url_and_the_kubeconfig(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}"
    config = write_kubeconfig(tmp_path, url)
    api = kube_api.load_client(config, None)
    with pytest.raises(UserError) as exc:
        watch.status(api, JOB, NS)
    text = one_line(exc)
    assert text.startswith(f"cannot reach the Kubernetes API server at {url}: ")
    assert "Connection refused" in text and f"kubeconfig {config}" in text


@pytest.mark.asyncio
async def test_a_tls_failure_names_the_url(kmock):
    url = f"https://127.0.0.1:{kmock.url.port}"  # kmock speaks plain HTTP
    api = client.ApiClient(client.Configuration(host=url))
    with pytest.raises(UserError) as exc:
        await asyncio.to_thread(submit.cancel, api, JOB, NS)
    text = one_line(exc)
    assert text.startswith(f"TLS with the Kubernetes API server at {url} failed: ") and "SSL" in text
    assert "check the server URL and certificate-authority data" in text


def test_an_unknown_host_names_the_url():
    url = "https://tuner-test.invalid:6443"  # .invalid never resolves (RFC 6761)
    api = client.ApiClient(client.Configuration(host=url))
    with pytest.raises(UserError) as exc:
        watch.status(api, JOB, NS)
    assert one_line(exc).startswith(f"cannot reach the Kubernetes API server at {url}: cannot resolve the host name")


# ---------------------------------------------------------------------------------------------------- load_client


def write_kubeconfig(tmp_path: Path, server: str, token: str = "t0ken") -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "lab",
        "clusters": [{"name": "lab", "cluster": {"server": server}}],
        "users": [{"name": "me", "user": {"token": token}}],
        "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "me"}},
                     {"name": "other", "context": {"cluster": "lab", "user": "me"}}]}))
    return path


@pytest.mark.asyncio
async def test_load_client_from_a_kubeconfig_and_context(cluster, tmp_path):
    api = kube_api.load_client(write_kubeconfig(tmp_path, str(cluster.url).rstrip("/")), "other")
    await asyncio.to_thread(submit.submit, api, manifests(), NS)
    assert {r.headers.get("Authorization") for r in cluster} == {"Bearer t0ken"}


@pytest.mark.asyncio
async def test_load_client_reads_the_kubeconfig_environment_variable(cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path, str(cluster.url).rstrip("/"))))
    api = kube_api.load_client(None, None)
    result = await asyncio.to_thread(submit.submit, api, manifests(pvc=False), NS)
    assert result.created


def test_load_client_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError) as exc:
        kube_api.load_client(tmp_path / "missing", None)
    assert one_line(exc) == (f"kubeconfig {tmp_path / 'missing'} does not exist; "
                             "pass --kubeconfig PATH of a kubeconfig file")

    config = write_kubeconfig(tmp_path, "https://k8s.example:6443")
    with pytest.raises(UserError) as exc:
        kube_api.load_client(config, "nope")
    assert one_line(exc).startswith(f"cannot use context 'nope' of kubeconfig {config}: ")

    broken = tmp_path / "broken"
    broken.write_text("clusters: [unclosed\n")
    with pytest.raises(UserError) as exc:
        kube_api.load_client(broken, None)
    assert one_line(exc).startswith(f"cannot use kubeconfig {broken}: ")

    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(UserError) as exc:
        kube_api.load_client(empty, None)
    assert one_line(exc).startswith(f"cannot use kubeconfig {empty}: ")

    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(UserError) as exc:
        kube_api.load_client(None, None)
    assert one_line(exc).startswith("no Kubernetes configuration: KUBECONFIG is unset, ~/.kube/config does not exist")

    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "nowhere"))
    with pytest.raises(UserError) as exc:
        kube_api.load_client(None, None)
    assert one_line(exc).startswith(f"KUBECONFIG={tmp_path / 'nowhere'} names no existing file")


# ---------------------------------------------------------------------------------------------------- CLI

@pytest.mark.asyncio
async def test_cli_submit_renders_and_creates_then_status_reports(cluster, tmp_path, capsys):
    from test_render import seed_workspace

    from tuner import cli

    config = write_kubeconfig(tmp_path, str(cluster.url).rstrip("/"))
    argv = ["submit", str(seed_workspace(tmp_path)), "--kubeconfig", str(config), "-n", NS]
    assert await asyncio.to_thread(cli.main, argv) == 0
    out = capsys.readouterr().out
    assert "created: Job/phi3-qlora-tuning" in out and "created: PersistentVolumeClaim/phi3-qlora-tuning-work" in out
    pvc = cluster.objects["v1/persistentvolumeclaims", NS, "phi3-qlora-tuning-work"]
    assert pvc["metadata"]["ownerReferences"][0]["name"] == "phi3-qlora-tuning"
    assert await asyncio.to_thread(cli.main, argv) == 0
    assert "unchanged: Job/phi3-qlora-tuning" in capsys.readouterr().out
    status = ["status", "phi3-qlora", "--kubeconfig", str(config), "-n", NS]
    assert await asyncio.to_thread(cli.main, status) == 0
    assert f"{NS}/phi3-qlora-tuning: Pending" in capsys.readouterr().out


@pytest.mark.asyncio
async def test_cli_cancel_of_a_missing_job_is_one_error_line(cluster, tmp_path, capsys):
    from tuner import cli

    config = write_kubeconfig(tmp_path, str(cluster.url).rstrip("/"))
    code = await asyncio.to_thread(cli.main, ["cancel", "nope", "--kubeconfig", str(config), "-n", NS])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "nope-tuning" in err


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
