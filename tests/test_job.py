"""`tuner run` end to end: Workspace + data on loopback -> LoRA on a tiny model -> OCI layout."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml

from job_support import ROWS, configmap, sha256_of, unpack_layout, workspace
from tuner import cli
from tuner.oci.image import read_oci_layout
from tuner.oci.pull import pull_image
from tuner.spec.targets import OciLayoutTarget, RegistryOptions


@pytest.fixture()
def served_rows(http_server) -> list[str]:
    root, base = http_server
    half = len(ROWS) // 2
    (root / "part1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:half]))
    (root / "part2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[half:]))
    return [f"{base}/part1.jsonl", f"{base}/part2.jsonl"]


@pytest.fixture()
def finished_run(tmp_path, tiny_model_dir, served_rows, capsys):
    layout = tmp_path / "layout"
    code = cli.main(["run", str(workspace(tmp_path, served_rows)), "--config", str(configmap(tmp_path, tiny_model_dir)),
                     "--work-dir", str(tmp_path / "work"), "--output", f"oci:{layout}:v1", "--allow-private-urls"])
    return code, tmp_path, layout, capsys.readouterr().out


def test_run_writes_an_image_whose_files_equal_the_adapter(finished_run):
    code, tmp_path, layout, _ = finished_run
    assert code == 0
    files = unpack_layout(layout, tmp_path / "unpacked")
    unpacked = {p.relative_to(tmp_path / "unpacked").as_posix() for p in files if p.is_file()}
    adapter = tmp_path / "work" / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "training_summary.json"} <= unpacked
    for name in ("adapter_config.json", "adapter_model.safetensors", "training_summary.json"):
        assert sha256_of(tmp_path / "unpacked" / name) == sha256_of(adapter / name)


def test_skopeo_sees_platform_and_labels(finished_run):
    _, _, layout, _ = finished_run
    skopeo = shutil.which("skopeo")
    assert skopeo, "skopeo is installed by scripts/test.sh"
    info = json.loads(subprocess.run([skopeo, "inspect", f"oci:{layout}:v1"], check=True,
                                     capture_output=True, text=True).stdout)
    assert (info["Os"], info["Architecture"]) == ("linux", "amd64")
    assert info["Labels"]["sh.kaito.model.name"] == "smollm2-135m-instruct"
    assert info["Labels"]["dev.tuner.method"] == "lora"


def test_unpacked_adapter_loads_on_the_base_model(finished_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, tmp_path, layout, _ = finished_run
    unpack_layout(layout, tmp_path / "unpacked")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "unpacked")
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_summary_records_data_steps_and_dataset_digests(finished_run, http_server):
    _, tmp_path, _, _ = finished_run
    summary = json.loads((tmp_path / "work" / "adapter" / "training_summary.json").read_text())
    root, _ = http_server
    assert summary["train"]["steps"] == 6
    assert summary["data"]["rows_kept"] == len(ROWS)
    assert [d["sha256"] for d in summary["datasets"]] == [sha256_of(root / "part1.jsonl"), sha256_of(root / "part2.jsonl")]
    assert summary["method"] == "lora" and summary["preset"] == "smollm2-135m-instruct"
    assert set(summary["stage_seconds"]) == {"fetch", "load", "prepare", "train"}


def test_summary_result_image_labels_and_termination_message_say_the_same_numbers(
        tmp_path, tiny_model_dir, served_rows, capsys, monkeypatch):
    """One record (JobSummary) writes them all, so they cannot drift apart."""
    monkeypatch.setenv("TUNER_TERMINATION_LOG", str(tmp_path / "termination-log"))
    layout = tmp_path / "layout"
    assert cli.main(["run", str(workspace(tmp_path, served_rows)), "--config", str(configmap(tmp_path, tiny_model_dir)),
                     "--work-dir", str(tmp_path / "work"), "--output", f"oci:{layout}:v1",
                     "--allow-private-urls"]) == 0
    summary = json.loads((tmp_path / "work" / "adapter" / "training_summary.json").read_text())
    result = json.loads((tmp_path / "work" / "result.json").read_text())
    outcome = json.loads((tmp_path / "termination-log").read_text())
    image = read_oci_layout(OciLayoutTarget(layout, "v1"))
    labels = json.loads(image.config.data)["config"]["Labels"]
    assert summary["image"] is None and result["image"] == {"reference": f"oci:{layout}:v1",
                                                            "digest": image.manifest.digest}
    assert {k: v for k, v in result.items() if k not in ("image", "stage_seconds")} == \
        {k: v for k, v in summary.items() if k not in ("image", "stage_seconds")}
    assert set(result["stage_seconds"]) == set(summary["stage_seconds"]) | {"package"}
    train = summary["train"]
    assert labels["dev.tuner.train-loss"] == f"{train['train_loss']:.4f}"
    assert labels["dev.tuner.config-digest"] == summary["config_digest"] == result["config_digest"]
    assert labels["org.opencontainers.image.created"] == summary["finished"]
    assert (outcome["steps"], outcome["trained_tokens"], outcome["train_loss"]) == (
        train["steps"], train["tokens_seen"], round(train["train_loss"], 4))
    assert outcome["image"] == f"oci:{layout}:v1@{image.manifest.digest}"


def test_a_hugging_face_model_id_trains_lora_on_every_linear_layer(tmp_path, tiny_model_dir, served_rows):
    """Kaito accepts any ORG/MODEL id; a local folder stands in for the hub."""
    work = tmp_path / "work"
    assert cli.main(["run", str(workspace(tmp_path, served_rows, preset="tuner-tests/smollm2-2-layers")),
                     "--config", str(configmap(tmp_path, tiny_model_dir)), "--work-dir", str(work),
                     "--output", f"oci:{tmp_path / 'layout'}:v1", "--allow-private-urls"]) == 0
    summary = json.loads((work / "adapter" / "training_summary.json").read_text())
    assert summary["preset"] == "tuner-tests/smollm2-2-layers" and summary["train"]["steps"] == 6
    assert summary["base_model"]["revision"] == f"local folder {tiny_model_dir}"
    targets = json.loads((work / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert sorted({target.rsplit(".", 1)[-1] for target in targets}) == [  # peft's all-linear, layer by layer
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert len(targets) == 2 * 7 and not any("lm_head" in target for target in targets)


def test_log_reports_data_and_progress(finished_run):
    _, _, _, out = finished_run
    assert "6 rows" in out.replace(",", "") or "6 kept" in out
    assert "step 6/6 (100%)" in out
    assert "precision: bfloat16 requested, but this CPU has no fast bfloat16: training in float32" in out


def test_malformed_push_secret_fails_before_any_work(tmp_path, tiny_model_dir, served_rows, capsys, monkeypatch):
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "config.json").write_text('{"auths": {"registry.example.com": {"auth": "not base64!"}}}')
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "secret"))
    code = cli.main(["run", str(workspace(tmp_path, served_rows)), "--config", str(configmap(tmp_path, tiny_model_dir)),
                     "--work-dir", str(tmp_path / "work"), "--allow-private-urls"])
    assert code == 2
    assert "registry.example.com" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_registry_output_is_pushed_and_pulls_back_identical(tmp_path, tiny_model_dir, served_rows, registry_plain,
                                                           monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(registry_plain.docker_config(tmp_path / "secret")))
    ref = f"{registry_plain.host}/e2e/adapter:1"
    code = cli.main(["run", str(workspace(tmp_path, served_rows)), "--config", str(configmap(tmp_path, tiny_model_dir)),
                     "--work-dir", str(tmp_path / "work"), "--output", ref, "--allow-private-urls",
                     "--insecure-registry", registry_plain.host])
    assert code == 0
    result = json.loads((tmp_path / "work" / "result.json").read_text())
    assert result["image"]["reference"] == ref
    options = RegistryOptions(insecure_registries=frozenset({registry_plain.host}))
    assert pull_image(ref, tmp_path / "pulled", options).digest == result["image"]["digest"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "training_summary.json"):
        assert sha256_of(tmp_path / "pulled" / name) == sha256_of(tmp_path / "work" / "adapter" / name)


def test_failed_push_keeps_the_adapter_and_the_push_can_be_rerun(tmp_path, tiny_model_dir, served_rows, fault_proxy,
                                                                capsys, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(fault_proxy.upstream.docker_config(tmp_path / "s", host=fault_proxy.host)))
    ref, work = f"{fault_proxy.host}/e2e/rerun:1", tmp_path / "work"
    fault_proxy.deny(401)
    code = cli.main(["run", str(workspace(tmp_path, served_rows)), "--config", str(configmap(tmp_path, tiny_model_dir)),
                     "--work-dir", str(work), "--output", ref, "--allow-private-urls",
                     "--insecure-registry", fault_proxy.host])
    assert code == 2
    assert f"re-run only the push: tuner push {work} {ref}" in capsys.readouterr().err
    assert (work / "adapter" / "adapter_model.safetensors").is_file() and (work / "result.json").is_file()
    fault_proxy.clear()
    assert cli.main(["push", str(work), ref, "--insecure-registry", fault_proxy.host]) == 0
    assert "pushed " + ref in capsys.readouterr().out


def test_volume_output_receives_the_adapter_files(tmp_path, tiny_model_dir, served_rows):
    path = workspace(tmp_path, served_rows)
    doc = yaml.safe_load(path.read_text())
    doc["tuning"]["output"] = {"volumeSource": {"hostPath": {"path": "adapter-out"}}}
    path.write_text(yaml.safe_dump(doc))
    code = cli.main(["run", str(path), "--config", str(configmap(tmp_path, tiny_model_dir)),
                     "--work-dir", str(tmp_path / "work"), "--allow-private-urls"])
    assert code == 0
    out = tmp_path / "adapter-out"
    assert sha256_of(out / "adapter_model.safetensors") == sha256_of(tmp_path / "work" / "adapter" / "adapter_model.safetensors")
    assert json.loads((out / "training_summary.json").read_text())["train"]["steps"] == 6


def test_weights_from_an_image_train_and_a_second_job_on_the_same_cache_pulls_nothing(
        tmp_path, tiny_model_dir, served_rows, fault_proxy, registry_plain, monkeypatch):
    """The way Kaito ships preset weights and air-gapped clusters mirror them: an image, pulled once
    into the model cache (a shared volume under `render --model-cache-pvc`)."""
    from tuner.oci.image import build_adapter_image, write_oci_layout
    from tuner.oci.registry import push_layout

    reference = f"{fault_proxy.host}/models/smollm2-2-layers:v1"
    options = RegistryOptions(insecure_registries=frozenset({fault_proxy.host}))
    monkeypatch.setenv("DOCKER_CONFIG", str(registry_plain.docker_config(tmp_path / "docker", host=fault_proxy.host)))
    layout = OciLayoutTarget(tmp_path / "weights-layout", "v1")
    write_oci_layout(build_adapter_image(tiny_model_dir, required=("config.json",)), layout)
    push_layout(layout, reference, options)
    monkeypatch.setenv("TUNER_CACHE_DIR", str(tmp_path / "shared-cache"))
    config = tmp_path / "training_config.yaml"
    config.write_text(yaml.safe_dump({"training_config": {
        "ModelConfig": {"weights_image": reference},
        "TrainingArguments": {"max_steps": 2, "logging_steps": 1, "max_length": 64}}}))

    def run(name: str) -> tuple[int, str]:
        before = len(fault_proxy.requests)
        code = cli.main(["run", str(workspace(tmp_path, served_rows)), "--config", str(config),
                         "--work-dir", str(tmp_path / name), "--output", f"oci:{tmp_path / name}-layout:v1",
                         "--allow-private-urls", "--insecure-registry", fault_proxy.host])
        return code, len(fault_proxy.requests) - before

    code, requests_made = run("first")
    pulled = fault_proxy.requests[-requests_made:] if requests_made else []
    assert code == 0 and any(r.method == "GET" and "/blobs/" in r.path and r.status == 200 for r in pulled)
    summary = json.loads((tmp_path / "first" / "adapter" / "training_summary.json").read_text())
    assert summary["train"]["steps"] == 2
    code, requests_made = run("second")
    assert code == 0 and requests_made == 0  # the cache holds the weights: no request at all
