"""Loss curves as a PNG, drawn from a training job's event record (`WORK/events.jsonl`).

Only `train.step` and `eval` events count; their `metrics` are plotted against `step`. A metric and
its `eval_` twin (`loss` and `eval_loss`) share one subplot; every other metric gets its own,
stacked vertically on a shared step axis. matplotlib is imported only when drawing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from tuner.errors import UserError
from tuner.observe import events
from tuner.workdir import WorkDir, atomic_output

DEFAULT_METRICS = ("loss", "eval_loss")

METRIC_EVENTS = ("train.step", "eval")
EVAL_PREFIX = "eval_"
TRAIN_COLOR = "#1f77b4"
EVAL_COLOR = "#d62728"
ROW_SIZE = (8.0, 4.5)  # inches per subplot row
DPI = 100


def read_metrics(events_file: Path) -> dict[str, list[tuple[int, float]]]:
    """Every logged metric of train.step and eval events: name -> [(step, value)] sorted by step.

    Broken lines, other event types and non-finite or non-numeric values are skipped; for a step
    logged twice (a resumed job) the last entry wins.
    """
    by_step: dict[str, dict[int, float]] = {}
    with open(events_file, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if not isinstance(event, dict) or event.get("type") not in METRIC_EVENTS:
                continue
            step, metrics = event.get("step"), event.get("metrics")
            if not _is_int(step) or not isinstance(metrics, dict):
                continue
            for name, value in metrics.items():
                if _is_number(value) and math.isfinite(value):
                    by_step.setdefault(name, {})[step] = float(value)
    return {name: sorted(points.items()) for name, points in by_step.items()}


def draw(events_file: Path, out: Path, metrics: Sequence[str] = DEFAULT_METRICS, *,
         title: str | None = None) -> Path:
    """Draw the metrics against the step into a PNG at `out` (returned).

    With the default metrics a missing `eval_loss` (no eval split) is left out; any other missing
    metric is a `UserError` that lists the logged ones.
    """
    events_file, out = Path(events_file), Path(out)
    logged = read_metrics(events_file) if events_file.is_file() else {}
    if not logged:
        state = "holds no train.step or eval metrics" if events_file.is_file() else "does not exist"
        raise UserError(f"{events_file} {state}", where="report",
                        fix="run `tuner run` with this work dir first")
    optional = {"eval_loss"} if tuple(metrics) == DEFAULT_METRICS else set()
    present = [name for name in metrics if name in logged]
    missing = [name for name in metrics if name not in logged and name not in optional]
    if missing or not present:
        what = f"metric {missing[0]!r} was not logged in {events_file}" if missing else "no metric requested"
        raise UserError(what, where="report", fix=f"choose from {', '.join(sorted(logged))}")
    panels = _panels(present)

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure (no pyplot) uses Agg without touching the global backend and is never
    # registered anywhere, so nothing is left open after this function returns.
    fig = Figure(figsize=(ROW_SIZE[0], ROW_SIZE[1] * len(panels)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels, strict=True):
        for i, name in enumerate(panel):
            steps, values = zip(*logged[name], strict=True)
            label = name if len(panel) == 1 else f"{'eval' if i else 'train'} {panel[0]}"
            ax.plot(steps, values, color=EVAL_COLOR if i else TRAIN_COLOR, label=label,
                    marker="o" if name.startswith(EVAL_PREFIX) else None, markersize=4)
        ax.set_ylabel(panel[0])
        ax.grid(True, alpha=0.3)
        if len(panel) > 1:
            ax.legend()
    axes[-1].set_xlabel("step")
    fig.suptitle(title if title is not None else events_file.resolve().parent.name)

    with atomic_output(out) as f:
        fig.savefig(f, format="png", dpi=DPI)
    return out


def draw_job_curve(work: WorkDir, title: str) -> None:
    """The job's loss curve into its adapter (so into the output and the image); never fails the job."""
    try:
        curve = draw(work.events, work.curve, title=title)
    except (UserError, OSError, ValueError) as exc:
        events.warn(f"no loss curve: {exc}")
        return
    events.info(f"report: loss curve in {curve} (`tuner report {work.root}` draws any logged metric)")


def _panels(names: list[str]) -> list[list[str]]:
    """Group the metrics into subplots: `x` and `eval_x` together (train first), others alone."""
    panels: list[list[str]] = []
    for name in names:
        twin = name[len(EVAL_PREFIX):] if name.startswith(EVAL_PREFIX) else EVAL_PREFIX + name
        if twin not in names:
            panels.append([name])
        elif not name.startswith(EVAL_PREFIX):
            panels.append([name, twin])
    return panels


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
