"""The bad-input corpus (tests/bad_inputs/*.yaml): every case ends with exactly one `error: ...`
line that names the field, file or row and says how to fix it, exit code 2, no traceback, and
nothing in the work directory is deleted.

A case file holds `expect` (text the error line must contain) and what to vary from a good job:
`patch` (top-level Workspace keys), `tuning` (tuning keys), `workspace_text` (a raw Workspace),
`config` (training_config sections) or `config_text` (a raw config file), `files` (served over
HTTP at `{base}/NAME`: text, `{latin1: text}`, `{truncated_parquet: true}` or `{parquet_rows: N}`), `allow_private`
(default true, for the loopback server), `no_config` (run without `--config`) and `run_only` (a problem
only the run itself can find: a local folder, a download; render is not expected to refuse it).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tuner import cli

CASES = sorted((Path(__file__).parent / "bad_inputs").glob("*.yaml"))
GOOD_ROW = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


def test_the_corpus_has_at_least_forty_cases():
    assert len(CASES) >= 40


def _file_bytes(spec: str | dict) -> bytes:
    if isinstance(spec, str):
        return spec.encode()
    if "latin1" in spec:
        return spec["latin1"].encode("latin-1")
    buffer = io.BytesIO()
    pq.write_table(pa.table({"messages": pa.array([json.dumps(GOOD_ROW)] * spec.get("parquet_rows", 50),
                                                  type=pa.string())}), buffer)
    return buffer.getvalue() if "parquet_rows" in spec else buffer.getvalue()[: len(buffer.getvalue()) // 2]


def _fill(value, base: str):
    """Replace `{base}` in every string of a YAML value."""
    if isinstance(value, str):
        return value.replace("{base}", base)
    if isinstance(value, list):
        return [_fill(v, base) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, base) for k, v in value.items()}
    return value


def _write_case(case: dict, tmp_path: Path, base: str, served: Path, model_dir: Path) -> list[str]:
    """Write the case's Workspace, config and data; return the `tuner run` arguments."""
    (served / "data.jsonl").write_text(json.dumps(GOOD_ROW) + "\n")
    for name, spec in case.get("files", {}).items():
        (served / name).write_bytes(_file_bytes(spec))
    workspace = tmp_path / "workspace.yaml"
    if "workspace_text" in case:
        workspace.write_text(case["workspace_text"])
    else:
        doc = {"apiVersion": "kaito.sh/v1alpha1", "kind": "Workspace", "metadata": {"name": "bad"},
               "resource": {"instanceType": "Standard_NC6s_v3"},
               "tuning": {"preset": {"name": "smollm2-135m-instruct"}, "method": "lora",
                          "input": {"urls": [f"{base}/data.jsonl"]},
                          "output": {"volumeSource": {"hostPath": {"path": "out"}}}}}
        doc |= _fill(case.get("patch", {}), base)
        if "tuning" in doc:
            doc["tuning"] |= _fill(case.get("tuning", {}), base)
        workspace.write_text(yaml.safe_dump(doc))
    config = tmp_path / "config.yaml"
    if "config_text" in case:
        config.write_text(case["config_text"])
    else:
        sections = {"ModelConfig": {"pretrained_model_name_or_path": str(model_dir)},
                    "TrainingArguments": {"max_steps": 1, "max_length": 64}}
        for name, values in case.get("config", {}).items():
            sections[name] = values if not isinstance(values, dict) else sections.get(name, {}) | values
        config.write_text(yaml.safe_dump({"training_config": sections}))
    argv = ["run", str(workspace), "--work-dir", str(tmp_path / "work")]
    if not case.get("no_config"):
        argv += ["--config", str(config)]
    if case.get("allow_private", True):
        argv.append("--allow-private-urls")
    return argv


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_bad_input_fails_with_one_clear_line(path, tmp_path, http_server, tiny_model_dir, capsys):
    case = yaml.safe_load(path.read_text())
    served, base = http_server
    argv = _write_case(case, tmp_path, base, served, tiny_model_dir)
    keep = tmp_path / "work" / "finished-before.txt"
    keep.parent.mkdir()
    keep.write_text("finished work")

    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert case["expect"] in lines[0]
    assert "; " in lines[0]  # the problem, then how to fix it
    assert keep.read_text() == "finished work"


MEMORY_LIMIT = 3 << 30  # address space of the child: tuner's imports need ~1.5 GiB, an alias bomb many more
HOSTILE_WORKSPACES = {
    "name-of-100-MB": lambda: ("apiVersion: kaito.sh/v1beta1\nkind: Workspace\nmetadata:\n  name: "
                               + "a" * 100_000_000 + "\n"),
    "alias-bomb": lambda: yaml.safe_load((Path(__file__).parent / "bad_inputs" /
                                          "84-workspace-alias-bomb.yaml").read_text())["workspace_text"],
    "nested-10000-lists": lambda: "[" * 10_000 + "]" * 10_000,
}


@pytest.mark.parametrize("command", ["validate", "render"])
@pytest.mark.parametrize("name", list(HOSTILE_WORKSPACES))
def test_hostile_yaml_ends_in_one_line_in_bounded_time_and_memory(name, command, tmp_path):
    import resource
    import subprocess
    import sys

    workspace = tmp_path / "workspace.yaml"
    workspace.write_text(HOSTILE_WORKSPACES[name]())
    before = sorted(tmp_path.iterdir())

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    done = subprocess.run([sys.executable, "-m", "tuner.cli", command, str(workspace)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, preexec_fn=limit_memory)
    lines = done.stderr.splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
    assert len(lines[0]) < 400  # a 100 MB value is never echoed
    assert sorted(tmp_path.iterdir()) == before  # nothing written


WORKSPACE_CASES = [p for p in CASES if not ({"files", "config", "config_text", "no_config", "run_only"}
                                             & set(yaml.safe_load(p.read_text())))]


@pytest.mark.parametrize("path", WORKSPACE_CASES, ids=[p.stem for p in WORKSPACE_CASES])
def test_render_refuses_every_bad_workspace_as_validate_does(path, tmp_path, tiny_model_dir, capsys):
    """What the API server would refuse never reaches a manifest: `tuner render` ends in the same one line."""
    case = yaml.safe_load(path.read_text())
    served = tmp_path / "served"
    served.mkdir()
    argv = _write_case(case, tmp_path, "https://datasets.example.com", served, tiny_model_dir)
    code = cli.main(["render", argv[1]])
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2 and len(lines) == 1 and case["expect"] in lines[0], captured.err
    assert captured.out == ""
