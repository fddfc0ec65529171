"""The job's names, provenance and run identity for transformers' tracker integrations.

The integrations read their settings from environment variables, so the job sets the ones the user
left unset, for the length of training only (a test process runs many jobs): TensorBoard writes
into WORK/runs; MLflow's experiment is the Workspace's name and its tags carry tuner's provenance
(preset, method, dataset sha256s, config digest); W&B's project likewise, its files under WORK. A
Secret the Job takes with `tuner render --env-secret` brings the URIs and keys (MLFLOW_TRACKING_URI,
WANDB_API_KEY, WANDB_MODE...): tuner never prints or writes them.

A resumed run continues the same tracker run: the run ids go into WORK/checkpoints/trackers.json
(MLflow's once its callback has started the run; W&B's is chosen up front), and a resume hands them
back through MLFLOW_RUN_ID and WANDB_RUN_ID with WANDB_RESUME=allow. TensorBoard needs nothing:
a resumed run adds event files to the same folder. A restart deletes the checkpoints, and with them
the ids: it starts new runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from tuner import __version__
from tuner.errors import UserError
from tuner.observe import events
from tuner.workdir import WorkDir, atomic_write_json

TRACKERS_FILE = "trackers.json"  # in WORK/checkpoints
IMAGE_TAG = "tuner.image"


@dataclass(frozen=True)
class Tracking:
    """What the trackers are told about the job: its name (experiment, project, run name) and provenance."""

    name: str
    tags: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, workspace: str, identity: dict[str, Any]) -> Tracking:
        tags = {"tuner.workspace": workspace, "tuner.version": __version__, "tuner.preset": identity["preset"],
                "tuner.method": identity["method"], "tuner.config_digest": identity["config_digest"],
                "tuner.datasets": ",".join(identity["datasets"])}
        return cls(workspace, tags)


def run_ids(work: WorkDir) -> dict[str, str]:
    try:
        recorded = json.loads((work.checkpoints / TRACKERS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in recorded.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(recorded, dict) else {}


@contextlib.contextmanager
def environment(integrations: tuple[str, ...], tracking: Tracking, work: WorkDir, *,
                resumed: bool) -> Iterator[dict[str, str]]:
    """Set the integrations' variables the user left unset while the block runs; yield the run ids."""
    ids = run_ids(work) if resumed else {}
    chosen: dict[str, str] = {}
    if "tensorboard" in integrations:
        chosen["TENSORBOARD_LOGGING_DIR"] = str(work.runs)
    if "mlflow" in integrations:
        chosen["MLFLOW_EXPERIMENT_NAME"] = tracking.name
        user_tags = _user_tags()
        chosen["MLFLOW_TAGS"] = json.dumps({**tracking.tags, **user_tags})
        chosen["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"  # the run's URL names the server
        if "mlflow" in ids:
            chosen["MLFLOW_RUN_ID"] = ids["mlflow"]
    if "wandb" in integrations:
        ids.setdefault("wandb", secrets.token_hex(8))  # W&B's ids: up to 64 of [a-z0-9]
        chosen.update(WANDB_PROJECT=tracking.name, WANDB_DIR=str(work.root), WANDB_RUN_ID=ids["wandb"],
                      WANDB_RESUME="allow")
    saved = {key: os.environ.get(key) for key in chosen}
    for key, value in chosen.items():
        if key == "MLFLOW_TAGS" or os.environ.get(key) is None:
            os.environ[key] = value
    if "tensorboard" in integrations:
        Path(os.environ["TENSORBOARD_LOGGING_DIR"]).mkdir(parents=True, exist_ok=True)
    try:
        yield ids
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _user_tags() -> dict[str, Any]:
    """MLFLOW_TAGS as the user set it (a JSON object), to add tuner's provenance to."""
    try:
        tags = json.loads(os.environ.get("MLFLOW_TAGS") or "{}")
    except ValueError:
        tags = None
    if not isinstance(tags, dict):
        raise UserError("is not a JSON object", where="MLFLOW_TAGS (environment)",
                        fix='set it to e.g. {"team": "search"}, or unset it')
    return tags


def describe(integrations: tuple[str, ...]) -> str:
    """The log line: where each tracker reports (no URI: it may hold credentials)."""
    where = {"tensorboard": lambda: f"tensorboard ({os.environ['TENSORBOARD_LOGGING_DIR']})",
             "mlflow": lambda: f"mlflow (experiment {os.environ['MLFLOW_EXPERIMENT_NAME']}"
                               f"{', resuming run ' + os.environ['MLFLOW_RUN_ID'] if os.environ.get('MLFLOW_RUN_ID') else ''})",
             "wandb": lambda: f"wandb (project {os.environ['WANDB_PROJECT']}, run {os.environ['WANDB_RUN_ID']}, "
                              f"{os.environ.get('WANDB_MODE', 'online')})"}
    return "trackers: " + ", ".join(where[name]() if name in where else name for name in integrations)


class RecordRunIds(TrainerCallback):
    """Writes the tracker run ids into WORK/checkpoints once training has begun (after the integrations'
    callbacks, which the Trainer runs first, have started their runs)."""

    def __init__(self, work: WorkDir, ids: dict[str, str]):
        self.work, self.ids = work, ids

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if "mlflow" in args.report_to:
            import mlflow

            run = mlflow.active_run()
            if run is not None:
                self.ids["mlflow"] = run.info.run_id
        if self.ids:
            self.work.checkpoints.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.work.checkpoints / TRACKERS_FILE, self.ids)


def record_image(work: WorkDir, reference: str) -> None:
    """Tag the job's MLflow run with the delivered image (the run has ended: the client sets the tag)."""
    run_id = run_ids(work).get("mlflow")
    if run_id is None:
        return
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient().set_tag(run_id, IMAGE_TAG, reference)
    except Exception as exc:  # noqa: BLE001 (any client or server failure): the image is delivered, say so and go on
        events.warn(f"trackers: could not tag MLflow run {run_id} with {IMAGE_TAG}: {str(exc).splitlines()[0]}")
