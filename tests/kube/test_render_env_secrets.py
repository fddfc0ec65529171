"""`tuner render --env-secret NAME`: the trackers' URIs and keys reach the training container from
Secrets (envFrom), never through the manifest's own text."""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml

from job_support import seed_workspace
from tuner import cli
from tuner.errors import UserError
from tuner.kube.render import RenderOptions, render
from tuner.spec.plan import plan_job


def job_of(tmp_path, **options) -> dict:
    result = render(plan_job(seed_workspace(tmp_path), for_cluster=True), RenderOptions(**options))
    return next(m for m in result.manifests if m["kind"] == "Job")


def containers(job: dict) -> dict[str, dict]:
    spec = job["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec.get("initContainers", []) + spec["containers"]}


def test_each_secret_becomes_the_training_containers_environment(tmp_path):
    job = job_of(tmp_path, env_secrets=("mlflow-creds", "wandb-key"))
    by_name = containers(job)
    assert by_name["tuner"]["envFrom"] == [{"secretRef": {"name": "mlflow-creds"}}, {"secretRef": {"name": "wandb-key"}}]
    assert all("envFrom" not in c for name, c in by_name.items() if name != "tuner")  # the fetch needs none
    kubernetes_validate.validate(job, kubernetes_validate.latest_version(), strict=True)


def test_without_the_flag_the_container_takes_no_secret_environment(tmp_path):
    assert "envFrom" not in containers(job_of(tmp_path))["tuner"]


def test_an_invalid_secret_name_is_refused_naming_the_flag(tmp_path):
    with pytest.raises(UserError) as error:
        job_of(tmp_path, env_secrets=("MLflow_Creds",))
    assert str(error.value).startswith("--env-secret: Secret name 'MLflow_Creds' is not a valid Kubernetes name")


def test_tuner_render_takes_the_flag_repeatedly(tmp_path, capsys):
    assert cli.main(["render", str(seed_workspace(tmp_path)), "--env-secret", "a", "--env-secret", "b"]) == 0
    job = next(m for m in yaml.safe_load_all(capsys.readouterr().out) if m and m["kind"] == "Job")
    assert containers(job)["tuner"]["envFrom"] == [{"secretRef": {"name": "a"}}, {"secretRef": {"name": "b"}}]
