"""`tuner check-data`: the report for every real dataset, without training."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import SHARED, SHARED_DATASETS
from tuner import cli

DATA = SHARED / "data"


@pytest.mark.parametrize("name", list(SHARED_DATASETS))
def test_check_data_reports_format_first_then_rows_and_lengths(name, capsys, smollm2_dir):
    assert cli.main(["check-data", str(DATA / SHARED_DATASETS[name]), "--max-length", "256"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"format: {name} (")
    assert any(line.startswith("rows: ") and " kept, " in line for line in lines)
    assert any(line.startswith("tokens: ") and "p50" in line and "p95" in line and "max" in line for line in lines)
    assert any(line.startswith("length: ") and "max_length 256" in line for line in lines)


def test_check_data_with_the_phi3_tokenizer_folder(capsys, shared_dir):
    tokenizer = shared_dir / "tokenizers" / "phi-3-mini-4k-instruct"
    code = cli.main(["check-data", str(DATA / SHARED_DATASETS["dolly"]), "--tokenizer", str(tokenizer), "--max-length", "64"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("format: dolly (instruction, context, response), 1,500 rows")


def test_check_data_on_a_folder_uses_every_file(tmp_path, capsys, smollm2_dir):
    (tmp_path / "nested").mkdir()
    (tmp_path / "a.jsonl").write_text('{"prompt": "p", "completion": "c"}\n')
    (tmp_path / "nested" / "b.jsonl").write_text('{"prompt": "q", "completion": "d"}\n{"prompt": "r", "completion": ""}\n')
    assert cli.main(["check-data", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["format: prompt-completion (prompt, completion), 1 row (a.jsonl)",
                         "format: prompt-completion (prompt, completion), 2 rows (b.jsonl)"]
    assert "dropped: 1 empty content (e.g. b.jsonl row 2)" in lines


def test_check_data_unknown_columns_is_one_error_line(tmp_path, capsys, smollm2_dir):
    (tmp_path / "x.jsonl").write_text('{"question": "p", "answer": "c"}\n')
    assert cli.main(["check-data", str(tmp_path / "x.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "question, answer" in err[0]


def check_data_error(capsys, *argv: str) -> tuple[list[str], str]:
    """(the report lines on stdout, the one error line on stderr) of a check-data that exits 2."""
    assert cli.main(["check-data", *argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), captured.err
    return captured.out.splitlines(), err[0]


def test_check_data_refuses_a_file_with_no_rows(tmp_path, capsys, smollm2_dir):
    (tmp_path / "empty.jsonl").write_text("")
    _, error = check_data_error(capsys, str(tmp_path / "empty.jsonl"))
    assert error.startswith(f"error: {tmp_path / 'empty.jsonl'}: the file holds no rows")


def test_check_data_refuses_a_parquet_file_of_zero_rows_after_its_report(tmp_path, capsys, smollm2_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    turn = pa.struct([("role", pa.string()), ("content", pa.string())])
    pq.write_table(pa.table({"messages": pa.array([], type=pa.list_(turn))}), tmp_path / "zero.parquet")
    report, error = check_data_error(capsys, str(tmp_path / "zero.parquet"))
    assert report[0] == "format: messages (messages), 0 rows (zero.parquet)"
    assert error == "error: no training rows: zero.parquet holds no rows; give files with at least one row"


def all_dropped(tmp_path: Path) -> Path:
    path = tmp_path / "data" / "chats.jsonl"
    path.parent.mkdir()
    rows = ['{"messages": [{"role": "user", "content": "hi"}]}',
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "boo"}]}',
            '{"messages": [{"role": "user", "content": "again"}]}']
    path.write_text("\n".join(rows) + "\n")
    return path


def test_check_data_and_run_refuse_rows_that_are_all_dropped_with_the_same_line(tmp_path, capsys, tiny_model_dir):
    import yaml

    data = all_dropped(tmp_path)
    report, error = check_data_error(capsys, str(data), "--tokenizer", str(tiny_model_dir))
    assert "rows: 3 read, 0 kept, 3 dropped; 0 train / 0 eval" in report
    assert error == ("error: no training rows are left: all 3 rows of chats.jsonl were dropped: 2 no assistant turn "
                     "(e.g. chats.jsonl row 1), 1 unknown role (e.g. chats.jsonl row 2); fix those rows or the "
                     "dataset's format and roles (the report above names them)")
    workspace = tmp_path / "ws.yaml"
    workspace.write_text(yaml.safe_dump({
        "apiVersion": "kaito.sh/v1beta1", "kind": "Workspace", "metadata": {"name": "dropped"},
        "tuning": {"preset": {"name": "smollm2-135m-instruct"}, "method": "lora",
                   "input": {"volumeSource": {"hostPath": {"path": "data"}}},
                   "output": {"volumeSource": {"hostPath": {"path": "out"}}}}}))
    config = tmp_path / "training_config.yaml"
    config.write_text(yaml.safe_dump({"training_config": {
        "ModelConfig": {"pretrained_model_name_or_path": str(tiny_model_dir)}}}))
    code = cli.main(["run", str(workspace), "--config", str(config), "--work-dir", str(tmp_path / "work")])
    assert code == 2
    assert capsys.readouterr().err.strip() == error


def test_stanford_alpaca_with_its_text_column_is_read_as_alpaca(tmp_path, capsys, smollm2_dir):
    """The original alpaca release carries instruction, input, output and a pre-rendered text."""
    import json

    rows = json.loads((DATA / SHARED_DATASETS["alpaca"]).read_text())
    for row in rows:
        row["text"] = ("Below is an instruction that describes a task. Write a response that appropriately "
                       f"completes the request.\n\n### Instruction:\n{row['instruction']}\n\n### Input:\n"
                       f"{row['input']}\n\n### Response:\n{row['output']}")
    (tmp_path / "alpaca_data.json").write_text(json.dumps(rows))
    assert cli.main(["check-data", str(tmp_path / "alpaca_data.json"), "--max-length", "256"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"format: alpaca (instruction, input, output), {len(rows):,} rows (alpaca_data.json); "
                        "column text ignored")
    tokens = next(re.match(r"tokens: ([\d,]+) \(([\d,]+) with loss\)", line) for line in lines
                  if line.startswith("tokens: "))
    total, with_loss = (int(group.replace(",", "")) for group in tokens.groups())
    assert 0 < with_loss < total  # the loss is on the answers only, as alpaca wants, not on every token of text


def test_check_data_refuses_a_max_length_no_row_can_use(tmp_path, capsys, smollm2_dir):
    (tmp_path / "a.jsonl").write_text('{"prompt": "p", "completion": "c"}\n')
    _, error = check_data_error(capsys, str(tmp_path / "a.jsonl"), "--max-length", "-1")
    assert error == "error: --max-length: -1 is out of range: it must be >= 16 and <= 1,048,576; change it, " \
                    "or remove the key for tuner's default"


def test_scratch_folders_of_killed_runs_are_swept_and_sigterm_cleans_up(tmp_path, tiny_model_dir):
    """A SIGKILLed check-data leaves its folder behind: the next run deletes it; SIGTERM leaves none."""
    import os
    import signal
    import subprocess
    import sys
    import time

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "HF_HUB_OFFLINE": "1"}
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "p", "completion": "c"}\n' * 200_000)  # long enough to be stopped mid-way
    for sig in (signal.SIGKILL, signal.SIGTERM):
        proc = subprocess.Popen([sys.executable, "-m", "tuner.cli", "check-data", str(rows), "--tokenizer",
                                 str(tiny_model_dir)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not list(scratch.glob(f"tuner-check-{proc.pid}-*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(scratch.glob(f"tuner-check-{proc.pid}-*")), "the run never made its scratch folder"
        proc.send_signal(sig)
        proc.wait(timeout=60)
        left = list(scratch.glob("tuner-check-*"))
        if sig == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL and left  # nothing could clean up
        else:
            assert proc.returncode == 143 and left == [], proc.stderr.read()  # the killed run's folder swept too
