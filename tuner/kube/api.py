"""The Kubernetes API calls tuner makes, on the official `kubernetes` client: loading a client from a
kubeconfig or the in-cluster service account, reading, creating and listing objects, and turning
every failure into one `UserError` line.

403 names the verb, resource and namespace and the RBAC fix; 404 on the Job says there is no tuning
job; an unreachable server, a DNS failure or a TLS error names the server URL and the kubeconfig it
came from.

All calls use `_preload_content=False` and parse the JSON here: the client's pydantic models (37.x)
reject valid manifests (an integer quantity such as `nvidia.com/gpu: 1`) and would silently drop
fields they do not know. For the same reason creates go through `ApiClient.param_serialize` +
`call_api` (same URL building, auth and TLS as the generated methods) with the manifest as given.
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3
import yaml
from kubernetes import client
from kubernetes import config as kube_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from tuner.errors import UserError

TIMEOUT = (10, 60)  # (connect, read) seconds for every non-streaming call
_SOURCES: weakref.WeakKeyDictionary[client.ApiClient, str] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Kind:
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


KINDS = {k.kind: k for k in (
    Kind("ConfigMap", "", "configmaps", "config_map", 0),
    Kind("Service", "", "services", "service", 1),
    Kind("Job", "batch", "jobs", "job", 2),
    Kind("PersistentVolumeClaim", "", "persistentvolumeclaims", "persistent_volume_claim", 3),
)}
JOB = KINDS["Job"]


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


def read(api: client.ApiClient, kind: Kind, api_group: Any, name: str, namespace: str) -> dict | None:
    read = getattr(api_group, f"read_namespaced_{kind.method}")
    return call(api, "get", kind.rbac, namespace, read, name, namespace, name=name, missing_ok=True)


def create(api: client.ApiClient, kind: Kind, namespace: str, manifest: dict) -> dict:
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

    return call(api, "create", kind.rbac, namespace, post, name=manifest["metadata"]["name"])


class Unavailable(Exception):
    """A log that cannot be read yet (HTTP 400: the container has not started)."""


def read_job(api: client.ApiClient, batch: client.BatchV1Api, name: str, namespace: str) -> dict:
    job = read(api, JOB, batch, name, namespace)
    if job is None:
        raise no_job(name, namespace)
    return job


def no_job(name: str, namespace: str) -> UserError:
    return UserError(f"no tuning job {name} in namespace {namespace}",
                     fix="check the name and --namespace "
                         "(kubectl get jobs -n NAMESPACE -l app.kubernetes.io/name=tuner)")


def job_pods(api: client.ApiClient, core: client.CoreV1Api, job: dict, namespace: str) -> list[dict]:
    """The Job's pods, oldest first. The label selector is checked here too, so that only this Job's
    pods count (and only this incarnation's, by controller-uid, when a replaced Job's pods linger)."""
    name, uid = job["metadata"]["name"], job["metadata"].get("uid")
    pods: list[dict] = []
    for key in ("batch.kubernetes.io/job-name", "job-name"):  # the second one for clusters before 1.27
        listing = call(api, "list", "pods", namespace, core.list_namespaced_pod, namespace,
                        label_selector=f"{key}={name}")
        pods = [p for p in listing.get("items") or []
                if ((p.get("metadata") or {}).get("labels") or {}).get(key) == name]
        if pods:
            break

    def this_job(pod: dict) -> bool:
        labels = pod["metadata"].get("labels") or {}
        pod_uid = labels.get("batch.kubernetes.io/controller-uid") or labels.get("controller-uid")
        return not uid or not pod_uid or pod_uid == uid

    return sorted(filter(this_job, pods), key=pod_order)


def pod_order(pod: dict) -> tuple[str, str]:
    return (pod["metadata"].get("creationTimestamp") or "", pod["metadata"]["name"])


def read_log(api: client.ApiClient, core: client.CoreV1Api, pod: str, namespace: str, container: str, *,
              tail_lines: int | None = None, show_unavailable: bool = False) -> str | None:
    """A container's log, or None when it has none yet (not started) or the pod is gone."""
    extra = {"tail_lines": tail_lines} if tail_lines else {}
    try:
        response = call(api, "get", "pods/log", namespace, core.read_namespaced_pod_log, pod, namespace,
                         container=container, name=pod, stream=True, missing_ok=True, unavailable_ok=True, **extra)
    except Unavailable as exc:
        return f"(no log: {exc})" if show_unavailable else None
    if response is None:
        return "(no log: the pod is gone)" if show_unavailable else None
    try:
        return response.data.decode("utf-8", errors="replace")
    except urllib3.exceptions.HTTPError as exc:
        raise unreachable(api, exc) from None


def call(api: client.ApiClient, verb: str, resource: str, namespace: str, fn: Callable[..., Any], *args: Any,
          name: str | None = None, missing_ok: bool = False, unavailable_ok: bool = False, stream: bool = False,
          timeout: Any = TIMEOUT, **kwargs: Any) -> Any:
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
            raise Unavailable(_server_message(exc)) from None
        raise _api_error(api, exc, verb, resource, namespace, name) from None
    except urllib3.exceptions.HTTPError as exc:
        raise unreachable(api, exc) from None
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
        return unreachable(api, Exception(str(exc.reason or message)))
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


def unreachable(api: client.ApiClient, exc: Exception) -> UserError:
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
