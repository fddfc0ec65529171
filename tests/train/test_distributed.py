"""`tuner run` under torchrun: real DDP (gloo) runs on this CPU, 2 processes on one node and 2 "nodes"
on loopback (each with its own work dir, like separate pods), and a failure on one node stopping both."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from job_support import ROWS, configmap, unpack_layout, workspace
from registry_support import free_port
from tuner.spec.presets import get_preset
from tuner.spec.training_config import build_config, load_config_file

TIMEOUT = 300  # seconds for a whole launch
STEPS = 6  # test_run's configmap: max_steps 6, logging_steps 2
LOGGED_STEPS = (1, 2, 4, 6)
ADAPTER = Path("adapter") / "adapter_model.safetensors"

pytestmark = pytest.mark.slow


@pytest.fixture()
def job(tmp_path, tiny_model_dir, http_server) -> list[str]:
    """The `run` arguments (workspace, config) of a job training on rows served over loopback."""
    root, base = http_server
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return ["run", str(workspace(tmp_path, [f"{base}/rows.jsonl"])),
            "--config", str(configmap(tmp_path, tiny_model_dir)), "--allow-private-urls"]


@pytest.fixture()
def lora_shapes(tmp_path, tiny_model_dir) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the adapter tensors peft saves for the job's LoraConfig on the tiny model."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    config = build_config("lora", load_config_file(configmap(tmp_path, tiny_model_dir)))
    lora = LoraConfig(**config.lora.values() | {"target_modules": list(get_preset("smollm2-135m-instruct").lora_target_modules)})
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora)
    return {name: tuple(tensor.shape) for name, tensor in get_peft_model_state_dict(model).items()}


def torchrun(launch: list[str], job: list[str], work: Path, output: Path,
             launcher: str = "torch.distributed.run") -> list[str]:
    return [sys.executable, "-m", launcher, *launch, "-m", "tuner.cli", *job,
            "--work-dir", str(work), "--output", f"oci:{output}:v1"]


def run_together(commands: list[list[str]], cwd: Path) -> list[tuple[int, str]]:
    """Start the commands at once and wait for all: (exit code, output) each. Stragglers are stopped."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 cores: one thread per process
    logs = [cwd / f"launch-{i}.log" for i in range(len(commands))]
    procs: list[subprocess.Popen] = []
    try:
        for command, log in zip(commands, logs, strict=True):
            with log.open("w") as out:
                procs.append(subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        deadline = time.monotonic() + TIMEOUT
        codes = [proc.wait(timeout=max(deadline - time.monotonic(), 1)) for proc in procs]
    finally:
        _stop(procs)
    return list(zip(codes, (log.read_text() for log in logs), strict=True))


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM a torchrun (it stops its workers, which run in sessions of their own), then SIGKILL."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def adapter_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in load_file(path).items()}


def assert_trained_once(work: Path, log: str, lora_shapes: dict[str, tuple[int, ...]]) -> None:
    """Rank 0's adapter is peft's, its summary says 2 processes, and each progress step was logged once."""
    assert adapter_shapes(work / ADAPTER) == lora_shapes
    summary = json.loads((work / "result.json").read_text())
    assert summary["world_size"] == 2 and summary["train"]["steps"] == STEPS
    assert summary["data"]["rows_kept"] == len(ROWS)
    for step in LOGGED_STEPS:
        assert log.count(f" step {step}/{STEPS} ") == 1, log
    assert log.count("stage prepare: done") == 1, log


def test_two_processes_on_one_node(tmp_path, job, lora_shapes):
    work, layout = tmp_path / "work", tmp_path / "layout"
    [(code, log)] = run_together([torchrun(["--standalone", "--nproc_per_node=2"], job, work, layout)], tmp_path)
    assert code == 0, log
    assert_trained_once(work, log, lora_shapes)
    assert "| cpu (2 cores) x 2 processes |" in log and "accumulation x 2 processes)" in log
    files = unpack_layout(layout, tmp_path / "unpacked")
    assert "adapter_model.safetensors" in {p.name for p in files}


def test_time_based_checkpoints_under_ddp_hold_every_ranks_state(tmp_path, job, lora_shapes, monkeypatch):
    monkeypatch.setenv("TUNER_CHECKPOINT_MINUTES", "0.0001")  # due at every step
    work, layout = tmp_path / "work", tmp_path / "layout"
    [(code, log)] = run_together([torchrun(["--standalone", "--nproc_per_node=2"], job, work, layout)], tmp_path)
    assert code == 0, log
    saved = sorted(int(p.name.split("-")[1]) for p in (work / "checkpoints").glob("checkpoint-*"))
    assert saved == [STEPS - 1, STEPS]  # saved at every step, the last 2 kept
    assert {p.name for p in (work / "checkpoints" / f"checkpoint-{STEPS}").glob("rng_state_*.pth")} == {
        "rng_state_0.pth", "rng_state_1.pth"}
    assert f"checkpoints: {STEPS} saved" in log


def test_two_nodes_each_with_its_own_work_dir(tmp_path, job, lora_shapes):
    port = free_port()
    nodes = [(tmp_path / f"node{rank}" / "work", tmp_path / f"node{rank}" / "layout") for rank in (0, 1)]
    commands = [torchrun(["--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                          f"--master_port={port}"], job, work, layout)
                for rank, (work, layout) in enumerate(nodes)]
    (code0, log0), (code1, log1) = run_together(commands, tmp_path)
    assert (code0, code1) == (0, 0), log0 + log1
    assert_trained_once(nodes[0][0], log0 + log1, lora_shapes)
    (work1, layout1) = nodes[1]
    assert (work1 / "prepared" / "examples.arrow").is_file()  # node 1 fetched and prepared its own copy
    assert not (work1 / "adapter").exists() and not (work1 / "result.json").exists() and not layout1.exists()
    assert " step " not in log1 and "rank 1 of 2 (node 1)" in log1



def test_a_user_error_before_training_stops_every_node_with_exit_code_2(tmp_path, job):
    """Node 0's data fails while node 1 waits for it: node 1 stops too, naming the failure, and
    tuner's launcher (unlike torchrun, which exits 1) passes the user-error exit code on."""
    port = free_port()
    commands = [[*torchrun(["--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                            f"--master_port={port}"], job, tmp_path / f"node{rank}", tmp_path / f"layout{rank}",
                           launcher="tuner.train.distributed"),
                 *(["--skip-fetch"] if rank == 0 else [])]
                for rank in (0, 1)]
    (code0, log0), (code1, log1) = run_together(commands, tmp_path)
    assert (code0, code1) == (2, 2), log0 + log1
    assert "error: --skip-fetch: the inputs were not fetched" in log0
    assert "error: rank 0 failed before training: --skip-fetch: the inputs were not fetched" in log1


WORKER = """
import pathlib, signal, sys, time
folder = pathlib.Path(sys.argv[1])
def stop(signum, frame):
    time.sleep(3)  # finishing the step and saving a checkpoint
    (folder / "saved").write_text("yes")
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
(folder / "ready").write_text("yes")
time.sleep(120)
"""


@pytest.mark.parametrize(("shutdown_timeout", "saved"), [(None, True), ("1", False)], ids=["tuner-default", "1s"])
def test_sigterm_gives_workers_time_to_save_and_exits_retryable(tmp_path, shutdown_timeout, saved):
    """tuner's launcher waits for its workers after SIGTERM (torchrun's own wait is 30 s, too short for
    a big model's checkpoint) and exits 143; a 1 s wait, for contrast, kills the worker mid-save."""
    (tmp_path / "worker.py").write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k != "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"}
    if shutdown_timeout:
        env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = shutdown_timeout
    launcher = subprocess.Popen([sys.executable, "-m", "tuner.train.distributed", "--standalone", "--nproc_per_node=1",
                                 str(tmp_path / "worker.py"), str(tmp_path)], env=env, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "ready").exists():
            assert time.monotonic() < deadline and launcher.poll() is None, launcher.communicate()[0]
            time.sleep(0.1)
        launcher.send_signal(signal.SIGTERM)
        output, _ = launcher.communicate(timeout=60)
    finally:
        _stop([launcher])
    assert launcher.returncode == 143, output
    assert (tmp_path / "saved").exists() is saved
    assert "Traceback" not in output


def test_two_nodes_preempted_resume_from_the_latest_checkpoint_both_hold(tmp_path, tiny_model_dir, http_server,
                                                                         lora_shapes):
    """Each node checkpoints into its own work dir; SIGTERM on one node stops both at the same step with
    143; when one node's newest checkpoint is lost, both resume from the newest they share."""
    from test_checkpoints import MAX_STEPS, Run, complete_steps, resumed_from
    from test_checkpoints import config as checkpointing_config

    root, base = http_server
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    args = ["run", str(workspace(tmp_path, [f"{base}/rows.jsonl"])),
            "--config", str(checkpointing_config(tmp_path, tiny_model_dir)), "--allow-private-urls"]
    works = [tmp_path / f"node{rank}" / "work" for rank in (0, 1)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start_both() -> list[Run]:
        port = free_port()
        return [Run([*args, "--work-dir", str(works[rank]), "--output", f"oci:{tmp_path / f'layout{rank}'}:v1"],
                    tmp_path, [sys.executable, "-m", "tuner.train.distributed", "--nnodes=2", f"--node_rank={rank}",
                               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}"], env)
                for rank in (0, 1)]

    node0, node1 = start_both()
    try:
        node0.wait_for_step(7)
        node0.proc.send_signal(signal.SIGTERM)
        assert (node0.finish(), node1.finish()) == (143, 143), node0.log + node1.log
    finally:
        _stop([node0.proc, node1.proc])
    stopped = node0.last_step()
    assert complete_steps(works[0]) == complete_steps(works[1]) and complete_steps(works[1])[-1] == stopped
    shutil.rmtree(works[1] / "checkpoints" / f"checkpoint-{stopped}")  # node 1's newest is lost
    shared = complete_steps(works[1])[-1]

    node0, node1 = start_both()
    try:
        assert (node0.finish(), node1.finish()) == (0, 0), node0.log + node1.log
    finally:
        _stop([node0.proc, node1.proc])
    assert resumed_from(node0.log) == (shared, MAX_STEPS)
    assert f"resume: checkpoint-{shared} is the latest complete on every node" in node0.log
    assert f" step {shared + 1}/{MAX_STEPS} " in node0.log and f" step {shared}/{MAX_STEPS} " not in node0.log
    summary = json.loads((works[0] / "result.json").read_text())
    assert summary["train"]["steps"] == MAX_STEPS and summary["train"]["resumed_from_step"] == shared
    assert adapter_shapes(works[0] / ADAPTER) == lora_shapes


def _decide_on_one_rank(rank: int, init_file: str, decisions) -> None:
    """One gloo rank: rank 0's last save is old (a save is due), rank 1 just got SIGTERM."""
    import torch
    import torch.distributed as dist
    from transformers import TrainerControl, TrainerState

    from tuner.train.checkpoints import CheckpointCallback, StopFlag

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        stop = StopFlag()
        stop.set = rank == 1
        callback = CheckpointCallback(Path(init_file).parent, minutes=10, stop=stop)
        callback.last_save = time.monotonic() - (11 * 60 if rank == 0 else 0)
        args = type("Args", (), {"device": torch.device("cpu")})()
        control = callback.on_step_end(args, TrainerState(global_step=7), TrainerControl())
        decisions[rank] = (control.should_save, control.should_training_stop)
    finally:
        dist.destroy_process_group()


def test_every_rank_takes_the_save_and_stop_decisions_of_any_rank(tmp_path):
    """Each rank has its own clock and its own SIGTERM: a save that is due on one rank, or a stop
    asked of one, happens on all at the same step (or one would wait in the save while the other
    trains on)."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        decisions = manager.dict()
        mp.spawn(_decide_on_one_rank, args=(str(tmp_path / "rendezvous"), decisions), nprocs=2)
        assert dict(decisions) == {0: (True, True), 1: (True, True)}
