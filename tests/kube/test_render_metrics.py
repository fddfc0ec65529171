"""`tuner render --metrics-port PORT [--pod-monitor]`: the Job's container names the port, the pod is
annotated for annotation-based scrapers, `tuner run` is told to serve, and a PodMonitor selects the
Job's pods. The core manifests validate against the official Kubernetes schemas; the PodMonitor is
a CRD that kubernetes-validate does not know, so it is checked against the field names and types
of the prometheus-operator's own CRD (see POD_MONITOR_SCHEMA) and against the Job it must match."""

from __future__ import annotations

import jsonschema
import kubernetes_validate
import pytest
import yaml

from job_support import seed_workspace
from tuner import cli
from tuner.errors import UserError
from tuner.kube.render import METRICS_PATH, RenderOptions, render
from tuner.spec.plan import plan_job

K8S_VERSIONS = [f"1.{minor}.0" for minor in range(30, int(kubernetes_validate.latest_version().split(".")[1]) + 1)]
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
# The PodMonitor fields tuner renders, each with the type the prometheus-operator's CRD gives it
# (example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml, operator 0.91.0:
# spec.required is [selector]; selector is a LabelSelector; podMetricsEndpoints[].port is the pod's
# port *name*, a string, and path a string). Any field tuner might add that is not listed here fails
# the check, so a misspelt field cannot slip through the way an unknown CRD field would in a cluster
# (the API server prunes unknown fields of a structural CRD without a word).
POD_MONITOR_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {"type": "object", "additionalProperties": False, "required": ["name", "namespace"],
                     "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"},
                                    "namespace": {"type": "string"}, "labels": STRING_MAP}},
        "spec": {"type": "object", "additionalProperties": False, "required": ["selector"], "properties": {
            "selector": {"type": "object", "additionalProperties": False,
                         "properties": {"matchLabels": STRING_MAP}, "required": ["matchLabels"]},
            "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "required": ["port"],
                "properties": {"port": {"type": "string"}, "path": {"type": "string"}}}},
        }},
    },
}


def manifests_of(tmp_path, **options) -> dict[str, dict]:
    result = render(plan_job(seed_workspace(tmp_path, **options.pop("workspace", {})), for_cluster=True),
                    RenderOptions(**options))
    return {m["kind"]: m for m in result.manifests}


def tuner_container(job: dict) -> dict:
    return next(c for c in job["spec"]["template"]["spec"]["containers"] if c["name"] == "tuner")


@pytest.mark.parametrize("workspace", [{}, {"instance": "Standard_NC12s_v3", "count": 2}], ids=["one-node", "2-nodes"])
def test_the_metrics_port_is_named_annotated_and_passed_to_tuner_run(tmp_path, workspace):
    manifests = manifests_of(tmp_path, metrics_port=9400, workspace=workspace)
    job = manifests["Job"]
    tuner = tuner_container(job)
    assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in tuner["ports"]
    assert tuner["args"][-2:] == ["--metrics-port", "9400"]
    assert job["spec"]["template"]["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true", "prometheus.io/port": "9400", "prometheus.io/path": METRICS_PATH}
    if workspace:  # torchrun's rendezvous port stays beside it
        assert {"name": "rendezvous", "containerPort": 29500} in tuner["ports"]
        assert tuner["args"][:3] == ["-m", "tuner.cli", "run"]
    for manifest in manifests.values():
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(manifest, version, strict=True)


def test_without_the_flag_nothing_is_exposed(tmp_path):
    job = manifests_of(tmp_path)["Job"]
    assert "annotations" not in job["spec"]["template"]["metadata"]
    assert "ports" not in tuner_container(job) and "--metrics-port" not in tuner_container(job)["args"]


def test_the_pod_monitor_selects_the_jobs_pods_and_their_metrics_port(tmp_path):
    manifests = manifests_of(tmp_path, metrics_port=9400, pod_monitor=True, namespace="training")
    monitor, job = manifests["PodMonitor"], manifests["Job"]
    jsonschema.validate(monitor, POD_MONITOR_SCHEMA)
    assert monitor["metadata"]["namespace"] == job["metadata"]["namespace"] == "training"
    template = job["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= template.items()
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == "phi3-qlora"
    endpoint, = monitor["spec"]["podMetricsEndpoints"]
    port = next(p for p in tuner_container(job)["ports"] if p["name"] == endpoint["port"])
    assert (port["containerPort"], endpoint["path"]) == (9400, METRICS_PATH)
    # and the check would catch a field the CRD does not have
    with pytest.raises(jsonschema.ValidationError, match="targetPorts"):
        jsonschema.validate({**monitor, "spec": {**monitor["spec"], "targetPorts": [9400]}}, POD_MONITOR_SCHEMA)


def test_a_pod_monitor_needs_the_port_and_the_port_must_be_free_of_torchrun(tmp_path):
    with pytest.raises(UserError, match=r"--pod-monitor: a PodMonitor needs the metrics port; add --metrics-port"):
        manifests_of(tmp_path, pod_monitor=True)
    with pytest.raises(UserError, match=r"--metrics-port: 29500 is not a free TCP port .*torchrun's rendezvous"):
        manifests_of(tmp_path, metrics_port=29500, workspace={"instance": "Standard_NC12s_v3", "count": 2})


def test_tuner_render_prints_the_pod_monitor(tmp_path, capsys):
    path = seed_workspace(tmp_path)
    assert cli.main(["render", str(path), "--metrics-port", "9400", "--pod-monitor"]) == 0
    kinds = [doc["kind"] for doc in yaml.safe_load_all(capsys.readouterr().out)]
    assert kinds == ["ConfigMap", "Job", "PodMonitor", "PersistentVolumeClaim"]
    assert cli.main(["render", str(path), "--pod-monitor"]) == 2
    assert capsys.readouterr().err.startswith("error: --pod-monitor: a PodMonitor needs the metrics port")
    with pytest.raises(SystemExit) as exit:
        cli.main(["render", str(path), "--metrics-port", "70000"])
    assert exit.value.code == 2 and "is not a TCP port (1 to 65535)" in capsys.readouterr().err
