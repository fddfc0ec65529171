"""`tuner merge` and `--merged-image` at the command line: a merged folder on success, and for bad
input one `error:` line naming the field or file and the fix, exit 2, no traceback, nothing written."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tuner import cli


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_merge_writes_the_model_in_the_dtype_asked_for(lora_work_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    code, stdout, _ = run(["merge", str(lora_work_dir), str(out), "--dtype", "bf16"], capsys)
    assert code == 0
    assert stdout.splitlines()[-1] == f"merged: {out} (bfloat16)"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    code, stdout, _ = run(["merge", str(lora_work_dir / "adapter"), str(out), "--dtype", "bf16"], capsys)
    assert code == 0 and stdout.splitlines()[-1] == f"already merged: {out} (bfloat16)"


def _adapter_without_summary(lora_work_dir: Path, tmp_path: Path, base: str) -> Path:
    adapter = tmp_path / "adapter"
    shutil.copytree(lora_work_dir / "adapter", adapter, ignore=shutil.ignore_patterns("training_summary.json"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": base}))
    return adapter


@pytest.mark.parametrize("case", ["out-not-empty", "out-is-a-file", "no-adapter", "unfinished-adapter",
                                  "base-model-not-found", "base-model-not-a-model"])
def test_bad_input_is_one_error_line_and_exit_2(lora_work_dir, tmp_path, capsys, case):
    source, out, extra = lora_work_dir, tmp_path / "merged", []
    if case == "out-not-empty":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        expected = f"error: OUT: {out} is not empty (and holds no merge of this adapter in float32); name a new or empty folder"
    elif case == "out-is-a-file":
        out.write_text("mine")
        expected = f"error: OUT: {out} exists and is not a folder; name a new or empty folder"
    elif case == "no-adapter":
        source = tmp_path / "empty-work"
        source.mkdir()
        expected = f"error: {source} holds no adapter (adapter/ or adapter_config.json); pass the work directory"
    elif case == "unfinished-adapter":
        source = tmp_path / "work"
        (source / "adapter").mkdir(parents=True)
        shutil.copy(lora_work_dir / "adapter" / "adapter_config.json", source / "adapter")
        expected = (f"error: {source}: {source / 'adapter'} holds no finished adapter (adapter_config.json and "
                    "adapter_model.safetensors); pass the work directory of a finished `tuner run`")
    elif case == "base-model-not-found":
        source = _adapter_without_summary(lora_work_dir, tmp_path, "/gone/smollm2")
        expected = (f"error: {source / 'adapter_config.json'}: base_model_name_or_path '/gone/smollm2' is neither a "
                    "model folder here nor a model id; pass --base-model DIR")
    else:
        extra = ["--base-model", str(tmp_path)]
        expected = f"error: --base-model: {tmp_path} is not a model folder (no config.json)"
    before = sorted(tmp_path.rglob("*"))
    code, _, err = run(["merge", str(source), str(out), *extra], capsys)
    assert code == 2
    assert one_error_line(err).startswith(expected)
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, no scratch folder left


def test_an_unknown_dtype_is_refused_by_the_parser(lora_work_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["merge", str(lora_work_dir), str(tmp_path / "merged"), "--dtype", "int4"])
    assert exit_.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err


@pytest.mark.parametrize("reference, expected", [
    ("Registry.example.com/UPPER/case:1", "error: --merged-image: 'Registry.example.com/UPPER/case:1' is not a valid "
                                          "image reference"),
    ("oci:", "error: --merged-image: output reference 'oci:' has no directory"),
    ("OUTPUT", "error: --merged-image: 'oci:.* is also where the adapter image goes; give the merged model an image"),
])
def test_a_bad_merged_image_fails_the_run_before_any_work(lora_work_dir, tmp_path, capsys, reference, expected):
    root = lora_work_dir.parent
    output = f"oci:{tmp_path / 'layout'}:v1"
    work = tmp_path / "work"
    code, _, err = run(["run", str(root / "workspace.yaml"), "--config", str(root / "training_config.yaml"),
                        "--work-dir", str(work), "--output", output,
                        "--merged-image", output if reference == "OUTPUT" else reference], capsys)
    assert code == 2
    assert re.match(re.escape(expected).replace(r"\.\*", ".*"), one_error_line(err))
    assert not work.exists() and not (tmp_path / "layout").exists()


def test_validate_checks_the_merged_image(lora_work_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))  # no credentials at all
    root = lora_work_dir.parent
    code, stdout, _ = run(["validate", str(root / "workspace.yaml"), "--config", str(root / "training_config.yaml"),
                           "--merged-image", "registry.example.com/models/merged:1"], capsys)
    assert code == 0 and stdout.splitlines()[-1].startswith("ok: ")
    assert "warning: no credentials for registry.example.com" in stdout  # the merged push's credentials, read
