"""`tuner render`: a validated job plan -> the ConfigMap, Job, and (when needed) Service and PVC.

The manifests come from the Jinja templates in `job_templates/`; this module decides the values:
GPUs from the instance type's SKU, a memory fit check, precision for GPUs without bf16, volumes,
the torchrun launch for several GPUs or nodes, and the failure policy. Pods see the Workspace with
its input/output volumeSources rewritten to where the Job mounts them, so the same `tuner run`
code reads local paths in a pod and on a laptop.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import yaml

from tuner import __version__
from tuner.errors import EXIT_USER_ERROR, UserError
from tuner.kube import gpus, memory_fit, parallelism
from tuner.kube.sku_precision import for_sku
from tuner.observe import termination
from tuner.spec import k8s_names
from tuner.spec.plan import CLUSTER_OUTPUT_DIR, JobPlan
from tuner.spec.presets import bundled_dir
from tuner.spec.targets import RegistryTarget
from tuner.spec.yamlio import load_yaml_file
from tuner.train import distributed

DEFAULT_IMAGE = f"ghcr.io/tuner-dev/tuner:{__version__}"
CONFIG_DIR = "/etc/tuner"
WORK_MOUNT = "/workspace"
WORK_DIR = f"{WORK_MOUNT}/work"
INPUT_MOUNT = "/mnt/input"
MODEL_CACHE_MOUNT = "/mnt/model-cache"
OUTPUT_MOUNT = CLUSTER_OUTPUT_DIR
PUSH_SECRET_DIR = f"{CONFIG_DIR}/push-secret"
PULL_SECRET_DIR = f"{CONFIG_DIR}/pull-secret"
URL_HEADERS_DIR = f"{CONFIG_DIR}/url-headers"
RENDEZVOUS_PORT = 29500
METRICS_PORT_NAME = "metrics"  # the tuner container's port `tuner run --metrics-port` serves on
METRICS_PATH = "/metrics"  # where tuner.observe.metrics answers scrapes
TERMINATION_MESSAGE_PATH = "/dev/termination-log"  # Kubernetes' default path, named for clarity


@dataclass(frozen=True)
class RenderOptions:
    """Cluster-side choices the Workspace does not hold."""

    namespace: str | None = None  # None: the Workspace's metadata.namespace, else "default"
    image: str = DEFAULT_IMAGE
    resume: bool = True  # False: an emptyDir work volume, so a retried pod starts over
    work_pvc: str | None = None  # an existing claim to use instead of creating one
    storage_class: str | None = None
    storage_size: str = "100Gi"
    gpus: int | None = None  # per node, for SKUs tuner does not know
    gpu_memory_gib: float | None = None
    backoff_limit: int = 3
    ttl_seconds: int = 7 * 24 * 3600
    grace_seconds: int = distributed.DEFAULT_GRACE_SECONDS  # time to save a checkpoint after SIGTERM
    insecure_registries: tuple[str, ...] = ()
    url_headers_secret: str | None = None  # a Secret with key headers.json: HTTP headers per dataset host
    env_secrets: tuple[str, ...] = ()  # Secrets whose keys become the tuner container's variables (trackers' URIs, keys)
    model_cache_pvc: str | None = None  # a ReadWriteMany claim jobs share as their model cache
    log_format: str = "text"  # "json": one JSON event per log line (TUNER_LOG_FORMAT)
    metrics_port: int | None = None  # `tuner run --metrics-port`: the port, named and annotated for scraping
    pod_monitor: bool = False  # also a prometheus-operator PodMonitor for that port


@dataclass(frozen=True)
class Rendered:
    manifests: list[dict[str, Any]]
    notes: list[str]  # decisions worth telling the user (precision changes, the memory estimate)
    namespace: str = "default"

    def to_yaml(self) -> str:
        header = "".join(f"# {note}\n" for note in self.notes)
        return header + yaml.safe_dump_all(self.manifests, sort_keys=False)


def templates_dir() -> Path:
    """The Job manifest templates."""
    return bundled_dir("job_templates")


def _template(template: str, **values: Any) -> dict[str, Any]:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(templates_dir()), undefined=jinja2.StrictUndefined,
                             autoescape=False, keep_trailing_newline=True)
    return yaml.safe_load(env.get_template(template).render(**values))


def render(plan: JobPlan, options: RenderOptions) -> Rendered:
    """Decide every value and render the manifests; UserError when the job cannot fit or is malformed."""
    workspace = plan.workspace
    name = workspace.metadata.name
    resource, tuning = workspace.resource, workspace.tuning
    sku = gpus.lookup(resource.instance_type, gpu_count=options.gpus, gpu_memory_gib=options.gpu_memory_gib)
    config, notes = for_sku(plan.config, sku)
    layout = parallelism.choose(plan.preset, config, plan.max_length, sku, resource.count)
    estimate = layout.estimate
    memory_fit.check_fits(sku, estimate, plan.preset.name)
    if layout.mode == "fsdp" and not config.training_arguments.sharded:  # the pod reads it from the ConfigMap
        config = dataclasses.replace(config, training_arguments=config.training_arguments.model_copy(
            update={"fsdp": "full_shard"}))
    notes.append(f"parallelism: {layout.describe()}")
    notes = [*plan.notes, *(f"warning: {w}" for w in plan.warnings), *notes,
             f"{sku.name}: {sku.gpu_count}x {sku.gpu_model} {sku.gpu_memory_gib:g} GiB; "
             f"estimated need per GPU: {estimate.describe()}"]

    job_name = f"{name}-tuning"
    labels = {"app.kubernetes.io/name": "tuner", "app.kubernetes.io/instance": name,
              "app.kubernetes.io/managed-by": "tuner", "app.kubernetes.io/version": __version__,
              "kaito.sh/workspace": name}
    namespace = job_namespace(options.namespace, workspace.metadata.namespace)
    common = {"namespace": namespace, "labels": labels}
    nodes = resource.count
    service_name = f"{job_name}-nodes"
    manifests = [_template("configmap.yaml", name=job_name, **common,
                           workspace_yaml=_pod_workspace(plan.workspace_path),
                           training_config_yaml=yaml.safe_dump({"training_config": config.as_sections()},
                                                               sort_keys=False))]
    if nodes > 1:
        manifests.append(_template("service.yaml", name=service_name, job_name=job_name, port=RENDEZVOUS_PORT,
                                   **common))

    volumes, fetch_mounts, run_mounts = _volumes(plan, options, job_name, nodes)
    registry_args = [arg for host in options.insecure_registries for arg in ("--insecure-registry", host)]
    fetch_args = ["fetch", f"{CONFIG_DIR}/workspace.yaml", "--work-dir", WORK_DIR, *registry_args]
    if tuning.input.image and tuning.input.image_pull_secrets:
        fetch_args += ["--registry-config", PULL_SECRET_DIR]
    run_args = ["run", f"{CONFIG_DIR}/workspace.yaml", "--config", f"{CONFIG_DIR}/training_config.yaml",
                "--work-dir", WORK_DIR, "--skip-fetch", *registry_args]
    if isinstance(plan.merged_output, RegistryTarget):  # the plan refuses an OCI layout for a Job
        run_args += ["--merged-image", plan.merged_output.reference]
    ports, pod_annotations = _ports(options, nodes)
    if options.metrics_port is not None:
        run_args += ["--metrics-port", str(options.metrics_port)]
    command = _launcher(sku.gpu_count, nodes, f"{job_name}-0.{service_name}")
    if command:
        run_args = ["-m", "tuner.cli", *run_args]
    cache = MODEL_CACHE_MOUNT if options.model_cache_pvc else f"{WORK_MOUNT}/cache"
    env = [{"name": "HF_HOME", "value": f"{cache}/huggingface"},
           {"name": "OMP_NUM_THREADS", "value": "4"},
           {"name": "TUNER_CACHE_DIR", "value": f"{cache}/tuner"},
           {"name": "PYTORCH_CUDA_ALLOC_CONF", "value": "expandable_segments:True"},
           {"name": "NODE_RANK", "valueFrom": {"fieldRef": {
               "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}}
           if nodes > 1 else {"name": "NODE_RANK", "value": "0"}]
    if tuning.output.image or (plan.merged_output and tuning.output.image_push_secret):  # the merged push's too
        env.append({"name": "DOCKER_CONFIG", "value": PUSH_SECRET_DIR})
    if access := tuning.preset.model_access_secret:  # Kaito's presetOptions.modelAccessSecret, key HF_TOKEN
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": access, "key": "HF_TOKEN"}}})
    # both containers: the log format, and the outcome as the termination message (`tuner status` reads it)
    shared_env = [{"name": "TUNER_LOG_FORMAT", "value": options.log_format},
                  {"name": termination.PATH_ENV, "value": TERMINATION_MESSAGE_PATH}]
    env += shared_env
    # The fetch container also needs NODE_RANK for its per-node work directory, and DOCKER_CONFIG to
    # check the push secret.
    fetch_env = [e for e in env if e["name"] in ("NODE_RANK", "DOCKER_CONFIG")] + shared_env
    if options.url_headers_secret:
        fetch_env.append({"name": "TUNER_URL_HEADERS_FILE", "value": f"{URL_HEADERS_DIR}/headers.json"})
    env_from = [{"secretRef": {"name": _secret_name(name)}} for name in options.env_secrets]
    if command:  # torchrun's wait for its workers after SIGTERM, within the pod's grace period
        env.append({"name": distributed.SHUTDOWN_ENV, "value": str(distributed.shutdown_seconds(options.grace_seconds))})
    selector = resource.label_selector
    job = _template(
        "job.yaml", name=job_name, **common, backoff_limit=options.backoff_limit, ttl_seconds=options.ttl_seconds,
        nodes=nodes, user_error_exit_code=EXIT_USER_ERROR, grace_seconds=options.grace_seconds,
        service_name=service_name, node_selector=selector.match_labels if selector else {},
        affinity=_affinity(selector.match_expressions if selector else [], resource.preferred_nodes),
        gpus=sku.gpu_count, image_pull_secrets=[{"name": s} for s in tuning.input.image_pull_secrets],
        image=options.image, fetch_args=fetch_args, run_args=run_args, command=command, env=env, env_from=env_from,
        fetch_env=fetch_env,
        termination_message_path=TERMINATION_MESSAGE_PATH,
        container_security={"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": False,
                            "capabilities": {"drop": ["ALL"]}},
        resources={"limits": {"nvidia.com/gpu": sku.gpu_count}} if sku.gpu_count else {},
        fetch_mounts=fetch_mounts, run_mounts=run_mounts, volumes=volumes, ports=ports,
        pod_annotations=pod_annotations)
    manifests.append(job)
    if options.pod_monitor:  # the Job's pods, by their template's labels
        manifests.append(_template("podmonitor.yaml", name=job_name, **common, port_name=METRICS_PORT_NAME,
                                   path=METRICS_PATH, selector={k: labels[k] for k in (
                                       "app.kubernetes.io/name", "app.kubernetes.io/instance")}))
    if options.resume and not options.work_pvc:
        manifests.append(_template("pvc.yaml", name=f"{job_name}-work", **common,
                                   access_mode="ReadWriteMany" if nodes > 1 else "ReadWriteOnce",
                                   size=options.storage_size, storage_class=options.storage_class))
    return Rendered(manifests, notes, namespace)


def job_namespace(flag: str | None, workspace_namespace: str | None) -> str:
    """Where the Job goes: `-n`, else the Workspace's own namespace (where its Secrets live), else default."""
    if flag and workspace_namespace and flag != workspace_namespace:
        raise UserError(f"--namespace {flag} disagrees with the Workspace's metadata.namespace {workspace_namespace}",
                        where="--namespace", fix="drop -n (the Workspace's namespace is used), or make them the same")
    namespace = flag or workspace_namespace or "default"
    try:
        return k8s_names.dns1123_label(namespace, "namespace")
    except ValueError as exc:
        raise UserError(str(exc), where="--namespace" if flag else "metadata.namespace",
                        fix="name an existing namespace") from None


def _ports(options: RenderOptions, nodes: int) -> tuple[list[dict], dict[str, str]]:
    """The tuner container's ports (torchrun's rendezvous on several nodes, the metrics) and the pod's
    prometheus.io annotations for the scrapers that read them."""
    ports = [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT}] if nodes > 1 else []
    port = options.metrics_port
    if port is None:
        if options.pod_monitor:
            raise UserError("a PodMonitor needs the metrics port", where="--pod-monitor",
                            fix="add --metrics-port PORT (e.g. 9400)")
        return ports, {}
    if not 0 < port < 65536 or (nodes > 1 and port == RENDEZVOUS_PORT):
        raise UserError(f"{port} is not a free TCP port for the metrics" + (
            f" (torchrun's rendezvous uses {RENDEZVOUS_PORT})" if port == RENDEZVOUS_PORT else ""),
            where="--metrics-port", fix="choose another port from 1 to 65535 (e.g. 9400)")
    ports.append({"name": METRICS_PORT_NAME, "containerPort": port, "protocol": "TCP"})
    return ports, {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": METRICS_PATH}


def _pod_workspace(workspace_path: Path) -> str:
    """The Workspace as pods read it: volumeSources become the paths the Job mounts them at."""
    document = copy.deepcopy(load_yaml_file(workspace_path, "Workspace"))
    tuning = document["tuning"]
    for key, mount in (("input", INPUT_MOUNT), ("output", OUTPUT_MOUNT)):
        if tuning.get(key, {}).get("volumeSource"):
            tuning[key]["volumeSource"] = {"hostPath": {"path": mount}}
    return yaml.safe_dump(document, sort_keys=False)


def _volumes(plan: JobPlan, options: RenderOptions, job_name: str,
             nodes: int) -> tuple[list[dict], list[dict], list[dict]]:
    """(volumes, the fetch container's mounts, the tuner container's mounts)."""
    tuning = plan.workspace.tuning
    if not options.resume:
        work = {"name": "work", "emptyDir": {}}
    else:
        work = {"name": "work", "persistentVolumeClaim": {"claimName": options.work_pvc or f"{job_name}-work"}}
    # Several nodes share one ReadWriteMany claim, each in its own folder.
    work_mount = {"name": "work", "mountPath": WORK_MOUNT} | ({"subPathExpr": "node-$(NODE_RANK)"} if nodes > 1 else {})
    volumes = [{"name": "config", "configMap": {"name": job_name}}, work,
               {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}]
    config_mount = {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}
    fetch_mounts = [config_mount, work_mount]
    run_mounts = [config_mount, work_mount, {"name": "dshm", "mountPath": "/dev/shm"}]
    if tuning.input.volume_source:
        # fetch records the files' paths under the mount; `run --skip-fetch` reads them there again
        volumes.append({"name": "input", **tuning.input.volume_source})
        input_mount = {"name": "input", "mountPath": INPUT_MOUNT, "readOnly": True}
        fetch_mounts.append(input_mount)
        run_mounts.append(input_mount)
    if tuning.input.image and tuning.input.image_pull_secrets:
        volumes.append(_docker_config_volume("pull-secret", tuning.input.image_pull_secrets[0]))
        fetch_mounts.append({"name": "pull-secret", "mountPath": PULL_SECRET_DIR, "readOnly": True})
    if options.url_headers_secret:
        volumes.append({"name": "url-headers", "secret": {"secretName": options.url_headers_secret,
                                                          "defaultMode": 0o440,
                                                          "items": [{"key": "headers.json", "path": "headers.json"}]}})
        fetch_mounts.append({"name": "url-headers", "mountPath": URL_HEADERS_DIR, "readOnly": True})
    if options.model_cache_pvc:
        volumes.append({"name": "model-cache", "persistentVolumeClaim": {"claimName": options.model_cache_pvc}})
        run_mounts.append({"name": "model-cache", "mountPath": MODEL_CACHE_MOUNT})
    if tuning.output.volume_source:
        volumes.append({"name": "output", **tuning.output.volume_source})
        run_mounts.append({"name": "output", "mountPath": OUTPUT_MOUNT})
    if tuning.output.image_push_secret:
        # fetch checks the push secret too, so a malformed one fails before any download
        volumes.append(_docker_config_volume("push-secret", tuning.output.image_push_secret))
        push_mount = {"name": "push-secret", "mountPath": PUSH_SECRET_DIR, "readOnly": True}
        fetch_mounts.append(push_mount)
        run_mounts.append(push_mount)
    return volumes, fetch_mounts, run_mounts


def _secret_name(name: str) -> str:
    try:
        return k8s_names.dns1123_subdomain(name, "Secret name")
    except ValueError as exc:
        raise UserError(str(exc), where="--env-secret", fix="name an existing Secret of the Job's namespace") from None


def _docker_config_volume(name: str, secret: str) -> dict:
    """A kubernetes.io/dockerconfigjson Secret mounted as a docker config directory."""
    return {"name": name, "secret": {"secretName": secret, "defaultMode": 0o440,
                                     "items": [{"key": ".dockerconfigjson", "path": "config.json"}]}}


def _affinity(match_expressions: list[dict], preferred_nodes: list[str]) -> dict:
    node_affinity: dict[str, Any] = {}
    if match_expressions:
        node_affinity["requiredDuringSchedulingIgnoredDuringExecution"] = {
            "nodeSelectorTerms": [{"matchExpressions": match_expressions}]}
    if preferred_nodes:
        node_affinity["preferredDuringSchedulingIgnoredDuringExecution"] = [{"weight": 100, "preference": {
            "matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": preferred_nodes}]}}]
    return {"nodeAffinity": node_affinity} if node_affinity else {}


def _launcher(gpus_per_node: int, nodes: int, rendezvous_host: str) -> list[str]:
    """The torchrun launch for several processes; empty (the image's `tuner` entrypoint) for one.

    `python -m tuner.distributed` takes torchrun's arguments and exits with the first failed
    worker's code (torchrun itself exits 1), so the failure policy still sees tuner's user-error code.
    The rendezvous is static, so global rank 0 (which writes and pushes) is always index 0's first GPU.
    """
    if gpus_per_node <= 1 and nodes <= 1:
        return []
    command = ["python", "-m", "tuner.train.distributed", f"--nproc_per_node={max(gpus_per_node, 1)}"]
    if nodes == 1:
        return [*command, "--standalone"]
    return [*command, f"--nnodes={nodes}", "--node_rank=$(NODE_RANK)", f"--master_addr={rendezvous_host}",
            f"--master_port={RENDEZVOUS_PORT}"]
