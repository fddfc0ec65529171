"""What the tests of tuner.kube share: tuner.kube against kmock, a stateful Kubernetes API mock server (real HTTP on 127.0.0.1).

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

import json
import socket
from pathlib import Path

import pytest

from tuner.kube import submit

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


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_kubeconfig(tmp_path: Path, server: str, token: str = "t0ken") -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "lab",
        "clusters": [{"name": "lab", "cluster": {"server": server}}],
        "users": [{"name": "me", "user": {"token": token}}],
        "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "me"}},
                     {"name": "other", "context": {"cluster": "lab", "user": "me"}}]}))
    return path
