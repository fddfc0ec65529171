"""`tuner.report`: metrics read from events.jsonl, and the PNG of the loss curves read back with Pillow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tuner.errors import UserError
from tuner.observe import loss_curves
from tuner.workdir import CURVE_FILE, EVENTS_FILE

BLUE = (31, 119, 180)
RED = (214, 39, 40)
STEPS = 20


def write_events(work: Path, *, evals: bool = True, extra: list[dict] | None = None) -> Path:
    """A job's events.jsonl: 20 train steps with a falling loss, evals at 0/10/20, noise, a broken line."""
    def event(type_: str, message: str, **fields) -> dict:
        return {"type": type_, "time": "2026-11-24T20:16:31.123Z", "level": "info", "message": message, **fields}

    events = [event("job.started", "job started"), event("stage", "training", data={"stage": "train"})]
    if evals:
        events.append(event("eval", "eval: base", step=0, metrics={"eval_loss": 3.2, "eval_runtime": 0.5},
                            data={"model": "base"}))
    for step in range(1, STEPS + 1):
        events.append(event("train.step", f"step {step}/{STEPS}", step=step,
                            metrics={"epoch": step / 10, "loss": 4.0 - 0.1 * step, "learning_rate": 0.001,
                                     "grad_norm": 1.5}))
        if evals and step in (10, STEPS):
            events.append(event("eval", f"eval: step {step}", step=step, metrics={"eval_loss": 3.2 - 0.05 * step},
                                data={"model": "adapter" if step == STEPS else "periodic"}))
        if step == 5:
            events.append(event("checkpoint.saved", "checkpoint", step=5, metrics={"loss": 99.0}))
    events += extra or []
    lines = [json.dumps(e) for e in events]
    lines.insert(3, '{"type": "train.step", "step": 3, "metr')  # cut short by a crash
    work.mkdir(parents=True, exist_ok=True)
    path = work / EVENTS_FILE
    path.write_text("\n".join(lines) + "\n")
    return path


def color_pixels(png: Path, rgb: tuple[int, int, int], tolerance: int = 40) -> int:
    """How many pixels lie within `tolerance` (per channel) of `rgb`."""
    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=int)
    return int((np.abs(pixels - rgb).max(axis=-1) <= tolerance).sum())


def test_read_metrics_returns_every_metric_sorted_by_step(tmp_path):
    metrics = loss_curves.read_metrics(write_events(tmp_path))
    assert sorted(metrics) == ["epoch", "eval_loss", "eval_runtime", "grad_norm", "learning_rate", "loss"]
    assert metrics["loss"] == [(step, pytest.approx(4.0 - 0.1 * step)) for step in range(1, STEPS + 1)]
    assert metrics["eval_loss"] == [(0, 3.2), (10, pytest.approx(2.7)), (20, pytest.approx(2.2))]
    assert metrics["eval_runtime"] == [(0, 0.5)]


def test_read_metrics_last_entry_wins_for_a_relogged_step(tmp_path):
    resumed = [{"type": "train.step", "time": "t", "level": "info", "message": "resumed", "step": 7,
                "metrics": {"loss": 1.25}}]
    metrics = loss_curves.read_metrics(write_events(tmp_path, extra=resumed))
    assert [value for step, value in metrics["loss"] if step == 7] == [1.25]
    assert [step for step, _ in metrics["loss"]] == list(range(1, STEPS + 1))


def test_read_metrics_skips_non_numeric_values_and_other_event_types(tmp_path):
    odd = [{"type": "train.step", "time": "t", "level": "info", "message": "odd", "step": 30,
            "metrics": {"loss": None, "grad_norm": "nan", "epoch": True, "learning_rate": float("inf"),
                        "tokens_per_second": 12}},
           {"type": "message", "time": "t", "level": "info", "message": "x", "step": 31, "metrics": {"loss": 0.1}}]
    metrics = loss_curves.read_metrics(write_events(tmp_path, extra=odd))
    assert metrics["tokens_per_second"] == [(30, 12.0)]
    assert all(step <= STEPS for name in ("loss", "grad_norm", "epoch", "learning_rate")
               for step, _ in metrics[name])
    assert (5, 99.0) not in metrics["loss"]  # from checkpoint.saved


def test_draw_writes_a_png_with_the_train_and_eval_curves(tmp_path):
    out = loss_curves.draw(write_events(tmp_path / "job"), tmp_path / "plots" / CURVE_FILE)
    assert out == tmp_path / "plots" / CURVE_FILE
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == (800, 450)
    assert color_pixels(out, BLUE) > 300
    assert color_pixels(out, RED) > 100
    assert [p.name for p in out.parent.iterdir()] == [CURVE_FILE]  # no temp file left behind


def test_draw_without_eval_events_has_no_red_curve(tmp_path):
    out = loss_curves.draw(write_events(tmp_path, evals=False), tmp_path / CURVE_FILE)
    assert color_pixels(out, BLUE) > 300
    assert color_pixels(out, RED) < 10


def test_another_metric_gets_its_own_subplot_row(tmp_path):
    out = loss_curves.draw(write_events(tmp_path), tmp_path / CURVE_FILE, ["loss", "eval_loss", "learning_rate"])
    with Image.open(out) as image:
        assert image.size == (800, 900)


def test_an_unknown_metric_is_a_user_error_listing_the_logged_ones(tmp_path):
    with pytest.raises(UserError, match="bleu") as caught:
        loss_curves.draw(write_events(tmp_path), tmp_path / CURVE_FILE, ["loss", "bleu"])
    assert caught.value.fix == "choose from epoch, eval_loss, eval_runtime, grad_norm, learning_rate, loss"
    assert not (tmp_path / CURVE_FILE).exists()


@pytest.mark.parametrize("content", [None, ""], ids=["missing", "empty"])
def test_a_missing_or_empty_events_file_is_a_user_error(tmp_path, content):
    events = tmp_path / EVENTS_FILE
    if content is not None:
        events.write_text(content)
    with pytest.raises(UserError, match="does not exist" if content is None else "no train.step") as caught:
        loss_curves.draw(events, tmp_path / CURVE_FILE)
    assert str(events) in str(caught.value)
    assert "tuner run" in caught.value.fix
