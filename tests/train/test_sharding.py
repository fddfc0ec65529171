"""FSDP under torchrun on this CPU (gloo): the base model sharded over 2 processes, the LoRA weights
trained as shards and written once, gathered, as the same files a single process writes."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_distributed import ADAPTER, run_together

from job_support import ROWS, workspace

pytestmark = pytest.mark.slow
TOLERANCE = 1e-4  # float32 on a CPU: the sharded reduction sums in another order


def config(tmp_path: Path, model_dir: Path, name: str, **arguments) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"training_config": {
        "ModelConfig": {"pretrained_model_name_or_path": str(model_dir)},
        "TrainingArguments": {"max_steps": 4, "logging_steps": 1, "learning_rate": 0.01, "max_length": 64,
                              "train_sampling_strategy": "sequential", **arguments}}}))
    return path


def run(tmp_path: Path, name: str, config_path: Path, rows_url: str, processes: int) -> tuple[int, str, Path]:
    work = tmp_path / name
    launch = ([sys.executable, "-m", "tuner.train.distributed", "--standalone", f"--nproc_per_node={processes}"]
              if processes > 1 else [sys.executable])
    command = [*launch, "-m", "tuner.cli", "run", str(workspace(tmp_path, [rows_url])), "--config", str(config_path),
               "--allow-private-urls", "--work-dir", str(work), "--output", f"oci:{tmp_path / name}-layout:v1"]
    [(code, log)] = run_together([command], tmp_path)
    return code, log, work


def test_two_fsdp_processes_write_the_adapter_a_single_process_writes(tmp_path, tiny_model_dir, http_server):
    """Same data, seed and effective batch (2 x 1 sharded, against 1 x 2 in one process)."""
    root, base = http_server
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    url = f"{base}/rows.jsonl"
    code, log, sharded = run(tmp_path, "fsdp", config(tmp_path, tiny_model_dir, "fsdp", fsdp="full_shard",
                                                       per_device_train_batch_size=1), url, 2)
    assert code == 0, log
    assert "fsdp: base model sharded over 2 processes (2 decoder layers and the root)" in log
    code, log_single, single = run(tmp_path, "single", config(tmp_path, tiny_model_dir, "single",
                                                               per_device_train_batch_size=2), url, 1)
    assert code == 0, log_single
    fsdp_weights, single_weights = load_file(sharded / ADAPTER), load_file(single / ADAPTER)
    assert fsdp_weights.keys() == single_weights.keys() and len(fsdp_weights) == 2 * 7 * 2
    difference = max((fsdp_weights[k] - single_weights[k]).abs().max().item() for k in fsdp_weights)
    moved = max(single_weights[k].abs().max().item() for k in single_weights if "lora_B" in k)
    assert moved > 10 * TOLERANCE and difference < TOLERANCE  # trained, and the same training

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), sharded / "adapter")
    assert all(not isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())


def test_sigterm_under_fsdp_saves_a_checkpoint_and_the_rerun_resumes_from_it(tmp_path, tiny_model_dir, http_server):
    from test_checkpoints import MAX_STEPS, Run, complete_steps, resumed_from
    from test_checkpoints import config as checkpointing_config

    root, base = http_server
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    work = tmp_path / "work"
    args = ["run", str(workspace(tmp_path, [f"{base}/rows.jsonl"])), "--allow-private-urls",
            "--config", str(checkpointing_config(tmp_path, tiny_model_dir, fsdp="full_shard")),
            "--work-dir", str(work), "--output", f"oci:{tmp_path / 'layout'}:v1"]
    launcher = [sys.executable, "-m", "tuner.train.distributed", "--standalone", "--nproc_per_node=2"]
    first = Run(args, tmp_path, launcher)
    first.wait_for_step(7)
    first.proc.send_signal(signal.SIGTERM)
    assert first.finish() == 143, first.log
    stopped = first.last_step()
    assert complete_steps(work)[-1] == stopped
    second = Run(args, tmp_path, launcher)
    assert second.finish() == 0, second.log
    assert resumed_from(second.log) == (stopped, MAX_STEPS)
    assert f" step {stopped + 1}/{MAX_STEPS} " in second.log and f" step {stopped}/{MAX_STEPS} " not in second.log
    summary = json.loads((work / "result.json").read_text())
    assert summary["train"]["steps"] == MAX_STEPS and summary["train"]["resumed_from_step"] == stopped
    weights = load_file(work / ADAPTER)
    assert len(weights) == 2 * 7 * 2 and all(not name.endswith("_orig_mod") for name in weights)
