"""The Kubernetes API side of `tuner submit/status/logs/cancel`, on the official `kubernetes` client.

The manifests come rendered as plain dicts: a ConfigMap, a batch/v1 Job, maybe a headless Service and
maybe a PersistentVolumeClaim annotated `tuner.dev/owned-by-job: "true"`, which is created with an
ownerReference to the Job so that it is garbage-collected with it.

Every API failure becomes a one-line `UserError`: 403 names the verb, resource and namespace and the
RBAC fix; 404 on the Job says there is no tuning job; an unreachable server, a DNS failure or a TLS
error names the server URL and the kubeconfig it came from.

All calls use `_preload_content=False` and parse the JSON here: the client's pydantic models (37.x)
reject valid manifests (an integer quantity such as `nvidia.com/gpu: 1`) and would silently drop
fields they do not know. For the same reason creates go through `ApiClient.param_serialize` +
`call_api` (same URL building, auth and TLS as the generated methods) with the manifest as given.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import urllib3
import yaml
from kubernetes import client
from kubernetes import config as kube_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from tuner.errors import UserError
from tuner.events import last_progress_line
from tuner.termination import describe_result

SPEC_DIGEST = "tuner.dev/spec-digest"
OWNED_BY_JOB = "tuner.dev/owned-by-job"
FETCH_CONTAINER = "fetch"
TUNER_CONTAINER = "tuner"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"


_TIMEOUT = (10, 60)  # (connect, read) seconds for every non-streaming call
_PROGRESS_TAIL = 200  # log lines read per pod to find the latest progress line
_SOURCES: weakref.WeakKeyDictionary[client.ApiClient, str] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class _Kind:
    """How tuner reaches one kind of object: the typed-API method suffix, the RBAC resource, the URL."""

    kind: str
    group: str  # "" for the core group
    plural: str
    method: str  # read_namespaced_<method>, delete_namespaced_<method>
    order: int  # creation order: the Job before what it owns

    @property
    def rbac(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def collection(self, namespace: str) -> str:
        prefix = f"/apis/{self.group}/v1" if self.group else "/api/v1"
        return f"{prefix}/namespaces/{namespace}/{self.plural}"


_KINDS = {k.kind: k for k in (
    _Kind("ConfigMap", "", "configmaps", "config_map", 0),
    _Kind("Service", "", "services", "service", 1),
    _Kind("Job", "batch", "jobs", "job", 2),
    _Kind("PersistentVolumeClaim", "", "persistentvolumeclaims", "persistent_volume_claim", 3),
)}
_JOB = _KINDS["Job"]


@dataclass
class SubmitResult:
    """What `submit` did, each entry as `Kind/name`."""

    job: str
    namespace: str
    digest: str
    created: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.created or self.replaced)


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


# ---------------------------------------------------------------------------------------------------- client


def load_client(kubeconfig: Path | None = None, context: str | None = None) -> client.ApiClient:
    """An API client from `kubeconfig` (else $KUBECONFIG, else ~/.kube/config) or, with none of those,
    the in-cluster service account. A missing or invalid configuration is a `UserError`."""
    configuration = client.Configuration()
    if kubeconfig is not None:
        if not kubeconfig.is_file():
            raise UserError(f"kubeconfig {kubeconfig} does not exist",
                            fix="pass --kubeconfig PATH of a kubeconfig file")
        source = str(kubeconfig)
    else:
        paths = [p for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p]
        default = Path("~/.kube/config").expanduser()
        if paths:
            source = os.pathsep.join(paths)
            if not any(Path(p).expanduser().is_file() for p in paths):
                raise UserError(f"KUBECONFIG={source} names no existing file",
                                fix="point KUBECONFIG (or --kubeconfig) at your cluster's kubeconfig")
        elif default.is_file():
            source = str(default)
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            if context:
                raise UserError(f"--context {context} needs a kubeconfig, but there is none (running in-cluster)",
                                fix="drop --context, or pass --kubeconfig PATH")
            try:
                kube_config.load_incluster_config(client_configuration=configuration)
            except ConfigException as exc:
                raise UserError(f"in-cluster Kubernetes configuration is unusable: {exc}",
                                fix="mount the service account token, or pass --kubeconfig PATH") from None
            api = client.ApiClient(configuration)
            _SOURCES[api] = "the in-cluster service account"
            return api
        else:
            raise UserError("no Kubernetes configuration: KUBECONFIG is unset, ~/.kube/config does not exist "
                            "and this is not running inside a cluster",
                            fix="pass --kubeconfig PATH or set KUBECONFIG")
    try:
        kube_config.load_kube_config(config_file=source, context=context, client_configuration=configuration,
                                     persist_config=False)
    except (ConfigException, yaml.YAMLError, OSError, KeyError, TypeError, AttributeError, ValueError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        what = f"context {context!r} of kubeconfig {source}" if context else f"kubeconfig {source}"
        raise UserError(f"cannot use {what}: {detail}",
                        fix="check it with `kubectl config view`" + (" and `kubectl config get-contexts`"
                                                                      if context else "")) from None
    api = client.ApiClient(configuration)
    _SOURCES[api] = f"kubeconfig {source}" + (f" (context {context})" if context else "")
    return api


# ---------------------------------------------------------------------------------------------------- submit


def spec_digest(manifests: list[dict]) -> str:
    """sha256 of the canonical JSON of the manifests (order-independent; tuner's own annotation left out)."""
    canonical = []
    for manifest in manifests:
        manifest = json.loads(json.dumps(manifest))
        metadata = manifest.get("metadata") or {}
        if SPEC_DIGEST in (metadata.get("annotations") or {}):
            del metadata["annotations"][SPEC_DIGEST]
            if not metadata["annotations"]:
                del metadata["annotations"]
        canonical.append(manifest)
    canonical.sort(key=lambda m: (m.get("kind", ""), m.get("metadata", {}).get("name", "")))
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def submit(api: client.ApiClient, manifests: list[dict], namespace: str, *, replace: bool = False,
           wait_timeout: float = 180.0, poll_interval: float = 1.0) -> SubmitResult:
    """Create the ConfigMap, Service, Job, then the PVCs owned by the Job.

    Submitting the same manifests again changes nothing (the Job's `tuner.dev/spec-digest` annotation
    matches). A different spec is refused unless `replace`: a Job's pod template is immutable, so
    replacing means deleting the old Job and creating the new one. The old Job is deleted with
    propagationPolicy=Foreground and waited for: it disappears only after its pods are gone, so no old
    pod keeps its GPUs or shows up in the new Job's logs, and the old work PVC (not blocking, so
    deleted here explicitly) is gone before the new one is created under the same name. Background
    would free the name at once while the old pods and PVC still linger.
    """
    digest = spec_digest(manifests)
    objects = sorted((_prepare(m, namespace, digest) for m in manifests), key=lambda m: _kind(m).order)
    jobs = [m for m in objects if m["kind"] == "Job"]
    if len(jobs) != 1:
        raise ValueError(f"expected exactly one Job among the manifests, got {len(jobs)}")
    job_name = jobs[0]["metadata"]["name"]
    result = SubmitResult(job=job_name, namespace=namespace, digest=digest)
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)

    existing = _read(api, _JOB, batch, job_name, namespace)
    job_uid = None  # set when the existing Job is kept
    deleted: set[str] = set()  # what --replace deleted, to count its re-creation as "replaced"
    if existing is not None:
        old_digest = _annotations(existing).get(SPEC_DIGEST)
        if old_digest is None:
            raise UserError(f"Job {job_name} in namespace {namespace} exists and was not created by tuner",
                            fix=f"delete it (kubectl delete job {job_name} -n {namespace}) or rename the workspace")
        if old_digest == digest:
            job_uid = existing["metadata"].get("uid")
        elif not replace:
            raise UserError(f"Job {job_name} in namespace {namespace} exists with a different spec",
                            fix="pass --replace to delete it (and its pods) and start the new spec, "
                                "or `tuner status` to see the running one")
        else:
            old_uid = existing["metadata"].get("uid")
            _delete_and_wait(api, _JOB, batch, job_name, namespace, old_uid, "Foreground", wait_timeout, poll_interval)
            deleted.add(f"Job/{job_name}")
            for owned in (m for m in objects if _owned_by_job(m)):
                kind, name = _kind(owned), owned["metadata"]["name"]
                current = _read(api, kind, core, name, namespace)
                if current is not None and old_uid in _owner_uids(current):
                    _delete_and_wait(api, kind, core, name, namespace, current["metadata"].get("uid"),
                                     "Background", wait_timeout, poll_interval)
                    deleted.add(f"{kind.kind}/{name}")

    for manifest in objects:
        kind, name = _kind(manifest), manifest["metadata"]["name"]
        label = f"{kind.kind}/{name}"
        if kind is _JOB:
            if job_uid is not None:
                result.unchanged.append(label)
            else:
                created = _create(api, kind, namespace, manifest)
                job_uid = created.get("metadata", {}).get("uid") or _job_uid(api, batch, job_name, namespace)
                (result.replaced if label in deleted else result.created).append(label)
            continue
        if _owned_by_job(manifest):
            manifest = _with_owner(manifest, job_name, job_uid)
        current = _read(api, kind, core, name, namespace)
        if current is None:
            _create(api, kind, namespace, manifest)
            (result.replaced if label in deleted else result.created).append(label)
        elif _annotations(current).get(SPEC_DIGEST) == digest and (
                not _owned_by_job(manifest) or job_uid in _owner_uids(current)):
            result.unchanged.append(label)
        elif SPEC_DIGEST not in _annotations(current):
            raise UserError(f"{kind.kind} {name} in namespace {namespace} exists and was not created by tuner",
                            fix=f"delete or rename it (kubectl delete {kind.rbac} {name} -n {namespace})")
        else:
            # A tuner object of an older spec, or owned by a Job that is gone (`tuner cancel` then
            # `submit`: the garbage collector has yet to delete it): nothing uses it any more.
            _delete_and_wait(api, kind, core, name, namespace, current["metadata"].get("uid"), "Background",
                             wait_timeout, poll_interval)
            _create(api, kind, namespace, manifest)
            result.replaced.append(label)
    return result


def _prepare(manifest: dict, namespace: str, digest: str) -> dict:
    manifest = json.loads(json.dumps(manifest))  # deep copy; the caller's dicts stay as they are
    kind = _kind(manifest)
    metadata = manifest.setdefault("metadata", {})
    if not metadata.get("name"):
        raise ValueError(f"{kind.kind} manifest without metadata.name")
    if metadata.get("namespace", namespace) != namespace:
        raise UserError(f"{kind.kind} {metadata['name']} is for namespace {metadata['namespace']}, "
                        f"not {namespace}", fix="render and submit with the same --namespace")
    metadata["namespace"] = namespace
    metadata.setdefault("annotations", {})[SPEC_DIGEST] = digest
    return manifest


def _kind(manifest: dict) -> _Kind:
    kind = _KINDS.get(manifest.get("kind", ""))
    if kind is None:
        raise ValueError(f"tuner does not submit {manifest.get('kind')!r} objects (only {', '.join(_KINDS)})")
    return kind


def _owned_by_job(manifest: dict) -> bool:
    return str(_annotations(manifest).get(OWNED_BY_JOB, "")).lower() == "true"


def _annotations(obj: dict) -> dict:
    return (obj.get("metadata") or {}).get("annotations") or {}


def _owner_uids(obj: dict) -> set[str]:
    return {ref.get("uid") for ref in (obj.get("metadata") or {}).get("ownerReferences") or []}


def _with_owner(manifest: dict, job_name: str, job_uid: str | None) -> dict:
    if not job_uid:
        raise RuntimeError(f"the API server returned Job {job_name} without a uid")
    reference = {"apiVersion": "batch/v1", "kind": "Job", "name": job_name, "uid": job_uid,
                 "blockOwnerDeletion": False, "controller": False}
    references = [r for r in manifest["metadata"].get("ownerReferences", []) if r.get("kind") != "Job"]
    manifest["metadata"]["ownerReferences"] = references + [reference]
    return manifest


def _job_uid(api: client.ApiClient, batch: client.BatchV1Api, name: str, namespace: str) -> str | None:
    job = _read(api, _JOB, batch, name, namespace)
    return job["metadata"].get("uid") if job else None


def _delete_and_wait(api: client.ApiClient, kind: _Kind, api_group: Any, name: str, namespace: str,
                     uid: str | None, policy: str, timeout: float, poll_interval: float) -> None:
    """Delete one object (only that incarnation: uid precondition) and wait until it is gone."""
    body = client.V1DeleteOptions(propagation_policy=policy,
                                  preconditions=client.V1Preconditions(uid=uid) if uid else None)
    delete = getattr(api_group, f"delete_namespaced_{kind.method}")
    _call(api, "delete", kind.rbac, namespace, delete, name, namespace, propagation_policy=policy, body=body,
          name=name, missing_ok=True)
    deadline = time.monotonic() + timeout
    while True:
        current = _read(api, kind, api_group, name, namespace)
        if current is None or (uid and current["metadata"].get("uid") != uid):
            return
        if time.monotonic() >= deadline:
            raise UserError(f"{kind.kind} {name} in namespace {namespace} is still being deleted after "
                            f"{timeout:g}s", fix=f"wait for it (kubectl get {kind.rbac} {name} -n {namespace}) "
                                                 "and run the command again")
        time.sleep(poll_interval)


def _read(api: client.ApiClient, kind: _Kind, api_group: Any, name: str, namespace: str) -> dict | None:
    read = getattr(api_group, f"read_namespaced_{kind.method}")
    return _call(api, "get", kind.rbac, namespace, read, name, namespace, name=name, missing_ok=True)


def _create(api: client.ApiClient, kind: _Kind, namespace: str, manifest: dict) -> dict:
    def post(*, _preload_content: bool, _request_timeout: Any) -> Any:
        method, url, headers, body, _ = api.param_serialize(
            method="POST", resource_path=kind.collection(namespace), query_params=[("fieldManager", "tuner")],
            header_params={"Accept": "application/json", "Content-Type": "application/json"},
            body=manifest, auth_settings=["BearerToken"])
        response = api.call_api(method, url, header_params=headers, body=body, _request_timeout=_request_timeout)
        response.read()
        if not 200 <= response.status <= 299:
            raise ApiException.from_response(http_resp=response, body=None, data=None)
        return response

    return _call(api, "create", kind.rbac, namespace, post, name=manifest["metadata"]["name"])


# ---------------------------------------------------------------------------------------------------- status


def status(api: client.ApiClient, name: str, namespace: str) -> JobStatus:
    """The Job's phase, Kaito-style conditions, retries, active pods and latest progress line."""
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    job = _read_job(api, batch, name, namespace)
    job_status = job.get("status") or {}
    job_conditions = {c.get("type"): c for c in job_status.get("conditions") or [] if c.get("status") == "True"}
    pods = _job_pods(api, core, job, namespace)
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
    for pod in sorted((p for p in pods if _pod_started(p)), key=_pod_order, reverse=True):
        text = _read_log(api, core, pod["metadata"]["name"], namespace, TUNER_CONTAINER, tail_lines=_PROGRESS_TAIL)
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
    ordered = sorted(pods, key=_pod_order, reverse=True)
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
    pod_status = max(pods, key=_pod_order).get("status") or {}
    for condition in pod_status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return condition.get("message") or condition.get("reason") or "not scheduled"
    for s in (pod_status.get("initContainerStatuses") or []) + (pod_status.get("containerStatuses") or []):
        waiting = (s.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason") not in (None, "PodInitializing"):
            return f"{s.get('name')}: {waiting.get('reason')} {waiting.get('message') or ''}".strip()
    return "pods pending"


# ---------------------------------------------------------------------------------------------------- logs


def logs(api: client.ApiClient, name: str, namespace: str, follow: bool = False, out: IO[str] | None = None, *,
         start_timeout: float = 600.0, poll_interval: float = 2.0) -> int:
    """Print each pod's init-container (`fetch`) then `tuner` logs, oldest pod first, each under a
    `==> pod X container C <==` header. With `follow`, the newest pod's containers are streamed
    (waiting up to `start_timeout` for a container to start). Returns the number of pods shown."""
    out = out if out is not None else sys.stdout
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    job = _read_job(api, batch, name, namespace)
    pods = _job_pods(api, core, job, namespace)
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
            text = _read_log(api, core, pod_name, namespace, container, show_unavailable=True)
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
            response = _call(api, "get", "pods/log", namespace, core.read_namespaced_pod_log, pod, namespace,
                             container=container, follow=True, name=pod, stream=True, timeout=None,
                             unavailable_ok=True)
        except _Unavailable as exc:
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
        raise _unreachable(api, exc) from None
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


# ---------------------------------------------------------------------------------------------------- cancel


def cancel(api: client.ApiClient, name: str, namespace: str) -> None:
    """Delete the Job; the garbage collector removes its pods and owned PVC in the background."""
    batch = client.BatchV1Api(api)
    job = _read_job(api, batch, name, namespace)
    uid = job["metadata"].get("uid")
    body = client.V1DeleteOptions(propagation_policy="Background",
                                  preconditions=client.V1Preconditions(uid=uid) if uid else None)
    gone = _call(api, "delete", _JOB.rbac, namespace, batch.delete_namespaced_job, name, namespace,
                 propagation_policy="Background", body=body, name=name, missing_ok=True)
    if gone is None:
        raise _no_job(name, namespace)


# ---------------------------------------------------------------------------------------------------- shared


class _Unavailable(Exception):
    """A log that cannot be read yet (HTTP 400: the container has not started)."""


def _read_job(api: client.ApiClient, batch: client.BatchV1Api, name: str, namespace: str) -> dict:
    job = _read(api, _JOB, batch, name, namespace)
    if job is None:
        raise _no_job(name, namespace)
    return job


def _no_job(name: str, namespace: str) -> UserError:
    return UserError(f"no tuning job {name} in namespace {namespace}",
                     fix="check the name and --namespace "
                         "(kubectl get jobs -n NAMESPACE -l app.kubernetes.io/name=tuner)")


def _job_pods(api: client.ApiClient, core: client.CoreV1Api, job: dict, namespace: str) -> list[dict]:
    """The Job's pods, oldest first. The label selector is checked here too, so that only this Job's
    pods count (and only this incarnation's, by controller-uid, when a replaced Job's pods linger)."""
    name, uid = job["metadata"]["name"], job["metadata"].get("uid")
    pods: list[dict] = []
    for key in ("batch.kubernetes.io/job-name", "job-name"):  # the second one for clusters before 1.27
        listing = _call(api, "list", "pods", namespace, core.list_namespaced_pod, namespace,
                        label_selector=f"{key}={name}")
        pods = [p for p in listing.get("items") or []
                if ((p.get("metadata") or {}).get("labels") or {}).get(key) == name]
        if pods:
            break

    def this_job(pod: dict) -> bool:
        labels = pod["metadata"].get("labels") or {}
        pod_uid = labels.get("batch.kubernetes.io/controller-uid") or labels.get("controller-uid")
        return not uid or not pod_uid or pod_uid == uid

    return sorted(filter(this_job, pods), key=_pod_order)


def _pod_order(pod: dict) -> tuple[str, str]:
    return (pod["metadata"].get("creationTimestamp") or "", pod["metadata"]["name"])


def _read_log(api: client.ApiClient, core: client.CoreV1Api, pod: str, namespace: str, container: str, *,
              tail_lines: int | None = None, show_unavailable: bool = False) -> str | None:
    """A container's log, or None when it has none yet (not started) or the pod is gone."""
    extra = {"tail_lines": tail_lines} if tail_lines else {}
    try:
        response = _call(api, "get", "pods/log", namespace, core.read_namespaced_pod_log, pod, namespace,
                         container=container, name=pod, stream=True, missing_ok=True, unavailable_ok=True, **extra)
    except _Unavailable as exc:
        return f"(no log: {exc})" if show_unavailable else None
    if response is None:
        return "(no log: the pod is gone)" if show_unavailable else None
    try:
        return response.data.decode("utf-8", errors="replace")
    except urllib3.exceptions.HTTPError as exc:
        raise _unreachable(api, exc) from None


def _call(api: client.ApiClient, verb: str, resource: str, namespace: str, fn: Callable[..., Any], *args: Any,
          name: str | None = None, missing_ok: bool = False, unavailable_ok: bool = False, stream: bool = False,
          timeout: Any = _TIMEOUT, **kwargs: Any) -> Any:
    """Call one API method with `_preload_content=False`; return the parsed JSON (or the raw response with
    `stream`), None for 404 with `missing_ok`; every failure becomes a one-line `UserError`."""
    try:
        response = fn(*args, _preload_content=False, _request_timeout=timeout, **kwargs)
        if stream:
            return response
        data = response.data
    except ApiException as exc:
        if exc.status == 404 and missing_ok:
            return None
        if exc.status == 400 and unavailable_ok:
            raise _Unavailable(_server_message(exc)) from None
        raise _api_error(api, exc, verb, resource, namespace, name) from None
    except urllib3.exceptions.HTTPError as exc:
        raise _unreachable(api, exc) from None
    try:
        return json.loads(data) if data else {}
    except ValueError:
        raise UserError(f"the API server at {api.configuration.host} answered {verb} {resource} with something "
                        f"that is not JSON: {data[:80]!r}", fix=f"check the server address in {_source(api)}") from None


def _server_message(exc: ApiException) -> str:
    try:
        body = json.loads(exc.body or "")
        message = body.get("message") if isinstance(body, dict) else None
    except ValueError:
        message = (exc.body or "").strip()[:200] or None
    return " ".join(str(message or exc.reason or f"HTTP {exc.status}").split())


def _api_error(api: client.ApiClient, exc: ApiException, verb: str, resource: str, namespace: str,
               name: str | None) -> UserError:
    status, message = exc.status, _server_message(exc)
    target = f"{resource} {name}" if name else resource
    host = api.configuration.host
    if not status:  # the REST layer's wrapper for TLS failures
        return _unreachable(api, Exception(str(exc.reason or message)))
    if status == 401:
        return UserError(f"the Kubernetes API server at {host} rejected the credentials: {message}",
                         fix=f"refresh the credentials in {_source(api)} (log in to the cluster again)")
    if status == 403:
        return UserError(f"not allowed to {verb} {resource} in namespace {namespace}: {message}",
                         fix=f"ask a cluster admin for a Role(Binding) granting '{verb}' on '{resource}' in "
                             f"namespace {namespace} (check: kubectl auth can-i {verb} {resource} -n {namespace})")
    if status == 404:
        return UserError(f"{target} not found in namespace {namespace}: {message}",
                         fix="check --namespace (the namespace must exist)")
    if status == 409:
        return UserError(f"conflict on {target} in namespace {namespace}: {message}",
                         fix="something else changed it at the same moment; run the command again")
    if status in (400, 422):
        return UserError(f"the API server refused to {verb} {target} in namespace {namespace}: {message}")
    return UserError(f"the Kubernetes API server at {host} failed to {verb} {target}: HTTP {status} {message}",
                     fix="retry later; if it persists, check the cluster's health")


def _unreachable(api: client.ApiClient, exc: Exception) -> UserError:
    host = api.configuration.host
    reason = getattr(exc, "reason", None)
    cause = reason if isinstance(reason, Exception) else exc
    if isinstance(cause, urllib3.exceptions.NameResolutionError) or "Name or service not known" in str(cause):
        detail, tls = "cannot resolve the host name", False
    elif isinstance(cause, urllib3.exceptions.SSLError) or "SSL" in str(cause):
        detail, tls = " ".join(str(cause).split()), True
    elif isinstance(cause, urllib3.exceptions.NewConnectionError):  # before its base, ConnectTimeoutError
        detail, tls = str(cause).rsplit(": ", 1)[-1], False  # "[Errno 111] Connection refused"
    elif isinstance(cause, (urllib3.exceptions.ConnectTimeoutError, urllib3.exceptions.ReadTimeoutError)):
        detail, tls = "timed out", False
    else:
        detail, tls = " ".join(str(cause).split()) or type(cause).__name__, False
    if tls:
        return UserError(f"TLS with the Kubernetes API server at {host} failed: {detail}",
                         fix=f"check the server URL and certificate-authority data in {_source(api)}")
    return UserError(f"cannot reach the Kubernetes API server at {host}: {detail}",
                     fix=f"check that the cluster is up and that {_source(api)} points at it (kubectl cluster-info)")


def _source(api: client.ApiClient) -> str:
    return _SOURCES.get(api, "the kubeconfig (--kubeconfig, KUBECONFIG or ~/.kube/config)")
