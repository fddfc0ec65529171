"""FSDP under torchrun on this CPU (gloo): the base model sharded over 2 processes, the LoRA weights
trained as shards and written once, gathered, as the same files a single process writes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_distributed import ADAPTER, run_together

from job_support import ROWS, workspace

pytestmark = pytest.mark.slow
# float32 on a CPU, the sharded reduction summing in another order; Adam's first steps move a weight by
# about the learning rate whatever its gradient's size, so a near-zero gradient's noise shows. Measured:
# under 1e-4 on the 2-layer model, 3.5e-4 on the 30-layer SmolLM2 (weights up to 2.5e-2).
TOLERANCE = 1e-3


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


@pytest.mark.parametrize("model", ["tiny_model_dir", "smollm2_dir"])
def test_two_fsdp_processes_write_the_adapter_a_single_process_writes(tmp_path, model, request, http_server):
    """Same data, seed and effective batch (2 x 1 sharded, against 1 x 2 in one process), on the 2-layer
    cut of SmolLM2 and on the whole 30-layer SmolLM2."""
    tiny_model_dir = request.getfixturevalue(model)
    layers = json.loads((tiny_model_dir / "config.json").read_text())["num_hidden_layers"]
    root, base = http_server
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    url = f"{base}/rows.jsonl"
    code, log, sharded = run(tmp_path, "fsdp", config(tmp_path, tiny_model_dir, "fsdp", fsdp="full_shard",
                                                       per_device_train_batch_size=1), url, 2)
    assert code == 0, log
    assert f"fsdp: base model sharded over 2 processes ({layers} decoder layers and the root)" in log
    code, log_single, single = run(tmp_path, "single", config(tmp_path, tiny_model_dir, "single",
                                                               per_device_train_batch_size=2), url, 1)
    assert code == 0, log_single
    fsdp_weights, single_weights = load_file(sharded / ADAPTER), load_file(single / ADAPTER)
    assert fsdp_weights.keys() == single_weights.keys() and len(fsdp_weights) == 2 * 7 * layers
    difference = max((fsdp_weights[k] - single_weights[k]).abs().max().item() for k in fsdp_weights)
    moved = max(single_weights[k].abs().max().item() for k in single_weights if "lora_B" in k)
    assert moved > 10 * TOLERANCE and difference < TOLERANCE  # trained, and the same training

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), sharded / "adapter")
    assert all(not isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())


def test_sigterm_under_fsdp_saves_a_checkpoint_and_the_resumed_run_ends_as_an_unbroken_one(
        tmp_path, tiny_model_dir, http_server):
    """The checkpoint holds the adapter, the gathered AdamW moments and the LR schedule: the resumed run
    continues the same optimisation, so its adapter is the one a run never stopped writes."""
    from test_checkpoints import MAX_STEPS, Run, complete_steps, resumed_from
    from test_checkpoints import config as checkpointing_config

    root, base = http_server
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    config_path = checkpointing_config(tmp_path, tiny_model_dir, fsdp="full_shard", train_sampling_strategy="sequential")
    launcher = [sys.executable, "-m", "tuner.train.distributed", "--standalone", "--nproc_per_node=2"]

    def args(work: Path) -> list[str]:
        return ["run", str(workspace(tmp_path, [f"{base}/rows.jsonl"])), "--allow-private-urls", "--config",
                str(config_path), "--work-dir", str(work), "--output", f"oci:{work}-layout:v1"]

    unbroken = Run(args(tmp_path / "unbroken"), tmp_path, launcher)
    assert unbroken.finish() == 0, unbroken.log
    work = tmp_path / "work"
    first = Run(args(work), tmp_path, launcher)
    first.wait_for_step(7)
    first.proc.send_signal(signal.SIGTERM)
    assert first.finish() == 143, first.log
    stopped = first.last_step()
    assert complete_steps(work)[-1] == stopped and (work / "checkpoints" / f"checkpoint-{stopped}" /
                                                    "fsdp_optimizer.pt").is_file()
    second = Run(args(work), tmp_path, launcher)
    assert second.finish() == 0, second.log
    assert resumed_from(second.log) == (stopped, MAX_STEPS)
    assert f" step {stopped + 1}/{MAX_STEPS} " in second.log and f" step {stopped}/{MAX_STEPS} " not in second.log
    summary = json.loads((work / "result.json").read_text())
    assert summary["train"]["steps"] == MAX_STEPS and summary["train"]["resumed_from_step"] == stopped
    resumed, reference = load_file(work / ADAPTER), load_file(tmp_path / "unbroken" / ADAPTER)
    assert resumed.keys() == reference.keys()
    assert max((resumed[k] - reference[k]).abs().max().item() for k in resumed) < TOLERANCE


def test_a_sigkill_under_fsdp_redoes_at_most_one_checkpoint_interval(tmp_path, tiny_model_dir, http_server):
    from test_checkpoints import MAX_STEPS, SAVE_STEPS, Run, complete_steps, resumed_from
    from test_checkpoints import config as checkpointing_config

    root, base = http_server
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    work = tmp_path / "work"
    args = ["run", str(workspace(tmp_path, [f"{base}/rows.jsonl"])), "--allow-private-urls",
            "--config", str(checkpointing_config(tmp_path, tiny_model_dir, fsdp="full_shard")),
            "--work-dir", str(work), "--output", f"oci:{tmp_path / 'layout'}:v1"]
    launcher = [sys.executable, "-m", "tuner.train.distributed", "--standalone", "--nproc_per_node=2"]
    first = Run(args, tmp_path, launcher)
    first.wait_for_step(2 * SAVE_STEPS + 2)
    # the launcher and its workers (in sessions of their own), all at once, with no chance to save
    subprocess.run(["pkill", "-KILL", "-f", "--", f"--work-dir {work}"], check=True)
    first.finish()
    killed_at, saved = first.last_step(), complete_steps(work)[-1]
    second = Run(args, tmp_path, launcher)
    assert second.finish() == 0, second.log
    assert resumed_from(second.log) == (saved, MAX_STEPS) and killed_at - saved <= SAVE_STEPS


def test_fsdp_shards_over_the_ranks_of_two_nodes_each_checkpointing_into_its_own_work_dir(
        tmp_path, tiny_model_dir, http_server):
    """Two "nodes" on loopback, one process each (like two pods): the weights sharded over both, each
    node's checkpoints complete with the whole adapter, rank 0 alone writing the final one."""
    from test_distributed import free_port

    from test_checkpoints import MAX_STEPS, SAVE_STEPS, complete_steps
    from test_checkpoints import config as checkpointing_config

    root, base = http_server
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    port = free_port()
    works = [tmp_path / f"node{rank}" / "work" for rank in (0, 1)]
    commands = [[sys.executable, "-m", "tuner.train.distributed", "--nnodes=2", f"--node_rank={rank}",
                 "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "tuner.cli",
                 "run", str(workspace(tmp_path, [f"{base}/rows.jsonl"])), "--allow-private-urls",
                 "--config", str(checkpointing_config(tmp_path, tiny_model_dir, fsdp="full_shard")),
                 "--work-dir", str(works[rank]), "--output", f"oci:{tmp_path / f'layout{rank}'}:v1"]
                for rank in (0, 1)]
    (code0, log0), (code1, log1) = run_together(commands, tmp_path)
    assert (code0, code1) == (0, 0), log0 + log1
    assert "fsdp: base model sharded over 2 processes" in log0
    expected = list(range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS))
    assert complete_steps(works[0]) == complete_steps(works[1]) == expected[-2:]  # save_total_limit 2
    for work in works:
        last = work / "checkpoints" / f"checkpoint-{MAX_STEPS}" / "adapter_model.safetensors"
        assert len(load_file(last)) == 2 * 7 * 2  # each node's copy holds the whole adapter
    assert (works[0] / ADAPTER).is_file() and not (works[1] / "adapter").exists()
