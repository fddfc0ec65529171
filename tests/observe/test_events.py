"""Log events: the text and JSON forms, the event record, the terminal progress bar, the
termination message."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import select
import struct
import termios

import pytest

from tuner.errors import UserError
from tuner.observe import events, termination

KEYS = {"type", "time", "level", "message"}


def test_text_form_is_one_stamped_line_per_event():
    out = io.StringIO()
    events.emit("stage", "stage fetch: started", data={"name": "fetch"}, stream=out)
    line = out.getvalue()
    assert line.endswith(" stage fetch: started\n") and line.count("\n") == 1
    assert line[2] == ":" and line[5] == ":"  # HH:MM:SS first


def test_json_form_is_one_object_per_line_with_the_schema_keys(capsys):
    events.configure("json")
    events.emit("train.step", "step 3/10 (30%)", step=3, metrics={"loss": 1.5}, data={"total_steps": 10})
    events.info("plain line")
    first, second = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert set(first) == KEYS | {"step", "metrics", "data"}
    assert (first["type"], first["step"], first["metrics"], first["data"]) == ("train.step", 3, {"loss": 1.5},
                                                                                {"total_steps": 10})
    assert first["time"].endswith("Z") and first["time"][10] == "T"
    assert second == {"type": "message", "time": second["time"], "level": "info", "message": "plain line"}


def test_json_has_no_nan_a_non_finite_metric_is_null(capsys):
    events.configure("json")
    events.emit("train.step", "step 1/1", step=1, metrics={"loss": float("nan"), "grad_norm": float("inf")})
    assert json.loads(capsys.readouterr().out)["metrics"] == {"loss": None, "grad_norm": None}


def test_a_warning_has_the_warning_level(capsys):
    events.configure("json")
    events.warn("careful")
    event = json.loads(capsys.readouterr().out)
    assert (event["level"], event["message"]) == ("warning", "warning: careful")


def test_the_environment_chooses_json_and_the_flag_wins(monkeypatch, capsys):
    monkeypatch.setenv(events.FORMAT_ENV, "json")
    events.configure(None)
    assert events.json_format()
    events.configure("text")
    assert not events.json_format()


def test_an_unknown_format_names_the_variable_and_the_choices(monkeypatch):
    monkeypatch.setenv(events.FORMAT_ENV, "yaml")
    with pytest.raises(UserError, match=r"TUNER_LOG_FORMAT: 'yaml' is not a log format; use one of text, json"):
        events.configure(None)


def test_every_event_is_recorded_as_json_whatever_the_form(tmp_path, capsys):
    record = tmp_path / "work" / "events.jsonl"
    events.record_to(record)
    events.info("one")
    events.emit("eval", "eval: base", step=0, metrics={"eval_loss": 2.5})
    events.record_to(None)
    events.info("not recorded")
    recorded = [json.loads(line) for line in record.read_text().splitlines()]
    assert [(e["type"], e["message"]) for e in recorded] == [("message", "one"), ("eval", "eval: base")]
    assert recorded[1]["metrics"] == {"eval_loss": 2.5}
    assert "one" in capsys.readouterr().out  # shown as text as well


def test_a_terminal_gets_a_live_bar_instead_of_step_lines():
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    with os.fdopen(follower, "w") as terminal:
        for step in (1, 2, 3):
            events.emit("train.step", f"step {step}/3 | loss 1.0", step=step, data={"total_steps": 3}, stream=terminal)
        events.emit("stage", "stage train: done", stream=terminal)
        shown = ""
        while "stage train: done" not in shown and select.select([leader], [], [], 5)[0]:
            shown += os.read(leader, 65536).decode()
    os.close(leader)
    assert "\r" in shown and "3/3" in shown  # redrawn in place
    assert "step 1/3" not in shown  # no line per step
    assert shown.rstrip().endswith("stage train: done")


def test_a_pipe_gets_plain_step_lines_without_control_characters():
    out = io.StringIO()
    for step in (1, 2):
        events.emit("train.step", f"step {step}/2 | loss 1.0", step=step, data={"total_steps": 2}, stream=out)
    text = out.getvalue()
    assert text.count("\n") == 2 and "\r" not in text and "\x1b" not in text


def test_termination_message_is_written_where_the_job_says(tmp_path, monkeypatch):
    path = tmp_path / "termination-log"
    monkeypatch.setenv(termination.PATH_ENV, str(path))
    termination.write(termination.preempted(143, 17, 40, "checkpoint-17"))
    assert json.loads(path.read_text()) == {"status": "preempted", "exit_code": 143, "step": 17, "total_steps": 40,
                                            "checkpoint": "checkpoint-17"}


def test_a_long_error_is_shortened_to_the_kubernetes_limit(tmp_path, monkeypatch):
    path = tmp_path / "termination-log"
    monkeypatch.setenv(termination.PATH_ENV, str(path))
    termination.write(termination.failed(2, {"code": "user_error", "message": "bad \"row\" " * 2000, "param": "x"}))
    written = path.read_bytes()
    assert len(written) <= termination.LIMIT
    outcome = json.loads(written)
    assert outcome["error"]["message"].endswith("...") and outcome["error"]["param"] == "x"


def test_no_termination_message_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(termination.PATH_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    termination.write(termination.failed(1, {"code": "internal_error", "message": "x", "param": None}))
    assert list(tmp_path.iterdir()) == []
