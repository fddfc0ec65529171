"""`tuner submit` and `tuner cancel`: the rendered manifests into the cluster, idempotently.

The manifests come rendered as plain dicts: a ConfigMap, a batch/v1 Job, maybe a headless Service and
maybe a PersistentVolumeClaim annotated `tuner.dev/owned-by-job: "true"`, which is created with an
ownerReference to the Job so that it is garbage-collected with it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client

from tuner.errors import UserError
from tuner.kube.api import JOB, KINDS, Kind, call, create, no_job, read, read_job

SPEC_DIGEST = "tuner.dev/spec-digest"
OWNED_BY_JOB = "tuner.dev/owned-by-job"


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

    existing = read(api, JOB, batch, job_name, namespace)
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
            _delete_and_wait(api, JOB, batch, job_name, namespace, old_uid, "Foreground", wait_timeout, poll_interval)
            deleted.add(f"Job/{job_name}")
            for owned in (m for m in objects if _owned_by_job(m)):
                kind, name = _kind(owned), owned["metadata"]["name"]
                current = read(api, kind, core, name, namespace)
                if current is not None and old_uid in _owner_uids(current):
                    _delete_and_wait(api, kind, core, name, namespace, current["metadata"].get("uid"),
                                     "Background", wait_timeout, poll_interval)
                    deleted.add(f"{kind.kind}/{name}")

    for manifest in objects:
        kind, name = _kind(manifest), manifest["metadata"]["name"]
        label = f"{kind.kind}/{name}"
        if kind is JOB:
            if job_uid is not None:
                result.unchanged.append(label)
            else:
                created = create(api, kind, namespace, manifest)
                job_uid = created.get("metadata", {}).get("uid") or _job_uid(api, batch, job_name, namespace)
                (result.replaced if label in deleted else result.created).append(label)
            continue
        if _owned_by_job(manifest):
            manifest = _with_owner(manifest, job_name, job_uid)
        current = read(api, kind, core, name, namespace)
        if current is None:
            create(api, kind, namespace, manifest)
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
            create(api, kind, namespace, manifest)
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


def _kind(manifest: dict) -> Kind:
    kind = KINDS.get(manifest.get("kind", ""))
    if kind is None:
        raise ValueError(f"tuner does not submit {manifest.get('kind')!r} objects (only {', '.join(KINDS)})")
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
    job = read(api, JOB, batch, name, namespace)
    return job["metadata"].get("uid") if job else None


def _delete_and_wait(api: client.ApiClient, kind: Kind, api_group: Any, name: str, namespace: str,
                     uid: str | None, policy: str, timeout: float, poll_interval: float) -> None:
    """Delete one object (only that incarnation: uid precondition) and wait until it is gone."""
    body = client.V1DeleteOptions(propagation_policy=policy,
                                  preconditions=client.V1Preconditions(uid=uid) if uid else None)
    delete = getattr(api_group, f"delete_namespaced_{kind.method}")
    call(api, "delete", kind.rbac, namespace, delete, name, namespace, propagation_policy=policy, body=body,
          name=name, missing_ok=True)
    deadline = time.monotonic() + timeout
    while True:
        current = read(api, kind, api_group, name, namespace)
        if current is None or (uid and current["metadata"].get("uid") != uid):
            return
        if time.monotonic() >= deadline:
            raise UserError(f"{kind.kind} {name} in namespace {namespace} is still being deleted after "
                            f"{timeout:g}s", fix=f"wait for it (kubectl get {kind.rbac} {name} -n {namespace}) "
                                                 "and run the command again")
        time.sleep(poll_interval)


def cancel(api: client.ApiClient, name: str, namespace: str) -> None:
    """Delete the Job; the garbage collector removes its pods and owned PVC in the background."""
    batch = client.BatchV1Api(api)
    job = read_job(api, batch, name, namespace)
    uid = job["metadata"].get("uid")
    body = client.V1DeleteOptions(propagation_policy="Background",
                                  preconditions=client.V1Preconditions(uid=uid) if uid else None)
    gone = call(api, "delete", JOB.rbac, namespace, batch.delete_namespaced_job, name, namespace,
                 propagation_policy="Background", body=body, name=name, missing_ok=True)
    if gone is None:
        raise no_job(name, namespace)
