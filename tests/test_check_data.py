"""`tuner check-data`: the report for every real dataset, without training."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import SHARED_DATASETS
from tuner import cli

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


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
