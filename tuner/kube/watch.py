"""`tuner status` and `tuner logs`: a tuning Job's state in Kaito's terms, and its pods' logs."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import urllib3
from kubernetes import client

from tuner.errors import UserError
from tuner.kube.api import Unavailable, call, job_pods, pod_order, read_job, read_log, unreachable
from tuner.observe.events import last_progress_line
from tuner.observe.termination import describe_result

FETCH_CONTAINER = "fetch"
TUNER_CONTAINER = "tuner"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
_PROGRESS_TAIL = 200  # log lines read per pod to find the latest progress line


@dataclass(frozen=True)
class Condition:
    type: str
    status: str  # "True" / "False"
    reason: str = ""
    message: str = ""


@dataclass
class JobStatus:
    """A tuning Job's state in Kaito's terms (phase + JobStarted / WorkspaceSucceeded conditions)."""

    name: str
    namespace: str
    phase: str  # Pending / Running / Succeeded / Failed
    conditions: list[Condition]
    retries: int  # pods that failed so far (Job status.failed)
    active: int  # pods not yet finished (Job status.active)
    pods: list[str]  # the Job's pods, oldest first
    progress: str | None  # the latest `step N/M (P%) | ...` line of the tuner container
    start_time: str | None = None
    completion_time: str | None = None
    # `describe_result` of the termination message of the newest terminated tuner container, if any
    result: str | None = None

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)


def status(api: client.ApiClient, name: str, namespace: str) -> JobStatus:
    """The Job's phase, Kaito-style conditions, retries, active pods and latest progress line."""
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    job = read_job(api, batch, name, namespace)
    job_status = job.get("status") or {}
    job_conditions = {c.get("type"): c for c in job_status.get("conditions") or [] if c.get("status") == "True"}
    pods = job_pods(api, core, job, namespace)
    active = int(job_status.get("active") or 0)
    failed = int(job_status.get("failed") or 0)
    succeeded = int(job_status.get("succeeded") or 0)
    running = [p for p in pods
               if _pod_started(p) and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]

    done = job_conditions.get("Complete") or job_conditions.get("SuccessCriteriaMet")
    failure = job_conditions.get("Failed") or job_conditions.get("FailureTarget")
    if failure:
        phase = "Failed"
    elif done:
        phase = "Succeeded"
    elif running:
        phase = "Running"
    else:
        phase = "Pending"

    conditions = []
    if any(_pod_started(p) for p in pods) or succeeded or failed:
        conditions.append(Condition("JobStarted", "True", "PodsStarted",
                                    f"{len(pods)} pod(s), {active} active" if pods else ""))
    else:
        conditions.append(Condition("JobStarted", "False", "PodsPending", _pending_reason(pods)))
    if failure:
        conditions.append(Condition("WorkspaceSucceeded", "False", failure.get("reason") or "TuningFailed",
                                    failure.get("message") or ""))
    elif done:
        conditions.append(Condition("WorkspaceSucceeded", "True", done.get("reason") or "TuningSucceeded",
                                    done.get("message") or ""))

    progress = None
    for pod in sorted((p for p in pods if _pod_started(p)), key=pod_order, reverse=True):
        text = read_log(api, core, pod["metadata"]["name"], namespace, TUNER_CONTAINER, tail_lines=_PROGRESS_TAIL)
        progress = last_progress_line(text or "")
        if progress:
            break
    return JobStatus(name=name, namespace=namespace, phase=phase, conditions=conditions, retries=failed,
                     active=active, pods=[p["metadata"]["name"] for p in pods], progress=progress,
                     start_time=job_status.get("startTime"), completion_time=job_status.get("completionTime"),
                     result=_latest_result(pods))


def _latest_result(pods: list[dict]) -> str | None:
    """`describe_result` of the latest outcome, from the pod objects alone.

    The newest pod of index 0 first (on a multi-node Job only index 0 writes the job's outcome;
    a worker may be created a moment later and write nothing), then the other pods, newest first.
    In a pod the tuner container's message wins; a fetch that failed (404, bad data) leaves the
    tuner container unstarted, so the init containers are read too.
    """
    ordered = sorted(pods, key=pod_order, reverse=True)
    ordered.sort(key=lambda pod: _completion_index(pod) not in (None, 0))
    for pod in ordered:
        pod_status = pod.get("status") or {}
        statuses = {s.get("name"): s for s in (pod_status.get("initContainerStatuses") or [])
                    + (pod_status.get("containerStatuses") or [])}
        ended = [terminated for name in (TUNER_CONTAINER, FETCH_CONTAINER)
                 if (terminated := _terminated(statuses.get(name))) is not None
                 and (name == TUNER_CONTAINER or terminated.get("exitCode"))]  # a fetch that succeeded says nothing
        for terminated in ended:
            if (terminated.get("message") or "").strip():
                return describe_result(terminated["message"])
        if ended:
            terminated = ended[0]
            details = [f"exit {terminated['exitCode']}"] if terminated.get("exitCode") is not None else []
            details += [str(terminated["reason"])] if terminated.get("reason") else []
            return "terminated without a termination message" + (f" ({', '.join(details)})" if details else "")
    return None


def _terminated(container_status: dict | None) -> dict | None:
    if not container_status:
        return None
    return ((container_status.get("state") or {}).get("terminated")
            or (container_status.get("lastState") or {}).get("terminated"))


def _completion_index(pod: dict) -> int | None:
    """An Indexed Job pod's index (annotation, and label since Kubernetes 1.28); None for other Jobs."""
    metadata = pod.get("metadata") or {}
    for values in (metadata.get("annotations") or {}, metadata.get("labels") or {}):
        value = values.get(COMPLETION_INDEX)
        if value is not None and str(value).isdigit():
            return int(value)
    return None


def _pod_started(pod: dict) -> bool:
    """Whether a pod got past scheduling and image pulls: a container (init or main) ran."""
    pod_status = pod.get("status") or {}
    if pod_status.get("phase") in ("Running", "Succeeded", "Failed"):
        return True
    statuses = (pod_status.get("initContainerStatuses") or []) + (pod_status.get("containerStatuses") or [])
    return any("running" in (s.get("state") or {}) or "terminated" in (s.get("state") or {}) for s in statuses)


def _pending_reason(pods: list[dict]) -> str:
    if not pods:
        return "no pods yet"
    pod_status = max(pods, key=pod_order).get("status") or {}
    for condition in pod_status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return condition.get("message") or condition.get("reason") or "not scheduled"
    for s in (pod_status.get("initContainerStatuses") or []) + (pod_status.get("containerStatuses") or []):
        waiting = (s.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason") not in (None, "PodInitializing"):
            return f"{s.get('name')}: {waiting.get('reason')} {waiting.get('message') or ''}".strip()
    return "pods pending"


def logs(api: client.ApiClient, name: str, namespace: str, follow: bool = False, out: IO[str] | None = None, *,
         start_timeout: float = 600.0, poll_interval: float = 2.0) -> int:
    """Print each pod's init-container (`fetch`) then `tuner` logs, oldest pod first, each under a
    `==> pod X container C <==` header. With `follow`, the newest pod's containers are streamed
    (waiting up to `start_timeout` for a container to start). Returns the number of pods shown."""
    out = out if out is not None else sys.stdout
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    job = read_job(api, batch, name, namespace)
    pods = job_pods(api, core, job, namespace)
    if not pods:
        out.write(f"(Job {name} has no pods yet)\n")
        out.flush()
        return 0
    for index, pod in enumerate(pods):
        pod_name = pod["metadata"]["name"]
        current = follow and index == len(pods) - 1
        for container in _containers(pod):
            out.write(f"==> pod {pod_name} container {container} <==\n")
            out.flush()
            if current:
                _follow(api, core, pod_name, namespace, container, out, start_timeout, poll_interval)
                continue
            text = read_log(api, core, pod_name, namespace, container, show_unavailable=True)
            if text:
                out.write(text if text.endswith("\n") else text + "\n")
            out.flush()
    return len(pods)


def _containers(pod: dict) -> list[str]:
    spec = pod.get("spec") or {}
    names = [c["name"] for c in (spec.get("initContainers") or []) + (spec.get("containers") or []) if c.get("name")]
    return names or [FETCH_CONTAINER, TUNER_CONTAINER]


def _follow(api: client.ApiClient, core: client.CoreV1Api, pod: str, namespace: str, container: str, out: IO[str],
            start_timeout: float, poll_interval: float) -> None:
    deadline = time.monotonic() + start_timeout
    while True:
        try:
            # No read timeout: a training step can print nothing for a long while.
            response = call(api, "get", "pods/log", namespace, core.read_namespaced_pod_log, pod, namespace,
                             container=container, follow=True, name=pod, stream=True, timeout=None,
                             unavailable_ok=True)
        except Unavailable as exc:
            if time.monotonic() >= deadline:
                raise UserError(f"container {container} of pod {pod} did not start within {start_timeout:g}s: "
                                f"{exc}", fix=f"see `kubectl describe pod {pod} -n {namespace}`") from None
            time.sleep(poll_interval)
            continue
        break
    try:
        for line in _lines(response):
            out.write(line + "\n")
            out.flush()
    except urllib3.exceptions.HTTPError as exc:
        raise unreachable(api, exc) from None
    finally:
        response.release_conn()


def _lines(response: Any) -> Iterator[str]:
    """Lines of a streamed response as they arrive (chunked: each chunk as soon as it is read)."""
    buffer = b""
    for chunk in response.stream(amt=None, decode_content=True):
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for line in complete:
            yield line.decode("utf-8", errors="replace")
    if buffer:
        yield buffer.decode("utf-8", errors="replace")
