"""`tuner plan`: whether a job fits before any GPU is booked, with its numbers, and what would fit if not."""

from __future__ import annotations

import json
import math

import yaml

from job_support import ROWS, configmap, seed_workspace, workspace
from tuner import cli
from tuner.kube.gpus import lookup
from tuner.kube.memory_fit import estimate
from tuner.kube.sku_precision import for_sku
from tuner.kube.throughput import tokens_per_second
from tuner.spec.plan import plan_job


def plan_lines(capsys, *argv: str) -> tuple[int, list[str], str]:
    code = cli.main(["plan", *argv])
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err


def test_the_seeds_phi3_qlora_on_one_v100_fits_with_its_numbers(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = seed_workspace(tmp_path)
    code, lines, err = plan_lines(capsys, str(path))
    job = plan_job(path, for_cluster=True)
    sku = lookup("Standard_NC6s_v3")
    need = estimate(job.preset, for_sku(job.config, sku)[0], job.max_length)
    assert code == 0 and err == ""
    memory = next(line for line in lines if line.startswith("memory: "))
    assert memory.startswith(f"memory: {need.total:.1f} GiB per GPU of {15.8 * 0.95:.1f} GiB usable: fits")
    assert "gpus: Standard_NC6s_v3: 1 x V100 (15.8 GiB each); no bf16, so float16" in lines
    assert any(line.startswith("data: not counted (tuning.input.urls[0]") for line in lines)  # no network here
    rate = tokens_per_second(job.preset, sku, "qlora").per_gpu
    assert f"at ~{rate:,.0f} tokens/s per GPU" in lines[-1] and "per million training tokens" in lines[-1]


def test_a_job_that_cannot_fit_says_what_would_and_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    doc = yaml.safe_load(seed_workspace(tmp_path).read_text())
    doc["tuning"]["preset"]["name"], doc["tuning"]["method"] = "phi-4", "lora"
    (tmp_path / "ws.yaml").write_text(yaml.safe_dump(doc))
    code, lines, err = plan_lines(capsys, str(tmp_path / "ws.yaml"))
    assert code == 2 and any("does NOT fit" in line for line in lines)
    instead = [line for line in lines if line.startswith("instead: ")]
    assert instead[0].startswith("instead: method qlora (4-bit base weights): ")
    assert any(line.startswith("instead: instance type ") and line.endswith("fits") for line in instead)
    error = err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: resource.instanceType: phi-4 lora needs about ")


def test_reachable_data_gives_rows_tokens_steps_and_a_duration(tmp_path, capsys, http_server, tiny_model_dir):
    root, base = http_server
    (root / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    config = configmap(tmp_path, tiny_model_dir)
    doc = yaml.safe_load(workspace(tmp_path, [f"{base}/rows.jsonl"]).read_text())
    doc["resource"]["instanceType"] = "Standard_NC24ads_A100_v4"
    (tmp_path / "ws.yaml").write_text(yaml.safe_dump(doc))
    code, lines, _ = plan_lines(capsys, str(tmp_path / "ws.yaml"), "--config", str(config), "--allow-private-urls")
    assert code == 0
    data = next(line for line in lines if line.startswith("data: "))
    assert data.startswith(f"data: {len(ROWS)} train rows, ")
    steps = next(line for line in lines if line.startswith("steps: "))
    assert steps.startswith("steps: 6 (")  # max_steps 6 in the ConfigMap
    assert lines[-1].startswith("duration: about ") and "A100-80GB's 312 TFLOP/s" in lines[-1]
    assert math.isfinite(float(lines[-1].split("~")[1].split(" ")[0].replace(",", "")))
