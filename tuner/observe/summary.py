"""The end of a run: `training_summary.json` (in the adapter, so in the output and the image),
the short human table in the log, and the `job.succeeded` event."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuner import __version__
from tuner.observe import events
from tuner.observe.events import duration

if TYPE_CHECKING:
    from tuner.data.fetch import InputFile
    from tuner.data.prepare import DataStats
    from tuner.spec.plan import JobPlan
    from tuner.train.trainer import TrainResult


def build(plan: JobPlan, inputs: list[InputFile], stats: DataStats, result: TrainResult,
          stages: dict[str, float], started: str, world_size: int) -> dict[str, Any]:
    """Everything about a finished training run that fits in a small JSON file."""
    source = plan.preset.source
    return {
        "tuner_version": __version__,
        "workspace": plan.workspace.metadata.name,
        "preset": plan.preset.name,
        "base_model": {"hub_id": source.hub_id, "revision": source.revision,
                       "gguf": f"{source.gguf_package}/{source.gguf_file}" if source.gguf_package else None},
        "method": plan.workspace.tuning.method,
        "config_digest": plan.config.digest(),
        "config": plan.config.as_sections(),
        "datasets": [{"source": f.source, "sha256": f.sha256, "bytes": f.size} for f in inputs],
        "data": asdict(stats),
        "max_length": plan.max_length,
        "world_size": world_size,
        "train": {k: v for k, v in asdict(result).items() if k not in ("log_history", "eval_loss", "base_eval_loss")}
                 | {"tokens_per_second": round(result.tokens_per_second, 1)},
        "eval": {"rows": stats.eval_rows, "base_loss": result.base_eval_loss, "adapter_loss": result.eval_loss},
        "loss_history": [{"step": e["step"], "loss": e["loss"]} for e in result.log_history if "loss" in e],
        "stage_seconds": stage_seconds(stages),
        "started": started,
        "finished": now(),
    }


def stage_seconds(stages: dict[str, float]) -> dict[str, float]:
    return {name: round(seconds, 2) for name, seconds in stages.items()}


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def table(summary: dict[str, Any]) -> list[str]:
    """The human summary: steps and tokens, losses (the base model's and the adapter's), stage durations."""
    train, evaluation = summary["train"], summary.get("eval") or {}
    lines = [f"summary: {train['steps']:,}/{train['total_steps']:,} steps ({train['epochs']:.2f} epochs) | "
             f"{train['tokens_seen']:,} tokens trained ({train['tokens_per_second']:,.0f} tok/s)"
             + (f" | resumed at step {train['resumed_from_step']:,}" if train.get("resumed_from_step") else "")]
    losses = f"train {train['train_loss']:.4f} (mean)"
    if train.get("final_loss") is not None:
        losses += f", last {train['final_loss']:.4f}"
    base, adapter = evaluation.get("base_loss"), evaluation.get("adapter_loss")
    if adapter is not None and base:
        losses += f" | eval: base {base:.4f} -> adapter {adapter:.4f} ({100 * (adapter - base) / base:+.0f}%)"
    elif adapter is not None:
        losses += f" | eval: adapter {adapter:.4f}"
    else:
        losses += " | eval: none (hold rows out with DatasetConfig.train_test_split below 1)"
    lines.append(f"summary: loss {losses}")
    lines.append("summary: stages " + " | ".join(f"{name} {_seconds(seconds)}"
                                                for name, seconds in summary["stage_seconds"].items()))
    return lines


def succeeded(summary: dict[str, Any], results: dict[str, Path | str], *, trained: bool) -> None:
    """Log the table (text form) and the `job.succeeded` event with the run's numbers and where the results are."""
    if not events.json_format():
        for line in table(summary):
            events.info(line)
    train, evaluation = summary["train"], summary.get("eval") or {}
    metrics = {"steps": train["steps"], "epochs": train["epochs"], "trained_tokens": train["tokens_seen"],
               "train_loss": train["train_loss"], "eval_loss_base": evaluation.get("base_loss"),
               "eval_loss": evaluation.get("adapter_loss"), "seconds": round(sum(summary["stage_seconds"].values()), 2)}
    where = ", ".join(f"{name} {value}" for name, value in results.items())
    events.emit("job.succeeded", f"done: {'trained' if trained else 'nothing to redo'}; {where}", step=train["steps"],
                metrics=metrics, data={name: str(value) for name, value in results.items()} | {"trained": trained})


def _seconds(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 60 else duration(seconds)
