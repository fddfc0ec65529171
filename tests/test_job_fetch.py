"""`tuner fetch` (the Job's init container) then `tuner run --skip-fetch` trains on what it fetched."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from job_support import ROWS, configmap, sha256_of, workspace
from tuner import cli


@pytest.fixture()
def served(http_server) -> tuple[Path, list[str]]:
    """Two dataset files on the loopback server: (their folder, their URLs)."""
    root, base = http_server
    for name, rows in (("part1.jsonl", ROWS[:3]), ("part2.jsonl", ROWS[3:])):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, [f"{base}/part1.jsonl", f"{base}/part2.jsonl"]


def run_args(tmp_path: Path, model_dir: Path, urls: list[str]) -> list[str]:
    return ["run", str(workspace(tmp_path, urls)), "--config", str(configmap(tmp_path, model_dir)),
            "--work-dir", str(tmp_path / "work"), "--output", f"oci:{tmp_path / 'layout'}:v1",
            "--allow-private-urls", "--skip-fetch"]


def test_run_skip_fetch_trains_on_the_fetched_files(tmp_path, tiny_model_dir, served, capsys):
    root, urls = served
    work = tmp_path / "work"
    assert cli.main(["fetch", str(workspace(tmp_path, urls)), "--work-dir", str(work), "--allow-private-urls"]) == 0
    marker = json.loads((work / "inputs" / ".fetched.json").read_text())
    digests = [sha256_of(root / "part1.jsonl"), sha256_of(root / "part2.jsonl")]
    assert [f["sha256"] for f in marker["files"]] == digests
    for served_file in root.iterdir():  # a download now would fail: the run must use the fetched copies
        served_file.unlink()

    assert cli.main(run_args(tmp_path, tiny_model_dir, urls)) == 0
    summary = json.loads((work / "adapter" / "training_summary.json").read_text())
    assert [d["sha256"] for d in summary["datasets"]] == digests
    assert summary["data"]["rows_kept"] == len(ROWS) and summary["world_size"] == 1
    assert "fetch: 2 input files fetched earlier" in capsys.readouterr().out


def test_skip_fetch_without_a_fetch_is_one_error_line(tmp_path, tiny_model_dir, served, capsys):
    assert cli.main(run_args(tmp_path, tiny_model_dir, served[1])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --skip-fetch: the inputs were not fetched"), err
    assert "tuner fetch" in err[0]


def test_skip_fetch_refuses_inputs_fetched_for_another_workspace_input(tmp_path, tiny_model_dir, served, capsys):
    urls = served[1]
    assert cli.main(["fetch", str(workspace(tmp_path, urls[:1])), "--work-dir", str(tmp_path / "work"),
                     "--allow-private-urls"]) == 0
    assert cli.main(run_args(tmp_path, tiny_model_dir, urls)) == 2
    assert "lists the inputs of a different tuning.input" in capsys.readouterr().err


def test_fetch_lists_a_volume_input_without_copying_it(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    path = workspace(tmp_path, [])
    doc = yaml.safe_load(path.read_text())
    doc["tuning"]["input"] = {"volumeSource": {"hostPath": {"path": "data"}}}
    path.write_text(yaml.safe_dump(doc))
    assert cli.main(["fetch", str(path), "--work-dir", str(tmp_path / "work")]) == 0
    inputs = tmp_path / "work" / "inputs"
    marker = json.loads((inputs / ".fetched.json").read_text())
    assert [Path(f["path"]) for f in marker["files"]] == [tmp_path / "data" / "rows.jsonl"]
    assert [p.name for p in inputs.iterdir()] == [".fetched.json"]


def test_fetch_in_json_form_prints_only_events(tmp_path, served, capsys):
    urls = served[1]
    assert cli.main(["fetch", str(workspace(tmp_path, urls)), "--work-dir", str(tmp_path / "work"),
                     "--allow-private-urls", "--log-format", "json"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["type"] for e in printed] == ["message"] * 3
    assert printed[-1]["message"].startswith("fetched 2 input files (")
    assert all("part" in e["message"] for e in printed[:2])


def test_fetch_checks_the_push_secret_before_any_download(tmp_path, served, monkeypatch, capsys):
    docker = tmp_path / "push-secret"
    docker.mkdir()
    (docker / "config.json").write_text('{"auths": {"registry.example.com": "not an object"}}')
    monkeypatch.setenv("DOCKER_CONFIG", str(docker))  # where the Job mounts the push secret for fetch too
    work = tmp_path / "work"
    code = cli.main(["fetch", str(workspace(tmp_path, served[1])), "--work-dir", str(work), "--allow-private-urls"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0] == (f"error: registry config {docker / 'config.json'}: the entry for registry.example.com "
                      "is not an object")
    assert not (work / "inputs").exists()  # nothing was downloaded


def pod_command(container: dict, mounts: dict[str, Path], replace: dict[str, str]) -> list[str]:
    """A container's command as the kubelet would run it: in its own mount namespace, where only the
    volumes the rendered Job mounts under /mnt exist (the rest of the paths are the test's folders)."""
    script = ["set -e", "mount -t tmpfs tmpfs /mnt"]
    for mount in container["volumeMounts"]:
        source = mounts.get(mount["name"])
        if source is None or not mount["mountPath"].startswith("/mnt/"):
            continue
        script += [f"mkdir -p {mount['mountPath']}", f"mount --bind {source} {mount['mountPath']}"]
        if mount.get("readOnly"):
            script.append(f"mount -o remount,bind,ro {mount['mountPath']}")
    args = [replace.get(arg, arg) for arg in container["args"]]
    for old, new in replace.items():
        args = [arg.replace(old, new) for arg in args]
    script.append("exec " + " ".join(shlex.quote(a) for a in [sys.executable, "-m", "tuner.cli", *args]))
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(script)]


@pytest.mark.slow
def test_a_volume_input_job_fetches_then_trains_with_the_volume_only_where_the_job_mounts_it(tmp_path,
                                                                                            tiny_model_dir):
    from tuner.kube.render import RenderOptions, render
    from tuner.spec.plan import plan_job

    data = tmp_path / "datasets"
    data.mkdir()
    (data / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    spec = tmp_path / "workspace.yaml"
    spec.write_text(yaml.safe_dump({
        "apiVersion": "kaito.sh/v1beta1", "kind": "Workspace", "metadata": {"name": "volume-job"},
        "resource": {"instanceType": "Standard_NC24ads_A100_v4"},
        "tuning": {"preset": {"name": "smollm2-135m-instruct"}, "method": "lora",
                   "input": {"volumeSource": {"persistentVolumeClaim": {"claimName": "datasets"}}},
                   "output": {"volumeSource": {"persistentVolumeClaim": {"claimName": "adapters"}}}}}))
    config = tmp_path / "training_config.yaml"
    config.write_text(yaml.safe_dump({"training_config": {
        "ModelConfig": {"pretrained_model_name_or_path": str(tiny_model_dir)},
        "TrainingArguments": {"max_steps": 1, "max_length": 64}}}))
    manifests = {m["kind"]: m for m in render(plan_job(spec, config_path=config, for_cluster=True),
                                              RenderOptions()).manifests}
    etc = tmp_path / "etc-tuner"  # the ConfigMap as the pod sees it
    etc.mkdir()
    for name, text in manifests["ConfigMap"]["data"].items():
        (etc / name).write_text(text)
    pod = manifests["Job"]["spec"]["template"]["spec"]
    output = tmp_path / "adapters"
    output.mkdir()
    mounts = {"input": data, "output": output}
    replace = {"/etc/tuner": str(etc), "/workspace/work": str(tmp_path / "work")}
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for container in (pod["initContainers"][0], pod["containers"][0]):
        done = subprocess.run(pod_command(container, mounts, replace), capture_output=True, text=True, env=env,
                              timeout=600)
        assert done.returncode == 0, f"{container['name']}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
    assert (output / "adapter_model.safetensors").is_file() and (output / "adapter_config.json").is_file()
    assert not Path("/mnt/input").exists()  # the volume existed only inside the containers' namespaces
