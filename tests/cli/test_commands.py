"""The command line: bad input is one `error:` line and exit 2; internal faults exit 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tuner import cli

GOOD_TUNING = {
    "preset": {"name": "smollm2-135m-instruct"},
    "method": "lora",
    "input": {"volumeSource": {"hostPath": {"path": "data"}}},
    "output": {"volumeSource": {"hostPath": {"path": "out"}}},
}


def write_workspace(tmp_path: Path, **tuning_changes) -> Path:
    tuning = {**GOOD_TUNING, **tuning_changes}
    doc = {"apiVersion": "kaito.sh/v1beta1", "kind": "Workspace", "metadata": {"name": "ws"}, "tuning": tuning}
    path = tmp_path / "ws.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err


def assert_one_error_line(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_missing_workspace_file(tmp_path, capsys):
    code, err = run_cli(capsys, "validate", str(tmp_path / "missing.yaml"))
    assert code == 2
    assert_one_error_line(err, "missing.yaml", "does not exist")


def test_unknown_preset(tmp_path, capsys):
    code, err = run_cli(capsys, "validate", str(write_workspace(tmp_path, preset={"name": "gpt-9"})))
    assert code == 2
    assert_one_error_line(err, "tuning.preset.name", "gpt-9", "smollm2-135m-instruct")


def test_wrong_method(tmp_path, capsys):
    code, err = run_cli(capsys, "validate", str(write_workspace(tmp_path, method="full")))
    assert code == 2
    assert_one_error_line(err, "tuning.method", "'full'")


def test_unknown_config_key(tmp_path, capsys):
    config = tmp_path / "cm.yaml"
    config.write_text(yaml.safe_dump({"training_config": {"LoraConfig": {"alpha": 16}}}))
    code, err = run_cli(capsys, "validate", str(write_workspace(tmp_path)), "--config", str(config))
    assert code == 2
    assert_one_error_line(err, "training_config.LoraConfig.alpha", "unknown key")


def test_unreadable_yaml(tmp_path, capsys):
    path = tmp_path / "ws.yaml"
    path.write_text("kind: Workspace\n  metadata: : x\n")
    code, err = run_cli(capsys, "validate", str(path))
    assert code == 2
    assert_one_error_line(err, "ws.yaml", "not valid YAML", "line 2")


def test_config_named_in_spec_must_be_passed(tmp_path, capsys):
    code, err = run_cli(capsys, "validate", str(write_workspace(tmp_path, config="my-params")))
    assert code == 2
    assert_one_error_line(err, "my-params", "--config")


def test_valid_workspace_validates(tmp_path, capsys):
    assert cli.main(["validate", str(write_workspace(tmp_path))]) == 0
    assert "ok: ws: lora on smollm2-135m-instruct" in capsys.readouterr().out


def test_validate_tells_once_which_registry_a_familiar_image_name_means(tmp_path, capsys):
    path = write_workspace(tmp_path, input={"image": "data-image:latest"})
    assert cli.main(["validate", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("note: tuning.input.image: data-image:latest normalised to "
                      "docker.io/library/data-image:latest, as Kaito reads it")
    assert len(out) == 2 and out[1].startswith("ok: ws:")


def test_validate_refuses_an_input_image_kaito_cannot_parse(tmp_path, capsys):
    code, err = run_cli(capsys, "validate", str(write_workspace(tmp_path, input={"image": "Data/Images:v1"})))
    assert code == 2
    assert_one_error_line(err, "tuning.input.image: unable to parse input image reference 'Data/Images:v1'",
                          "must be lowercase")


def test_internal_fault_exits_1_with_one_line(tmp_path, capsys, monkeypatch):
    import tuner.spec.plan

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(tuner.spec.plan, "plan_job", broken)
    code, err = run_cli(capsys, "validate", str(write_workspace(tmp_path)))
    assert code == 1
    assert_one_error_line(err, "internal fault", "RuntimeError", "disk on fire", "--debug")


def test_debug_shows_the_traceback(tmp_path, capsys):
    code, err = run_cli(capsys, "--debug", "validate", str(write_workspace(tmp_path, method="full")))
    assert code == 2
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


def test_real_process_prints_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tuner.cli", "run", str(write_workspace(tmp_path, method="x"))],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]


def test_validate_names_five_config_mistakes_at_once_without_any_work(tmp_path, capsys):
    config = tmp_path / "training_config.yaml"
    config.write_text(yaml.safe_dump({"training_config": {
        "LoraConfig": {"r": 0}, "TrainingArguments": {"learning_rate": -1},
        "DatasetConfig": {"bad_rows": "nonsense", "long_rows": 3, "format": "parquet"}}}))
    code = cli.main(["validate", str(write_workspace(tmp_path, input={"urls": ["https://example.invalid/a.jsonl"]})),
                     "--config", str(config)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 5 and all(line.startswith("error: training_config.") for line in lines)
    assert sorted(line.split(":")[1].strip() for line in lines) == [
        "training_config.DatasetConfig.bad_rows", "training_config.DatasetConfig.format",
        "training_config.DatasetConfig.long_rows", "training_config.LoraConfig.r",
        "training_config.TrainingArguments.learning_rate"]


def test_validate_warns_once_per_kaito_key_tuner_does_not_apply(tmp_path, capsys):
    config = tmp_path / "training_config.yaml"
    config.write_text(yaml.safe_dump({"training_config": {"ModelConfig": {"device_map": "auto"}}}))
    assert cli.main(["validate", str(write_workspace(tmp_path)), "--config", str(config)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if line.startswith("warning: ")] == [
        "warning: training_config.ModelConfig.device_map is accepted but not applied: each process places the "
        "model on its own device (one GPU per process; DDP/torchrun)"]
