"""`tuner render`: every manifest variant validates against the official Kubernetes schemas (1.30
to the newest kubernetes-validate ships), and the fields that matter hold the right values."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from job_support import seed_workspace
from tuner import cli
from tuner.errors import UserError
from tuner.kube.render import RenderOptions, render
from tuner.spec.plan import plan_job

K8S_VERSIONS = [f"1.{minor}.0" for minor in range(30, int(kubernetes_validate.latest_version().split(".")[1]) + 1)]


def rendered(path: Path, **options) -> dict[str, dict]:
    result = render(plan_job(path, for_cluster=True), RenderOptions(**options))
    return {m["kind"]: m for m in result.manifests}


def pod(manifests: dict[str, dict]) -> dict:
    return manifests["Job"]["spec"]["template"]["spec"]


def container(manifests: dict[str, dict], name: str = "tuner") -> dict:
    spec = pod(manifests)
    return next(c for c in spec["containers"] + spec["initContainers"] if c["name"] == name)


VARIANTS = {
    "urls-to-image": {},
    "image-input": {"input_": {"image": "myacr.azurecr.io/datasets/dolly:1", "imagePullSecrets": ["acr-pull"]}},
    "volume-input": {"input_": {"volumeSource": {"persistentVolumeClaim": {"claimName": "datasets"}}}},
    "volume-output": {"output": {"volumeSource": {"persistentVolumeClaim": {"claimName": "adapters"}}}},
    "4-gpus": {"instance": "Standard_NC24s_v3"},
    "2-nodes": {"instance": "Standard_NC12s_v3", "count": 2},
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("options", [{}, {"resume": False}, {"work_pvc": "my-claim"}], ids=["pvc", "emptydir", "own-pvc"])
def test_every_variant_validates_against_the_official_schemas(tmp_path, variant, options):
    manifests = render(plan_job(seed_workspace(tmp_path, **VARIANTS[variant]), for_cluster=True),
                       RenderOptions(**options)).manifests
    for manifest in manifests:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(manifest, version, strict=True)


def test_seed_qlora_on_one_v100_gets_one_gpu_and_fp16(tmp_path):
    result = render(plan_job(seed_workspace(tmp_path), for_cluster=True), RenderOptions())
    manifests = {m["kind"]: m for m in result.manifests}
    assert container(manifests)["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    assert "command" not in container(manifests)  # one process: the image's tuner entrypoint
    config = yaml.safe_load(manifests["ConfigMap"]["data"]["training_config.yaml"])["training_config"]
    assert config["TrainingArguments"].get("bf16") in (False, None) and config["TrainingArguments"]["fp16"] is True
    assert any("bf16" in note for note in result.notes)


@pytest.mark.parametrize(("instance", "gpus"), [("Standard_NC12s_v3", 2), ("Standard_NC24s_v3", 4),
                                                 ("Standard_NC24ads_A100_v4", 1), ("Standard_ND96asr_v4", 8)])
def test_gpu_count_comes_from_the_sku(tmp_path, instance, gpus):
    manifests = rendered(seed_workspace(tmp_path, instance=instance))
    assert container(manifests)["resources"]["limits"]["nvidia.com/gpu"] == gpus


def test_several_gpus_launch_torchrun_on_one_node(tmp_path):
    tuner = container(rendered(seed_workspace(tmp_path, instance="Standard_NC24s_v3")))
    assert tuner["command"] == ["python", "-m", "tuner.train.distributed", "--nproc_per_node=4", "--standalone"]
    assert tuner["args"][:3] == ["-m", "tuner.cli", "run"]


def test_torchrun_gives_its_workers_the_grace_period_to_save_after_sigterm(tmp_path):
    manifests = {m["kind"]: m for m in render(plan_job(seed_workspace(tmp_path, instance="Standard_NC24s_v3"),
                                                       for_cluster=True), RenderOptions(grace_seconds=900)).manifests}
    assert pod(manifests)["terminationGracePeriodSeconds"] == 900
    assert {"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": "870"} in container(manifests)["env"]


def test_one_process_needs_no_launcher_shutdown_timeout(tmp_path):
    env = container(rendered(seed_workspace(tmp_path)))["env"]
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in {e["name"] for e in env}


def test_two_nodes_are_an_indexed_job_with_a_headless_service(tmp_path):
    manifests = rendered(seed_workspace(tmp_path, instance="Standard_NC12s_v3", count=2))
    job, service = manifests["Job"], manifests["Service"]
    assert (job["spec"]["completionMode"], job["spec"]["completions"], job["spec"]["parallelism"]) == ("Indexed", 2, 2)
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert pod(manifests)["subdomain"] == service["metadata"]["name"]
    assert container(manifests)["command"] == [
        "python", "-m", "tuner.train.distributed", "--nproc_per_node=2", "--nnodes=2", "--node_rank=$(NODE_RANK)",
        f"--master_addr=phi3-qlora-tuning-0.{service['metadata']['name']}", "--master_port=29500"]
    rank = next(e for e in container(manifests)["env"] if e["name"] == "NODE_RANK")
    assert "job-completion-index" in rank["valueFrom"]["fieldRef"]["fieldPath"]
    assert manifests["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    work = next(m for m in container(manifests)["volumeMounts"] if m["name"] == "work")
    assert work["subPathExpr"] == "node-$(NODE_RANK)"


def test_push_secret_is_mounted_read_only_as_the_docker_config(tmp_path):
    manifests = rendered(seed_workspace(tmp_path))
    volume = next(v for v in pod(manifests)["volumes"] if v["name"] == "push-secret")
    assert volume["secret"]["secretName"] == "acr-push"
    assert volume["secret"]["items"] == [{"key": ".dockerconfigjson", "path": "config.json"}]
    for name in ("fetch", "tuner"):  # fetch checks it before any download, tuner pushes with it
        mount = next(m for m in container(manifests, name)["volumeMounts"] if m["name"] == "push-secret")
        assert mount["readOnly"] is True
        assert {"name": "DOCKER_CONFIG", "value": mount["mountPath"]} in container(manifests, name)["env"]


def test_shm_is_a_memory_empty_dir(tmp_path):
    manifests = rendered(seed_workspace(tmp_path))
    assert next(v for v in pod(manifests)["volumes"] if v["name"] == "dshm")["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container(manifests)["volumeMounts"]


def test_fetch_init_container_then_training_without_refetching(tmp_path):
    manifests = rendered(seed_workspace(tmp_path))
    fetch = container(manifests, "fetch")
    assert fetch["args"][:2] == ["fetch", "/etc/tuner/workspace.yaml"]
    assert "--skip-fetch" in container(manifests)["args"]
    assert fetch["image"] == container(manifests)["image"]


def test_work_volume_is_a_pvc_owned_by_the_job_unless_resume_is_off(tmp_path):
    path = seed_workspace(tmp_path)
    manifests = rendered(path, storage_class="premium", storage_size="200Gi")
    pvc = manifests["PersistentVolumeClaim"]
    assert pvc["metadata"]["annotations"]["tuner.dev/owned-by-job"] == "true"
    assert (pvc["spec"]["storageClassName"], pvc["spec"]["resources"]["requests"]["storage"]) == ("premium", "200Gi")
    work = next(v for v in pod(manifests)["volumes"] if v["name"] == "work")
    assert work["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    no_resume = rendered(path, resume=False)
    assert "PersistentVolumeClaim" not in no_resume
    assert next(v for v in pod(no_resume)["volumes"] if v["name"] == "work")["emptyDir"] == {}
    own = rendered(path, work_pvc="team-scratch")
    assert "PersistentVolumeClaim" not in own
    assert next(v for v in pod(own)["volumes"] if v["name"] == "work")["persistentVolumeClaim"] == {
        "claimName": "team-scratch"}


def test_volume_sources_are_mounted_and_the_pods_workspace_points_at_them(tmp_path):
    manifests = rendered(seed_workspace(tmp_path, **VARIANTS["volume-input"], **VARIANTS["volume-output"]))
    volumes = {v["name"]: v for v in pod(manifests)["volumes"]}
    assert volumes["input"]["persistentVolumeClaim"] == {"claimName": "datasets"}
    assert volumes["output"]["persistentVolumeClaim"] == {"claimName": "adapters"}
    for name in ("fetch", "tuner"):  # fetch records the paths under the mount, `run --skip-fetch` reads them there
        mounts = container(manifests, name)["volumeMounts"]
        assert {"name": "input", "mountPath": "/mnt/input", "readOnly": True} in mounts
    assert {"name": "output", "mountPath": "/mnt/output"} in container(manifests)["volumeMounts"]
    tuning = yaml.safe_load(manifests["ConfigMap"]["data"]["workspace.yaml"])["tuning"]
    assert tuning["input"]["volumeSource"] == {"hostPath": {"path": "/mnt/input"}}
    assert tuning["output"]["volumeSource"] == {"hostPath": {"path": "/mnt/output"}}


def test_input_image_pull_secret_reaches_the_fetch_container(tmp_path):
    manifests = rendered(seed_workspace(tmp_path, **VARIANTS["image-input"]))
    assert pod(manifests)["imagePullSecrets"] == [{"name": "acr-pull"}]
    fetch = container(manifests, "fetch")
    assert fetch["args"][-2:] == ["--registry-config", "/etc/tuner/pull-secret"]
    assert any(m["name"] == "pull-secret" and m["readOnly"] for m in fetch["volumeMounts"])


def test_url_headers_secret_reaches_only_the_fetch_container(tmp_path):
    manifests = rendered(seed_workspace(tmp_path), url_headers_secret="dataset-auth")
    volume = next(v for v in pod(manifests)["volumes"] if v["name"] == "url-headers")
    assert volume["secret"]["secretName"] == "dataset-auth"
    fetch = container(manifests, "fetch")
    assert {"name": "TUNER_URL_HEADERS_FILE", "value": "/etc/tuner/url-headers/headers.json"} in fetch["env"]
    assert all(m["name"] != "url-headers" for m in container(manifests)["volumeMounts"])
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(manifests["Job"], version, strict=True)


def test_a_model_cache_claim_is_shared_by_jobs_as_the_tuner_containers_cache(tmp_path):
    manifests = rendered(seed_workspace(tmp_path), model_cache_pvc="models")
    volume = next(v for v in pod(manifests)["volumes"] if v["name"] == "model-cache")
    assert volume["persistentVolumeClaim"] == {"claimName": "models"}
    tuner = container(manifests)
    assert {"name": "model-cache", "mountPath": "/mnt/model-cache"} in tuner["volumeMounts"]
    env = {e["name"]: e.get("value") for e in tuner["env"]}
    assert (env["HF_HOME"], env["TUNER_CACHE_DIR"]) == ("/mnt/model-cache/huggingface", "/mnt/model-cache/tuner")
    assert all(m["name"] != "model-cache" for m in container(manifests, "fetch")["volumeMounts"])
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(manifests["Job"], version, strict=True)


def test_kaitos_model_access_secret_gives_the_tuner_container_hf_token(tmp_path):
    path = seed_workspace(tmp_path)
    doc = yaml.safe_load(path.read_text())
    doc["tuning"]["preset"]["presetOptions"] = {"modelAccessSecret": "hf-token"}
    path.write_text(yaml.safe_dump(doc))
    manifests = rendered(path)
    token = next(e for e in container(manifests)["env"] if e["name"] == "HF_TOKEN")
    assert token["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}
    assert all(e["name"] != "HF_TOKEN" for e in container(manifests, "fetch")["env"])
    doc["tuning"]["preset"]["presetOptions"] = {"modelAccessSecret": "HF Token"}
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(UserError, match=r"tuning\.preset\.presetOptions.*Secret name 'HF Token' is not a valid"):
        rendered(path)


def qwen32b_lora(tmp_path: Path, instance: str) -> Path:
    path = seed_workspace(tmp_path, instance=instance)
    doc = yaml.safe_load(path.read_text())
    doc["tuning"]["preset"]["name"], doc["tuning"]["method"] = "qwen2.5-coder-32b-instruct", "lora"
    path.write_text(yaml.safe_dump(doc))
    return path


def checkpointing_config(tmp_path: Path) -> Path:
    config = tmp_path / "training_config.yaml"
    config.write_text(yaml.safe_dump({"training_config": {"TrainingArguments": {"gradient_checkpointing": True}}}))
    return config


def test_a_model_bigger_than_one_gpu_renders_an_fsdp_job_over_the_nodes_gpus(tmp_path):
    """Qwen2.5-Coder-32B LoRA needs ~64 GiB of bf16 weights: DDP's whole copy per GPU cannot fit 40 GB cards."""
    result = render(plan_job(qwen32b_lora(tmp_path, "p4d.24xlarge"), config_path=checkpointing_config(tmp_path),
                             for_cluster=True), RenderOptions())
    manifests = {m["kind"]: m for m in result.manifests}
    config = yaml.safe_load(manifests["ConfigMap"]["data"]["training_config.yaml"])
    assert config["training_config"]["TrainingArguments"]["fsdp"] == "full_shard"
    note = next(n for n in result.notes if n.startswith("parallelism: "))
    assert note.startswith("parallelism: fsdp over 8 GPU(s): one GPU cannot hold ")
    assert container(manifests)["command"][:4] == ["python", "-m", "tuner.train.distributed", "--nproc_per_node=8"]
    for version in K8S_VERSIONS:
        for manifest in result.manifests:
            kubernetes_validate.validate(manifest, version, strict=True)


def test_the_same_job_on_one_40gb_gpu_is_refused_with_the_numbers(tmp_path):
    with pytest.raises(UserError, match=r"resource.instanceType: qwen2.5-coder-32b-instruct lora needs about \d+\.\d GiB "
                                        r"per GPU, more than the 37.6 GiB usable .* of a2-highgpu-1g's A100-40GB"):
        render(plan_job(qwen32b_lora(tmp_path, "a2-highgpu-1g"), config_path=checkpointing_config(tmp_path),
                        for_cluster=True), RenderOptions())


def test_fsdp_no_keeps_ddp_and_the_job_that_needs_sharding_is_refused(tmp_path):
    config = tmp_path / "training_config.yaml"
    config.write_text(yaml.safe_dump({"training_config": {"TrainingArguments": {"gradient_checkpointing": True,
                                                                              "fsdp": "no"}}}))
    with pytest.raises(UserError, match=r"needs about \d+\.\d GiB per GPU, more than the 37.6 GiB usable .* of each of "
                                        r"p4d.24xlarge's 8 A100-40GB GPUs"):
        render(plan_job(qwen32b_lora(tmp_path, "p4d.24xlarge"), config_path=config, for_cluster=True), RenderOptions())


def test_a_job_one_gpu_holds_stays_ddp(tmp_path):
    result = render(plan_job(seed_workspace(tmp_path, instance="Standard_NC24s_v3"), for_cluster=True),
                    RenderOptions())
    assert any(n.startswith("parallelism: ddp over 4 GPU(s): one GPU holds the whole job") for n in result.notes)


def test_security_context_is_locked_down(tmp_path):
    manifests = rendered(seed_workspace(tmp_path))
    security = pod(manifests)["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 1000
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    for name in ("fetch", "tuner"):
        assert container(manifests, name)["securityContext"] == {
            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": False, "capabilities": {"drop": ["ALL"]}}


def test_failure_policy_fails_fast_on_user_errors_and_ignores_disruptions(tmp_path):
    spec = rendered(seed_workspace(tmp_path))["Job"]["spec"]
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [2]}}
    assert rules[1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    assert spec["backoffLimit"] == 3 and spec["ttlSecondsAfterFinished"] > 0
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] >= 300


def test_labels_selector_and_gpu_tolerations(tmp_path):
    manifests = rendered(seed_workspace(tmp_path))
    labels = manifests["Job"]["metadata"]["labels"]
    assert (labels["app.kubernetes.io/name"], labels["app.kubernetes.io/instance"], labels["kaito.sh/workspace"]) == (
        "tuner", "phi3-qlora", "phi3-qlora")
    assert pod(manifests)["nodeSelector"] == {"app": "phi-3-adapter"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod(manifests)["tolerations"]


def test_unknown_sku_needs_explicit_gpus_and_memory(tmp_path):
    path = seed_workspace(tmp_path, instance="Custom_GPU_Box")
    with pytest.raises(UserError, match="resource.instanceType"):
        rendered(path)
    manifests = rendered(path, gpus=2, gpu_memory_gib=48)
    assert container(manifests)["resources"]["limits"]["nvidia.com/gpu"] == 2


def test_a_sku_too_small_is_refused_with_the_numbers(tmp_path, capsys):
    path = seed_workspace(tmp_path)
    doc = yaml.safe_load(path.read_text())
    doc["tuning"]["method"] = "lora"
    path.write_text(yaml.safe_dump(doc))
    config = tmp_path / "big.yaml"
    config.write_text(yaml.safe_dump({"training_config": {"TrainingArguments": {
        "per_device_train_batch_size": 16, "max_length": 4096, "gradient_checkpointing": False}}}))
    code = cli.main(["render", str(path), "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 2
    assert "phi-3-mini-4k-instruct" in err and "16" in err and "GiB" in err


def test_cli_render_prints_yaml_documents_with_notes(tmp_path, capsys):
    assert cli.main(["render", str(seed_workspace(tmp_path)), "--namespace", "ml"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# ")
    kinds = [d["kind"] for d in yaml.safe_load_all(out)]
    assert kinds == ["ConfigMap", "Job", "PersistentVolumeClaim"]
    assert all(d["metadata"]["namespace"] == "ml" for d in yaml.safe_load_all(out))


def test_render_notes_the_normalised_image_once_and_pods_pull_what_was_given(tmp_path):
    path = seed_workspace(tmp_path, input_={"image": "data-image:v1"})
    result = render(plan_job(path, for_cluster=True), RenderOptions())
    notes = [n for n in result.notes if "normalised" in n]
    assert notes == ["tuning.input.image: data-image:v1 normalised to docker.io/library/data-image:v1, "
                     "as Kaito reads it"]
    assert result.to_yaml().count("normalised to") == 1


def test_a_name_too_long_for_a_job_is_refused(tmp_path):
    with pytest.raises(UserError, match="metadata.name"):
        rendered(seed_workspace(tmp_path, name="x" * 51))
    rendered(seed_workspace(tmp_path, name="x" * 50))  # the longest that validates renders


def with_namespace(path: Path, namespace: str) -> Path:
    doc = yaml.safe_load(path.read_text())
    doc["metadata"]["namespace"] = namespace
    path.write_text(yaml.safe_dump(doc))
    return path


def test_the_workspaces_namespace_is_the_jobs_unless_n_names_the_same(tmp_path):
    path = with_namespace(seed_workspace(tmp_path), "team-a")
    result = render(plan_job(path, for_cluster=True), RenderOptions())
    assert result.namespace == "team-a"
    assert {m["metadata"]["namespace"] for m in result.manifests} == {"team-a"}
    assert render(plan_job(path, for_cluster=True), RenderOptions(namespace="team-a")).namespace == "team-a"
    with pytest.raises(UserError, match="--namespace team-b disagrees with the Workspace's metadata.namespace team-a"):
        render(plan_job(path, for_cluster=True), RenderOptions(namespace="team-b"))
    plain = seed_workspace(tmp_path)
    assert render(plan_job(plain, for_cluster=True), RenderOptions()).namespace == "default"
    with pytest.raises(UserError, match="namespace 'Bad_NS!' is not a valid name"):
        render(plan_job(plain, for_cluster=True), RenderOptions(namespace="Bad_NS!"))


def test_render_is_deterministic(tmp_path):
    path = seed_workspace(tmp_path)
    first = render(plan_job(path, for_cluster=True), RenderOptions()).to_yaml()
    assert render(plan_job(path, for_cluster=True), RenderOptions()).to_yaml() == first


@pytest.mark.parametrize("name", ["fetch", "tuner"])
def test_both_containers_report_their_outcome_as_the_termination_message(tmp_path, name):
    spec = container(rendered(seed_workspace(tmp_path)), name)
    assert spec["terminationMessagePath"] == "/dev/termination-log"
    assert spec["terminationMessagePolicy"] == "FallbackToLogsOnError"  # the log tail when tuner wrote nothing
    assert {"name": "TUNER_TERMINATION_LOG", "value": "/dev/termination-log"} in spec["env"]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_log_format_is_set_for_both_containers(tmp_path, log_format):
    manifests = rendered(seed_workspace(tmp_path), log_format=log_format)
    for name in ("fetch", "tuner"):
        assert {"name": "TUNER_LOG_FORMAT", "value": log_format} in container(manifests, name)["env"]
